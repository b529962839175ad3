"""Versioned fields: :class:`Persistent`, :class:`Volatile` and the :class:`PersistentRegistry` (DESIGN §6, §8).

A replicated object keeps its durable state in ``Persistent`` fields. Each
field holds a current Python object (``.value``) and a log of its past
states in a store plugin (``file`` by default, ``mem`` for ``Volatile``).
After each delivered update the registry calls ``make_version(v, ts)``, which
appends every field's current state at version ``v``; ``persist`` makes them
durable. Everything works without a group: the caller supplies versions.

Log names are stable across restarts: ``<registry prefix>.<field name>``,
where the group layer builds the prefix from the replicated type's qualified
name, subgroup index and shard (:func:`make_prefix`), never from the order
fields were constructed in (Derecho's ``_NameMaker`` counter, spec §7.5).

Values are stored as msgpack (Python containers; objects through
``__getstate__``/``__setstate__``, recorded with their importable type name),
or pickle when ``[DERECHO] serializer = pickle``. Each payload starts with one
tag byte so tools can tell which: ``M`` msgpack, ``P`` pickle, ``D`` a delta.

The delta protocol (Derecho's ``IDeltaSupport``) is for objects whose changes
are much smaller than their state, such as a large dict or an append-only
list. Give the type two methods::

    def get_delta(self) -> bytes | None
        # the changes since the previous call, then forget them; None or b"" when unchanged
    def apply_delta(self, delta: bytes) -> None
        # apply changes produced by get_delta (of an object in the same earlier state)

Then ``version(v)`` logs only ``get_delta()`` (and no entry at all when it is
empty; the version still counts, see :meth:`Persistent.get_current_version`),
and a past state is rebuilt by replaying the retained deltas on ``factory()``.
So trimming a delta log also forgets the changes it held: after ``trim(v)``,
states are rebuilt from the first retained delta.
"""

from __future__ import annotations

import copy
import enum
import importlib
import pickle
from typing import Any, Callable, Generic, Iterator, TypeVar

import msgpack

from .conf import Conf
from .errors import DerechoError
from .storage import (
    HLC,
    INVALID_VERSION,
    HLCClock,
    InvalidIndexError,
    InvalidVersionError,
    LogEntry,
    LogStore,
    StorageError,
    VersionNotStableError,
    open_log,
)

T = TypeVar("T")

TAG_MSGPACK = b"M"
TAG_PICKLE = b"P"
TAG_DELTA = b"D"

_EXT_OBJECT, _EXT_TUPLE, _EXT_SET, _EXT_FROZENSET, _EXT_ENUM = 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------- value codec


class UndecodableValue(DerechoError):
    """A stored value whose type cannot be imported here (``derecho log`` then shows hex)."""


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_type(name: str) -> type:
    module_name, _, qual = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UndecodableValue(f"cannot import the stored type {name!r}: {exc}") from None
    if not isinstance(obj, type):
        raise UndecodableValue(f"stored type {name!r} is not a class")
    return obj


def _pack_default(obj: Any) -> msgpack.ExtType:
    # msgpack calls this for what it cannot pack itself (strict_types: tuples and subclasses too)
    if isinstance(obj, tuple) and type(obj) is tuple:
        return msgpack.ExtType(_EXT_TUPLE, _packb(list(obj)))
    if type(obj) is set:
        return msgpack.ExtType(_EXT_SET, _packb(list(obj)))
    if type(obj) is frozenset:
        return msgpack.ExtType(_EXT_FROZENSET, _packb(list(obj)))
    if isinstance(obj, enum.Enum):
        return msgpack.ExtType(_EXT_ENUM, _packb([type_name(type(obj)), obj.value]))
    if "<locals>" in type(obj).__qualname__:
        raise TypeError(f"cannot store a {type(obj).__qualname__}: a class defined inside a function "
                        "cannot be imported again to decode it; define it at module level")
    getstate = getattr(obj, "__getstate__", None)
    if getstate is None:
        raise TypeError(f"cannot store a {type(obj).__name__}: give it __getstate__/__setstate__")
    return msgpack.ExtType(_EXT_OBJECT, _packb([type_name(type(obj)), getstate()]))


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_pack_default, strict_types=True, use_bin_type=True)
    return packed


def _ext_hook(code: int, data: bytes) -> Any:
    inner = _unpackb(data)
    if code == _EXT_TUPLE:
        return tuple(inner)
    if code == _EXT_SET:
        return set(inner)
    if code == _EXT_FROZENSET:
        return frozenset(inner)
    if code == _EXT_ENUM:
        return _import_type(inner[0])(inner[1])
    if code == _EXT_OBJECT:
        cls = _import_type(inner[0])
        obj = cls.__new__(cls)  # type: ignore[call-overload]  # no __init__: the state comes next
        state = inner[1]
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        elif isinstance(state, dict):
            obj.__dict__.update(state)
        elif isinstance(state, (tuple, list)) and len(state) == 2:  # (dict state, slots state)
            for part in state:
                for k, v in (part or {}).items():
                    setattr(obj, k, v)
        return obj
    return msgpack.ExtType(code, data)


def _unpackb(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


def encode_value(value: Any, serializer: str = "msgpack") -> bytes:
    """The payload stored for ``value``: a tag byte and its serialized state."""
    if serializer == "pickle":
        return TAG_PICKLE + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return TAG_MSGPACK + _packb(value)


def decode_value(data: bytes, *, allow_pickle: bool = True) -> Any:
    """The value of a payload made by :func:`encode_value` (raises :class:`UndecodableValue`)."""
    tag, body = data[:1], memoryview(data)[1:]
    try:
        if tag == TAG_MSGPACK:
            return _unpackb(body)
        if tag == TAG_PICKLE:
            if not allow_pickle:
                raise UndecodableValue("pickled value (decoding it would run code; allow pickle to show it)")
            return pickle.loads(body)
    except UndecodableValue:
        raise
    except Exception as exc:
        raise UndecodableValue(f"cannot decode value: {exc!r}") from None
    if tag == TAG_DELTA:
        raise UndecodableValue("a delta (its meaning is the type's own)")
    raise UndecodableValue(f"unknown payload tag {tag!r}")


def _supports_delta(value: Any) -> bool:
    return callable(getattr(value, "get_delta", None)) and callable(getattr(value, "apply_delta", None))


# ----------------------------------------------------------------------------- registry


def make_prefix(subgroup_type: type | str, subgroup_index: int = 0, shard: int = 0) -> str:
    """The registry prefix of a replicated type's shard: qualified name, subgroup index, shard."""
    name = subgroup_type if isinstance(subgroup_type, str) else f"{subgroup_type.__module__}.{subgroup_type.__qualname__}"
    return f"{name}-{subgroup_index}-{shard}"


FrontierProvider = Callable[[], "HLC | int"]


class PersistentRegistry:
    """The ``Persistent`` fields of one replicated object (one shard of one subgroup).

    Fans ``make_version``, ``persist``, ``trim`` and ``truncate`` out to every
    field. ``frontier`` (optional) returns the global stability frontier
    (HLC or µs): temporal queries at or after it are refused, since entries
    with earlier timestamps may still arrive.
    """

    def __init__(self, prefix: str, conf: Conf | None = None, storage: str | None = None, *,
                 frontier: FrontierProvider | None = None):
        if not prefix:
            raise ValueError("a PersistentRegistry needs a non-empty prefix")
        self.prefix = prefix
        self.conf = conf if conf is not None else Conf.load()
        self.storage = storage or self.conf.get("PERS/storage")
        self.frontier_provider = frontier
        self.serializer = self.conf.get("DERECHO/serializer", "msgpack")
        self.fields: dict[str, Persistent[Any]] = {}
        self._clock = HLCClock()
        self._current_version = INVALID_VERSION

    @classmethod
    def for_subgroup(cls, subgroup_type: type | str, subgroup_index: int = 0, shard: int = 0,
                     conf: Conf | None = None, storage: str | None = None, *,
                     frontier: FrontierProvider | None = None) -> PersistentRegistry:
        return cls(make_prefix(subgroup_type, subgroup_index, shard), conf, storage, frontier=frontier)

    def log_name(self, field: str) -> str:
        return f"{self.prefix}.{field}"

    def _register(self, field: Persistent[Any]) -> None:
        if field.name in self.fields:
            raise ValueError(f"registry {self.prefix!r} already has a field named {field.name!r}; "
                             "give each Persistent a distinct name")
        self.fields[field.name] = field
        self._current_version = max(self._current_version, field.get_current_version())

    def _unregister(self, field: Persistent[Any]) -> None:
        if self.fields.get(field.name) is field:
            del self.fields[field.name]

    def make_version(self, version: int, timestamp: HLC | int | None = None) -> HLC:
        """Append every field's current state as ``version``; returns the timestamp used.

        ``timestamp`` is an HLC or µs (Derecho uses the message's header
        timestamp); ``None`` takes the next reading of this registry's HLC.
        """
        ts = self._clock.tick() if timestamp is None else HLC.coerce(timestamp)
        for field in self.fields.values():
            field.version(version, ts)
        self._current_version = max(self._current_version, version)
        return ts

    def persist(self, version: int | None = None) -> int:
        """Make every field durable up to ``version`` (default all); returns the minimum persisted version."""
        for field in self.fields.values():
            field.persist(version)
        return self.get_minimum_latest_persisted_version()

    def get_minimum_latest_persisted_version(self) -> int:
        if not self.fields:
            return self._current_version  # nothing to persist: every version is as durable as it gets
        return min(f.get_last_persisted_version() for f in self.fields.values())

    def get_current_version(self) -> int:
        if not self.fields:
            return self._current_version
        return min(f.get_current_version() for f in self.fields.values())

    def trim(self, version: int) -> None:
        for field in self.fields.values():
            field.trim(version)

    def truncate(self, version: int) -> None:
        for field in self.fields.values():
            field.truncate(version)
        self._current_version = min(self._current_version, version)

    def get_frontier(self) -> HLC:
        """The global stability frontier, or the wall clock when there is no provider."""
        if self.frontier_provider is None:
            return HLC.coerce(None)
        return HLC.coerce(self.frontier_provider())

    def close(self) -> None:
        for field in list(self.fields.values()):
            field.close()

    def __enter__(self) -> PersistentRegistry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PersistentRegistry {self.prefix!r} fields={sorted(self.fields)}>"


# ----------------------------------------------------------------------------- fields


def _default_name(factory: Callable[[], Any]) -> str:
    qual = getattr(factory, "__qualname__", None)
    if not qual or "<lambda>" in qual or "<locals>" in qual:
        raise ValueError("give this Persistent a name: its log is found again by name after a restart, "
                         f"and {factory!r} has no stable name of its own")
    return f"{factory.__module__}.{qual}"


class Persistent(Generic[T]):
    """A field whose every version is kept in a log (spec §7.3).

    ``Persistent(factory, registry, name, storage=None)``: opens (or creates)
    the log ``registry.log_name(name)``. If it holds entries, ``.value`` is
    rebuilt from the latest; otherwise ``.value = factory()``.
    """

    def __init__(self, factory: Callable[[], T], registry: PersistentRegistry | None = None,
                 name: str | None = None, storage: str | None = None):
        self.registry = registry if registry is not None else PersistentRegistry("none")
        self.name = name or _default_name(factory)
        if self.name in self.registry.fields:
            raise ValueError(f"registry {self.registry.prefix!r} already has a field named {self.name!r}; "
                             "give each Persistent a distinct name")
        self._factory = factory
        self.storage = storage or self.registry.storage
        self.log_name = self.registry.log_name(self.name)
        self._serializer = self.registry.serializer
        self._log: LogStore | None = open_log(self.registry.conf, self.log_name, self.storage)
        try:
            self._value: T = self._rebuild_latest()
            self._current_version = self._log.latest_version
            self.registry._register(self)
        except BaseException:
            self._log.close()
            raise

    # ------------------------------------------------------------------ the current object
    @property
    def value(self) -> T:
        return self._value

    @value.setter
    def value(self, new: T) -> None:
        self._value = new

    @property
    def log(self) -> LogStore:
        if self._log is None:
            raise StorageError(f"Persistent {self.name!r} is closed")
        return self._log

    def _is_delta(self, value: Any) -> bool:
        return _supports_delta(value)

    def _rebuild_latest(self) -> T:
        log = self.log
        if not len(log):
            return self._factory()
        return self._state_at_index(log.latest_index, log.get_by_index(log.latest_index))

    def _state_at_index(self, index: int, entry: LogEntry) -> T:
        if entry.data[:1] != TAG_DELTA:
            value: T = decode_value(entry.data)
            return value
        # delta log: replay every retained delta up to this one on a fresh object
        obj = self._factory()
        for e in self.log:
            if e.index > index:
                break
            obj.apply_delta(bytes(memoryview(e.data)[1:]))  # type: ignore[attr-defined]
        return obj

    def _decode(self, entry: LogEntry) -> T:
        return self._state_at_index(entry.index, entry)

    # ------------------------------------------------------------------ writes
    def version(self, version: int, timestamp: HLC | int | None = None) -> None:
        """Log the current object as ``version`` (what the registry's ``make_version`` calls)."""
        ts = HLC.coerce(timestamp)
        value = self._value
        if self._is_delta(value):
            if version <= self.get_current_version():
                raise InvalidVersionError(f"{self.log_name}: version {version} does not follow "
                                          f"{self.get_current_version()}")
            delta = value.get_delta()  # type: ignore[attr-defined]
            if delta:
                self.log.append(version, ts, TAG_DELTA + bytes(delta))
        else:
            self.log.append(version, ts, encode_value(value, self._serializer))
        self._current_version = version

    def set(self, value: T, version: int, timestamp: HLC | int | None = None) -> None:
        """Make ``value`` current and log it as ``version``."""
        self._value = value
        self.version(version, timestamp)

    def persist(self, version: int | None = None) -> int:
        return self.log.persist(version)

    def trim(self, version: int) -> int:
        """Drop every entry with version ≤ ``version``; returns how many."""
        return self.log.trim(version)

    def truncate(self, version: int) -> int:
        """Drop every entry with version > ``version`` and roll ``.value`` back to the latest kept state."""
        dropped = self.log.truncate(version)
        self._value = self._rebuild_latest()
        self._current_version = min(self._current_version, max(version, self.log.latest_version))
        return dropped

    def close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            finally:
                self._log = None
                self.registry._unregister(self)

    # ------------------------------------------------------------------ reads
    def get(self, version: int) -> T:
        """The state at ``version``, or at the latest version before it (:class:`InvalidVersionError` if none)."""
        return self._decode(self.log.get_by_version(version))

    def __getitem__(self, version: int) -> T:
        return self.get(version)

    def get_by_index(self, index: int) -> T:
        """The state at log index ``index``; negative counts from the end (-1 = latest)."""
        return self._decode(self.log.get_by_index(index))

    def _check_stable(self, ts: HLC) -> None:
        if self.registry.frontier_provider is not None:
            frontier = self.registry.get_frontier()
            if ts >= frontier:
                raise VersionNotStableError(f"{self.log_name}: time {ts} is at or after the stability frontier "
                                            f"{frontier}; later entries may still arrive")

    def _entry_at_time(self, timestamp: HLC | int) -> LogEntry:
        ts = HLC.coerce(timestamp)
        self._check_stable(ts)
        return self.log.get_by_time(ts)

    def get_by_time(self, timestamp: HLC | int) -> T:
        """The state of the latest entry at or before ``timestamp`` (µs or HLC)."""
        return self._decode(self._entry_at_time(timestamp))

    def get_version_at_time(self, timestamp: HLC | int) -> int:
        return self._entry_at_time(timestamp).version

    def get_index_at_time(self, timestamp: HLC | int) -> int:
        return self._entry_at_time(timestamp).index

    def get_latest_version(self) -> int:
        """Version of the latest entry (-1 if none was ever logged)."""
        return self.log.latest_version

    def get_current_version(self) -> int:
        """The latest version given to this field, counting delta versions that logged nothing."""
        return max(self._current_version, self.log.latest_version)

    def get_last_persisted_version(self) -> int:
        log = self.log
        persisted = log.latest_persisted_version
        # entry-less delta versions after the last entry are as durable as that entry
        if persisted == log.latest_version and self._current_version > persisted:
            return self._current_version
        return persisted

    def get_latest_index(self) -> int:
        return self.log.latest_index

    def get_earliest_index(self) -> int:
        return self.log.earliest_index

    def get_earliest_version(self) -> int:
        return self.log.earliest_version

    def get_num_versions(self) -> int:
        return len(self.log)

    def get_previous_version_of(self, version: int) -> int:
        """The version of the entry before ``version`` (-1 if none)."""
        try:
            return self.log.get_by_version(version - 1).version
        except InvalidVersionError:
            return INVALID_VERSION

    def get_next_version_of(self, version: int) -> int:
        """The version of the entry after ``version`` (-1 if none)."""
        log = self.log
        try:
            index = log.get_by_version(version).index + 1
        except InvalidVersionError:
            index = log.earliest_index
        try:
            return log.get_by_index(index).version if index <= log.latest_index else INVALID_VERSION
        except InvalidIndexError:
            return INVALID_VERSION

    def __iter__(self) -> Iterator[tuple[int, int, T]]:
        """``(version, timestamp_us, value)`` of every retained entry, oldest first."""
        log = self.log
        if len(log) and log.get_by_index(log.earliest_index).data[:1] == TAG_DELTA:
            obj = self._factory()
            for e in log:
                obj.apply_delta(bytes(memoryview(e.data)[1:]))  # type: ignore[attr-defined]
                # a copy per version, so callers can keep them while the replay goes on
                yield e.version, e.timestamp.rtc_us, copy.deepcopy(obj)
            return
        for e in log:
            yield e.version, e.timestamp.rtc_us, decode_value(e.data)

    def __len__(self) -> int:
        return len(self.log)

    def __repr__(self) -> str:
        state = "closed" if self._log is None else f"{len(self._log)} versions"
        return f"<Persistent {self.log_name!r} ({self.storage}) {state}>"


class Volatile(Persistent[T]):
    """A ``Persistent`` kept in RAM (``storage="mem"``): versioned, gone after a restart."""

    def __init__(self, factory: Callable[[], T], registry: PersistentRegistry | None = None,
                 name: str | None = None, storage: str | None = None):
        super().__init__(factory, registry, name, storage or "mem")
