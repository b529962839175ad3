"""Registers the ``file`` storage backend."""

from derecho_core import hookimpl

from .store import FileLogStore


@hookimpl
def derecho_register_storage(register):
    register("file", FileLogStore.open)
