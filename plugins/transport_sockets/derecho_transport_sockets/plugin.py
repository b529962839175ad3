"""Registers the ``sockets`` transport provider."""

from __future__ import annotations

from derecho_core import hookimpl


@hookimpl
def derecho_register_transports(register):
    from .transport import SocketsTransport

    register("sockets", SocketsTransport)
