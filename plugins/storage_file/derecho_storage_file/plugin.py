"""Registers the ``file`` storage backend."""

from derecho_core import hookimpl
from derecho_core.hookspecs import Register

from .store import FileLogStore


@hookimpl
def derecho_register_storage(register: Register) -> None:
    register("file", FileLogStore.open)
