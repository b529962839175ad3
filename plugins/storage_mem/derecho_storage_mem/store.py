"""A log store in RAM: the storage contract of :mod:`derecho_core.storage`, nothing durable.

Logs live in a process-wide table keyed by ``([PERS] ramdisk_path, name)``, so
closing and reopening a log in the same process finds it again (like Derecho's
``Volatile`` files under ``ramdisk_path + pid``), and it vanishes with the
process. ``persist`` only moves the persisted mark: RAM is as durable as it gets.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from derecho_core.storage import (
    HLC,
    INVALID_VERSION,
    EntryIndex,
    LogClosedError,
    LogEntry,
    LogFullError,
    LogLockedError,
    LogStore,
    check_append,
    locked,
)


class _State:
    """What survives a close: the entries and the marks."""

    def __init__(self) -> None:
        self.index = EntryIndex()
        self.data: list[bytes] = []
        self.data_bytes = 0
        self.floor_version = INVALID_VERSION  # version of the last entry trimmed away
        self.persisted_tail = 0  # entries with index < persisted_tail are "persisted"
        self.open = False


_LOGS: dict[tuple[str, str], _State] = {}
_LOGS_LOCK = threading.Lock()


class MemLogStore(LogStore):
    def __init__(self, name: str, *, root: str = "", reset: bool = False, max_entries: int | None = None,
                 max_bytes: int | None = None):
        self.name = name
        self._key = (root, name)
        with _LOGS_LOCK:
            state = _LOGS.get(self._key)
            if state is not None and state.open:
                raise LogLockedError(f"mem log {name!r} is already open in this process; close it first")
            if state is None or reset:
                state = _State()
                _LOGS[self._key] = state
            state.open = True
        self._s: _State | None = state
        self._mutex = threading.RLock()
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    @classmethod
    def open(cls, conf: Any, log_name: str) -> MemLogStore:
        """The plugin factory: ``(conf, log_name)`` -> open log."""
        return cls(log_name, root=str(conf.get("PERS/ramdisk_path")), reset=bool(conf.get("PERS/reset")),
                   max_entries=conf.get("PERS/max_log_entry"), max_bytes=conf.get("PERS/max_data_size"))

    @staticmethod
    def discard(root: str, name: str) -> None:
        """Forget a closed log (tests)."""
        with _LOGS_LOCK:
            state = _LOGS.get((root, name))
            if state is not None and not state.open:
                del _LOGS[(root, name)]

    @property
    def _state(self) -> _State:
        if self._s is None:
            raise LogClosedError(f"mem log {self.name!r} is closed")
        return self._s

    # ------------------------------------------------------------------ writes
    @locked
    def append(self, version: int, timestamp: HLC | int, data: bytes | bytearray | memoryview) -> int:
        s = self._state
        check_append(self.latest_version, version, self.name)
        blob = bytes(data)
        if self._max_entries is not None and len(s.index) >= self._max_entries:
            raise LogFullError(f"mem log {self.name!r} holds max_log_entry={self._max_entries} entries; trim it")
        if self._max_bytes is not None and s.data_bytes + len(blob) > self._max_bytes:
            raise LogFullError(f"mem log {self.name!r} would exceed max_data_size={self._max_bytes} bytes; trim it")
        s.index.add(version, HLC.coerce(timestamp))
        s.data.append(blob)
        s.data_bytes += len(blob)
        return s.index.tail - 1

    @locked
    def persist(self, up_to_version: int | None = None) -> int:
        s = self._state
        s.persisted_tail = s.index.tail
        return self.latest_persisted_version

    @locked
    def trim(self, version: int) -> int:
        s = self._state
        count = 0 if not len(s.index) or version < s.index.versions[0] else s.index.pos_of_version(version) + 1
        if count:
            s.floor_version = s.index.versions[count - 1]
            s.data_bytes -= sum(len(b) for b in s.data[:count])
            del s.data[:count]
            s.index.drop_front(count)
        s.persisted_tail = s.index.tail  # as in the file store, trim makes the log durable first
        return count

    @locked
    def truncate(self, version: int) -> int:
        s = self._state
        keep = 0 if not len(s.index) or version < s.index.versions[0] else s.index.pos_of_version(version) + 1
        dropped = len(s.index) - keep
        if dropped:
            s.data_bytes -= sum(len(b) for b in s.data[keep:])
            del s.data[keep:]
            s.index.drop_back(keep)
        s.persisted_tail = s.index.tail  # as in the file store, truncate leaves the log durable
        return dropped

    @locked
    def close(self) -> None:
        if self._s is None:
            return
        self.persist()
        with _LOGS_LOCK:
            self._s.open = False
        self._s = None

    def __del__(self) -> None:
        # dropped without close(): let the log be opened again
        state = getattr(self, "_s", None)
        if state is not None:
            state.open = False

    # ------------------------------------------------------------------ reads
    def _entry(self, pos: int) -> LogEntry:
        s = self._state
        return LogEntry(s.index.head + pos, s.index.versions[pos], s.index.timestamp(pos), s.data[pos])

    @locked
    def get_by_index(self, index: int) -> LogEntry:
        return self._entry(self._state.index.pos_of_index(index))

    @locked
    def get_by_version(self, version: int, exact: bool = False) -> LogEntry:
        return self._entry(self._state.index.pos_of_version(version, exact))

    @locked
    def get_by_time(self, timestamp: HLC | int) -> LogEntry:
        return self._entry(self._state.index.pos_of_time(HLC.coerce(timestamp)))

    def __iter__(self) -> Iterator[LogEntry]:
        index = self.earliest_index
        while True:
            with self._mutex:  # per entry: a writer may go on between two
                idx = self._state.index
                index = max(index, idx.head)
                if index >= idx.tail:
                    return
                entry = self._entry(index - idx.head)
            yield entry
            index += 1

    # ------------------------------------------------------------------ metadata
    @property
    @locked
    def latest_version(self) -> int:
        s = self._state
        return s.index.versions[-1] if len(s.index) else s.floor_version

    @property
    @locked
    def latest_persisted_version(self) -> int:
        s = self._state
        if s.persisted_tail > s.index.head:
            return s.index.versions[s.persisted_tail - 1 - s.index.head]
        return s.floor_version  # trimming persists first, so everything trimmed was persisted

    @locked
    def __len__(self) -> int:
        return len(self._state.index)

    @property
    @locked
    def earliest_index(self) -> int:
        return self._state.index.head

    @property
    @locked
    def next_index(self) -> int:
        return self._state.index.tail

    def __repr__(self) -> str:
        state = "closed" if self._s is None else f"{len(self)} entries"
        return f"<MemLogStore {self.name!r} {state}>"
