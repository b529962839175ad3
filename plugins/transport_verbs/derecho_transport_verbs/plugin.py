"""Registers the libfabric providers as derecho transports.

``tcp`` and ``verbs`` are always registered (a missing libfabric or provider
is reported when the transport is opened, with what to install); every other
core provider ``fi_getinfo`` lists here (``shm``, ``udp``, ``net`` ...) is
registered under its own name, except libfabric's ``sockets`` provider, whose
name belongs to the pure-Python ``sockets`` plugin: it is ``ofi_sockets`` here.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from derecho_core import hookimpl

log = logging.getLogger("derecho.transport.verbs")

#: derecho name -> libfabric provider name, when they differ
RENAMED = {"ofi_sockets": "sockets"}
ALWAYS = ("tcp", "verbs")


def make_factory(provider: str) -> Any:
    """A ``factory(conf, node_id, address)`` opening libfabric ``provider``."""

    def factory(conf: Any, node_id: int, address: Any) -> Any:
        from .transport import VerbsTransport

        return VerbsTransport(conf, node_id, address, provider=provider)

    functools.update_wrapper(factory, make_factory)
    factory.__name__ = factory.__qualname__ = f"verbs_transport_{provider}"
    factory.__doc__ = f"Open a derecho transport on libfabric provider {provider!r}."
    factory.provider = provider  # type: ignore[attr-defined]
    return factory


def provider_names() -> list[str]:
    names = list(ALWAYS)
    try:
        from .fabric import provider_names as listed

        for p in listed():
            n = "ofi_sockets" if p == "sockets" else p
            if n not in names:
                names.append(n)
    except Exception as exc:  # libfabric missing: the factories say so when used
        log.debug("libfabric providers not listed: %s", exc)
    return names


@hookimpl
def derecho_register_transports(register: Any) -> None:
    for name in provider_names():
        register(name, make_factory(RENAMED.get(name, name)))
