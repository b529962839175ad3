"""derecho-storage-file: the ``file`` log store, durable and checksummed (the default of ``Persistent``)."""

from .store import FileLogStore, list_logs

__all__ = ["FileLogStore", "list_logs"]
