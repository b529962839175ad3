"""derecho-storage-mem: the ``mem`` log store, kept in RAM (what ``Volatile`` fields use)."""

from .store import MemLogStore

__all__ = ["MemLogStore"]
