"""Hook specifications: the three extension points of derecho-py.

Each extension point is a ``register`` hook: a plugin is handed a ``register``
callback and calls it once per named factory it provides::

    from derecho_core import hookimpl

    @hookimpl
    def derecho_register_allocators(register):
        register("one_shard", one_shard_allocator)

Names are global per kind: two plugins registering the same transport name is an
error that names both plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "derecho"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[str, Any], None]


@hookspec
def derecho_register_transports(register: Register) -> None:
    """Register transport factories, one per provider name.

    ``register(name, factory)``: ``name`` is what ``[RDMA] provider`` selects
    (``"sockets"``, ``"tcp"``, ``"verbs"``). ``factory(conf, node_id, address)``
    receives the node's :class:`derecho_core.Conf`, its integer node id and the
    ``(host, port)`` it listens on (port 0: pick a free one), and returns a
    :class:`derecho_core.transport.Transport` (listen, connect, try_send/send
    with a bounded per-peer queue, poll returning events, wake, disconnect,
    close; optional ``rma`` capability). Every connection starts with the
    handshake of :mod:`derecho_core.handshake`. ``docs/transports.md`` is the
    guide; :mod:`derecho_core.testing.transport` the conformance suite.
    """


@hookspec
def derecho_register_allocators(register: Register) -> None:
    """Register subgroup allocators, one per name.

    ``register(name, factory)``: ``name`` is what ``[LAYOUT] allocator`` selects.
    ``factory(conf)`` receives the :class:`derecho_core.Conf` and returns an
    allocator: a callable ``(types, prev_view, curr_view) -> {type: [[SubView per
    shard] per subgroup]}`` that raises
    :class:`derecho_core.SubgroupProvisioningError` when ``curr_view`` is too
    small, and may advance ``curr_view.next_unassigned_rank``.
    """


@hookspec
def derecho_register_storage(register: Register) -> None:
    """Register log stores, one per name.

    ``register(name, factory)``: ``name`` is what ``[PERS] storage`` (or a
    ``Persistent(..., storage=name)`` field) selects. ``factory(conf, log_name)``
    receives the :class:`derecho_core.Conf` and a stable log name and returns an
    open log implementing the storage contract of :mod:`derecho_core.storage`
    (append, persist, lookups by index, version and time, trim, truncate, close).
    """
