"""The storage contract: what a log store plugin provides, and the helpers every store shares.

A store plugin registers a factory through ``derecho_register_storage``::

    @hookimpl
    def derecho_register_storage(register):
        register("file", FileLogStore.open)

``factory(conf, log_name)`` returns an open :class:`LogStore`: an append-only
log of ``(version, timestamp, data)`` entries. Versions strictly increase;
timestamps are hybrid logical clocks (:class:`HLC`, spec §7.1); indexes are
absolute (the first entry ever appended has index 0, and trimming the front
does not renumber the rest, as in Derecho's FilePersistLog).

This module also holds the exceptions of the persistence layer, a clock that
issues strictly increasing HLCs, the in-memory index both shipped stores use
for O(log n) lookups, and :func:`save_object` / :func:`load_object`, the
atomic whole-object files the group layer keeps its last view and ragged
trims in.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_left, bisect_right, insort
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, TypeVar

from .errors import DerechoError

if TYPE_CHECKING:
    from .conf import Conf

log = logging.getLogger("derecho.persistence")

INVALID_VERSION = -1

# ----------------------------------------------------------------------------- errors


class StorageError(DerechoError):
    """Base class of the errors of the persistence layer."""


class LogCorruptionError(StorageError):
    """A log file holds bytes that fail their checksum before its end: never silently dropped."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str):
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: corrupt entry at offset {offset}: {reason}. Entries after it are "
                         "intact, so this is not a torn write; restore the log from a replica or a backup "
                         "(or move the file away to start fresh)")


class LogLockedError(StorageError):
    """Another process (or another open in this one) has the log open."""


class DiskFullError(StorageError, OSError):
    """The disk (or quota, or file size limit) is full; the log stays readable."""


class LogFullError(StorageError):
    """The log reached ``[PERS] max_log_entry`` entries or ``max_data_size`` bytes."""


class InvalidVersionError(StorageError, LookupError):
    """No entry at or before the version asked for, or an append that does not increase the version."""


class InvalidIndexError(StorageError, IndexError):
    """An index outside ``[earliest_index, latest_index]``."""


class InvalidTimestampError(StorageError, LookupError):
    """No entry at or before the time asked for."""


class VersionNotStableError(StorageError):
    """A temporal query at or after the stability frontier: later entries may still appear."""


class LogClosedError(StorageError):
    """The log was closed."""


#: errno values that mean "no room": a full disk, a full quota, or RLIMIT_FSIZE.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# ----------------------------------------------------------------------------- HLC


class HLC(NamedTuple):
    """A hybrid logical clock reading: wall-clock microseconds and a logical counter.

    Compares lexicographically (it is a tuple), like Derecho's ``HLC``.
    """

    rtc_us: int
    logic: int = 0

    @classmethod
    def coerce(cls, ts: HLC | int | tuple[int, int] | None) -> HLC:
        """An HLC from an HLC, a ``(us, logic)`` pair, microseconds, or ``None`` (now)."""
        if ts is None:
            return cls(time.time_ns() // 1000, 0)
        if isinstance(ts, HLC):
            return ts
        if isinstance(ts, int):
            return cls(ts, 0)
        us, logic = ts
        return cls(int(us), int(logic))

    def __str__(self) -> str:
        return f"{self.rtc_us}/{self.logic}"


class HLCClock:
    """Issues strictly increasing HLCs: wall clock when it moved forward, else the logical counter.

    ``tick(received)`` merges a timestamp seen on a message, so causally later
    events always carry larger timestamps even when clocks disagree.
    """

    def __init__(self) -> None:
        self._last = HLC(0, 0)
        self._lock = threading.Lock()

    def tick(self, received: HLC | int | None = None) -> HLC:
        now = time.time_ns() // 1000
        with self._lock:
            last = self._last
            if received is not None:
                r = HLC.coerce(received)
                if r > last:
                    last = r
            nxt = HLC(now, 0) if now > last.rtc_us else HLC(last.rtc_us, last.logic + 1)
            self._last = nxt
            return nxt


# ----------------------------------------------------------------------------- the contract


class LogEntry(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the entry's log index
    version: int
    timestamp: HLC
    data: bytes


class LogStore(ABC):
    """One append-only, versioned log. Stores subclass this (or duck-type it).

    Thread-safe: each call holds the log's lock (see :func:`locked`), so one
    thread may read while another appends and persists. Iteration takes the
    lock per entry.
    """

    name: str

    # writes
    @abstractmethod
    def append(self, version: int, timestamp: HLC | int, data: bytes | bytearray | memoryview) -> int:
        """Append an entry; returns its index. ``version`` must exceed :attr:`latest_version`."""

    @abstractmethod
    def persist(self, up_to_version: int | None = None) -> int:
        """Make every entry up to ``up_to_version`` (default: all) durable; returns :attr:`latest_persisted_version`.

        One call covers every append since the last one (batching).
        """

    @abstractmethod
    def trim(self, version: int) -> int:
        """Drop every entry with version ≤ ``version``; returns how many were dropped."""

    @abstractmethod
    def truncate(self, version: int) -> int:
        """Drop every entry with version > ``version`` (recovery only); returns how many were dropped."""

    @abstractmethod
    def close(self) -> None:
        """Persist and release the log; further calls raise :class:`LogClosedError`."""

    # reads
    @abstractmethod
    def get_by_index(self, index: int) -> LogEntry:
        """The entry at absolute ``index``; negative counts from the end (-1 = latest)."""

    @abstractmethod
    def get_by_version(self, version: int, exact: bool = False) -> LogEntry:
        """The entry with ``version``, else (unless ``exact``) the latest before it."""

    @abstractmethod
    def get_by_time(self, timestamp: HLC | int) -> LogEntry:
        """The entry with the largest timestamp ≤ ``timestamp``."""

    @abstractmethod
    def __iter__(self) -> Iterator[LogEntry]:
        """Every retained entry, oldest first."""

    # metadata
    @property
    @abstractmethod
    def latest_version(self) -> int:
        """Version of the latest entry; after trimming everything, the last trimmed; -1 if none ever."""

    @property
    @abstractmethod
    def latest_persisted_version(self) -> int:
        """The latest version known durable (-1 if none)."""

    @property
    @abstractmethod
    def earliest_index(self) -> int:
        """Index of the first retained entry (== :attr:`next_index` when empty)."""

    @property
    @abstractmethod
    def next_index(self) -> int:
        """One past the last entry's index."""

    @property
    def latest_index(self) -> int:
        """Index of the latest entry, -1 when the log is empty."""
        return self.next_index - 1 if len(self) else -1

    @property
    def earliest_version(self) -> int:
        return self.get_by_index(self.earliest_index).version if len(self) else INVALID_VERSION

    def __len__(self) -> int:
        return self.next_index - self.earliest_index

    @property
    def num_entries(self) -> int:
        return len(self)

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_F = TypeVar("_F", bound=Callable[..., Any])


def locked(fn: _F) -> _F:
    """Run a store method holding the store's ``_mutex`` (an ``RLock``).

    The group layer may read a log on its delivery thread while its
    persistence step appends or persists on another; one lock per log keeps
    each call whole, for the price of an uncontended acquire.
    """

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------- shared in-memory index


class EntryIndex:
    """Versions and timestamps of the retained entries in compact arrays, for bisection.

    Position ``p`` holds the entry with index ``head + p``. Lookups are
    O(log n) bisections done in C. Timestamps usually arrive in order (one
    sender's HLC); in a group they come from several senders' clocks, so
    they need not. Then time queries use a permutation of positions sorted
    by timestamp: built once (O(n log n)), and afterwards each query first
    inserts the positions appended since the last one (O(log n) each, mostly
    near the end), so neither appends nor queries pay for a full sort again.
    """

    __slots__ = ("head", "versions", "rtc", "logic", "time_sorted", "_perm", "_perm_upto")

    def __init__(self, head: int = 0) -> None:
        self.head = head
        self.versions = array("q")
        self.rtc = array("q")
        self.logic = array("q")
        self.time_sorted = True
        self._perm: array[int] | None = None  # positions sorted by (rtc, logic, position)
        self._perm_upto = 0  # positions below this are in _perm

    def __len__(self) -> int:
        return len(self.versions)

    @property
    def tail(self) -> int:
        return self.head + len(self.versions)

    def add(self, version: int, ts: HLC) -> None:
        rtc = self.rtc
        if rtc and (ts.rtc_us < rtc[-1] or (ts.rtc_us == rtc[-1] and ts.logic < self.logic[-1])):
            self.time_sorted = False
        self.versions.append(version)
        rtc.append(ts.rtc_us)
        self.logic.append(ts.logic)

    def drop_front(self, count: int) -> None:
        del self.versions[:count], self.rtc[:count], self.logic[:count]
        self.head += count
        self._perm = None  # positions moved: rebuilt on the next time query

    def drop_back(self, keep: int) -> None:
        del self.versions[keep:], self.rtc[keep:], self.logic[keep:]
        self._perm = None
        if not self.time_sorted:
            rtc, logic = self.rtc, self.logic
            self.time_sorted = all((rtc[i], logic[i]) <= (rtc[i + 1], logic[i + 1]) for i in range(len(rtc) - 1))

    def timestamp(self, pos: int) -> HLC:
        return HLC(self.rtc[pos], self.logic[pos])

    def pos_of_index(self, index: int) -> int:
        """Position of absolute ``index`` (negative: from the end), or :class:`InvalidIndexError`."""
        n = len(self.versions)
        pos = n + index if index < 0 else index - self.head
        if not 0 <= pos < n:
            if n == 0:
                raise InvalidIndexError(f"index {index}: the log is empty")
            raise InvalidIndexError(f"index {index} is outside [{self.head}, {self.tail - 1}] (or -{n}..-1)")
        return pos

    def pos_of_version(self, version: int, exact: bool = False) -> int:
        pos = bisect_right(self.versions, version) - 1
        if pos < 0 or (exact and self.versions[pos] != version):
            if exact:
                raise InvalidVersionError(f"no entry with version {version}")
            first = self.versions[0] if self.versions else None
            raise InvalidVersionError(f"no entry at or before version {version}"
                                      + (f" (earliest retained: {first})" if first is not None else " (log empty)"))
        return pos

    def pos_of_time(self, ts: HLC) -> int:
        """Position of the entry with the largest timestamp ≤ ``ts`` (the latest such on ties)."""
        if self.time_sorted:
            hi = bisect_right(self.rtc, ts.rtc_us)
            lo = bisect_left(self.rtc, ts.rtc_us, 0, hi)
            # entries [lo, hi) share ts.rtc_us, so their logic counters are sorted too; those before lo are older
            pos = bisect_right(self.logic, ts.logic, lo, hi) - 1
        else:
            perm = self._sorted_perm()
            k = bisect_right(perm, (ts.rtc_us, ts.logic, len(perm)), key=self._time_key) - 1
            pos = perm[k] if k >= 0 else -1
        if pos < 0:
            first = f" (earliest entry: {self.timestamp(0)})" if self.versions else " (log empty)"
            raise InvalidTimestampError(f"no entry at or before time {ts}{first}")
        return pos

    def _time_key(self, pos: int) -> tuple[int, int, int]:
        return self.rtc[pos], self.logic[pos], pos

    def _sorted_perm(self) -> array[int]:
        n = len(self.versions)
        if self._perm is None:
            self._perm = array("q", sorted(range(n), key=self._time_key))
        else:
            for pos in range(self._perm_upto, n):
                insort(self._perm, pos, key=self._time_key)
        self._perm_upto = n
        return self._perm


def check_append(latest_version: int, version: int, name: str) -> None:
    if version <= latest_version:
        raise InvalidVersionError(f"log {name!r}: cannot append version {version}: versions must increase "
                                  f"(latest is {latest_version})")


# ----------------------------------------------------------------------------- names and paths

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_log_name(name: str) -> str:
    """A file-name-safe form of ``name``, stable across runs and distinct for distinct names."""
    if not name:
        raise ValueError("a log name cannot be empty")
    safe = _SAFE.sub("_", name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != name or len(safe) > 160:
        # replaced characters (or truncation) could make two names collide; a short hash keeps them apart
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        safe = f"{safe[:140]}~{digest}"
    return safe


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700: logs may hold private data) if missing."""
    p = Path(path)
    if not p.is_dir():
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    return p


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _conf_dir(conf_or_dir: Conf | str | os.PathLike[str]) -> tuple[Path, bool]:
    if isinstance(conf_or_dir, (str, os.PathLike)):
        return Path(conf_or_dir), False
    return Path(conf_or_dir.get("PERS/file_path")), bool(conf_or_dir.get("PERS/reset"))


# ----------------------------------------------------------------------------- saved objects

_OBJ = struct.Struct("<8sIQ")  # magic, crc32 of data, length
_OBJ_MAGIC = b"DRCHOBJ1"


def object_path(conf_or_dir: Conf | str | os.PathLike[str], name: str) -> Path:
    directory, _ = _conf_dir(conf_or_dir)
    return directory / f"{safe_log_name(name)}.nolog"


def save_object(conf_or_dir: Conf | str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Write ``data`` as the saved object ``name``, atomically: temporary file, fsync, rename, fsync dir.

    A reader sees the old bytes or the new ones, never a mix, even across a crash.
    """
    directory, _ = _conf_dir(conf_or_dir)
    ensure_dir(directory)
    path = object_path(directory, name)
    tmp = path.with_name(path.name + ".tmp")
    blob = _OBJ.pack(_OBJ_MAGIC, zlib.crc32(data), len(data)) + bytes(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_SPACE_ERRNOS:
            raise DiskFullError(exc.errno, f"no space to save object {name!r} in {directory}: {exc.strerror}; "
                                "the previous copy is unchanged") from exc
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)
    return path


def load_object(conf_or_dir: Conf | str | os.PathLike[str], name: str) -> bytes | None:
    """The bytes saved as ``name``, or ``None`` if there are none.

    With a :class:`Conf` whose ``[PERS] reset`` is true the saved object is
    deleted instead (as Derecho does), so the process starts fresh.
    """
    directory, reset = _conf_dir(conf_or_dir)
    path = object_path(directory, name)
    if reset:
        delete_object(directory, name)
        return None
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(blob) < _OBJ.size:
        raise LogCorruptionError(path, 0, f"file is {len(blob)} bytes, shorter than its header")
    magic, crc, length = _OBJ.unpack_from(blob)
    data = blob[_OBJ.size:]
    if magic != _OBJ_MAGIC:
        raise LogCorruptionError(path, 0, f"bad magic {magic!r}")
    if length != len(data) or zlib.crc32(data) != crc:
        raise LogCorruptionError(path, _OBJ.size, "saved object fails its checksum")
    return data


def delete_object(conf_or_dir: Conf | str | os.PathLike[str], name: str) -> bool:
    directory, _ = _conf_dir(conf_or_dir)
    path = object_path(directory, name)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


# ----------------------------------------------------------------------------- opening


def open_log(conf: Conf, log_name: str, storage: str | None = None) -> LogStore:
    """Open ``log_name`` with the store ``storage`` (default ``[PERS] storage``) through the plugins."""
    from .plugins import storage as storage_factory

    factory = storage_factory(storage or conf.get("PERS/storage"))
    log: LogStore = factory(conf, log_name)
    return log
