"""Registers the ``mem`` storage backend."""

from derecho_core import hookimpl
from derecho_core.hookspecs import Register

from .store import MemLogStore


@hookimpl
def derecho_register_storage(register: Register) -> None:
    register("mem", MemLogStore.open)
