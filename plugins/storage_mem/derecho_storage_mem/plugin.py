"""Registers the ``mem`` storage backend."""

from derecho_core import hookimpl

from .store import MemLogStore


@hookimpl
def derecho_register_storage(register):
    register("mem", MemLogStore.open)
