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
import sys
import types
import importlib
import pickle
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, NamedTuple, TypeVar

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

_EXT_OBJECT, _EXT_TUPLE, _EXT_SET, _EXT_FROZENSET, _EXT_ENUM, _EXT_BIGINT = 1, 2, 3, 4, 5, 6
MAX_EXT_DEPTH = 64  # ext values (tuples, sets, objects...) nested deeper than this are refused on decode
_ext_depth = threading.local()

# things with no state worth sending: encoding them would only fail later, on the receiver
_STATELESS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
              types.GeneratorType, types.CoroutineType)


# ----------------------------------------------------------------------------- value codec


class UndecodableValue(DerechoError):
    """A stored value whose type cannot be imported here (``derecho log`` then shows hex)."""


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_type(name: str) -> type:
    module_name, _, qual = name.partition(":")
    untrusted = getattr(_ext_depth, "untrusted", False)
    try:
        if untrusted:
            # bytes from a peer name this type: never import a module for them (importing runs code), and
            # never rebuild the standard library's classes (locks, processes, files, partials: not data)
            top = module_name.partition(".")[0]
            if top in sys.stdlib_module_names or top == "builtins":
                raise UndecodableValue(f"a peer sent a value of type {name!r}: standard-library classes "
                                       "are not accepted from the network; send plain data")
            obj: Any = sys.modules.get(module_name)
            if obj is None:
                raise UndecodableValue(f"a peer sent a value of type {name!r}, whose module is not imported "
                                       "here; import it before the group starts (the network never imports)")
        else:
            obj = importlib.import_module(module_name)
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
    if type(obj) is int:  # beyond msgpack's 64 bits
        return msgpack.ExtType(_EXT_BIGINT, str(obj).encode())
    if isinstance(obj, _STATELESS):
        raise TypeError(f"cannot store a {type(obj).__name__} ({obj!r:.60}): only data can be sent or stored")
    if "<locals>" in type(obj).__qualname__:
        raise TypeError(f"cannot store a {type(obj).__qualname__}: a class defined inside a function "
                        "cannot be imported again to decode it; define it at module level")
    getstate = getattr(obj, "__getstate__", None)
    own_state = getattr(type(obj), "__getstate__", None) is not getattr(object, "__getstate__", None)
    if getstate is None or (not own_state and not hasattr(obj, "__dict__") and not hasattr(obj, "__slots__")):
        # every object has object.__getstate__ since Python 3.11; one without a __dict__ or __slots__
        # (a lock, a socket, a C type) would arrive as an empty shell
        raise TypeError(f"cannot store a {type(obj).__name__}: it has no state Python can read; "
                        "give it __getstate__/__setstate__")
    return msgpack.ExtType(_EXT_OBJECT, _packb([type_name(type(obj)), getstate()]))


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_pack_default, strict_types=True, use_bin_type=True)
    return packed


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_BIGINT:
        return int(bytes(data).decode("ascii"))
    # every nested ext value is a nested msgpack.unpackb, ~36 KB of C stack each: a peer's few hundred
    # bytes of nesting would overflow the thread's stack (a segfault), so the nesting is bounded
    depth = getattr(_ext_depth, "n", 0)
    if depth >= MAX_EXT_DEPTH:
        raise ValueError(f"values nested more than {MAX_EXT_DEPTH} ext levels deep")
    _ext_depth.n = depth + 1
    try:
        inner = _unpackb(data)
    finally:
        _ext_depth.n = depth
    if code == _EXT_TUPLE:
        return tuple(inner)
    if code == _EXT_SET:
        return set(inner)
    if code == _EXT_FROZENSET:
        return frozenset(inner)
    if code == _EXT_ENUM:
        cls = _import_type(inner[0])
        if not issubclass(cls, enum.Enum):  # calling any other class with a peer's argument runs code
            raise UndecodableValue(f"stored type {inner[0]!r} is not an enum")
        return cls(inner[1])
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


def decode_value(data: bytes, *, allow_pickle: bool = True, untrusted: bool = False) -> Any:
    """The value of a payload made by :func:`encode_value` (raises :class:`UndecodableValue`).

    ``untrusted`` (bytes from the network): a type named in the data is only
    looked up among modules already imported, and never in the standard library.
    """
    tag, body = data[:1], memoryview(data)[1:]
    try:
        if tag == TAG_MSGPACK:
            if untrusted:
                _ext_depth.untrusted = True
                try:
                    return _unpackb(body)
                finally:
                    _ext_depth.untrusted = False
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

    def export_log_tail(self, after_version: int | Mapping[str, int],
                         upto_version: int | None = None) -> LogTail:
        """The entries of every field with ``after_version < version <= upto_version`` (state transfer, sender side).

        ``after_version`` is one version for every field (Derecho ships the tail
        after the joiner's ``get_minimum_latest_persisted_version()``) or a
        ``{field name: version}`` map (a field missing from it is shipped whole);
        it is capped at ``upto_version`` (or at the field's current version when
        ``upto_version`` is None), so a receiver holding more than this node drops
        the excess. Counting the bytes reads every shipped entry once; the entries
        themselves are read again, one at a time, when the tail is iterated.
        """
        tails = []
        for name, field in self.fields.items():
            after = after_version.get(name, INVALID_VERSION) if isinstance(after_version, Mapping) else after_version
            current = field.get_current_version()
            cap = current if upto_version is None else min(upto_version, current)
            after = min(after, cap)
            start, end = _tail_range(field, after, upto_version)
            log = field.log
            nbytes = sum(len(log.get_by_index(i).data) for i in range(start, end))
            tails.append(FieldTail(name, after, cap, start, end, nbytes))
        return LogTail(self, tails, upto_version)

    def import_log_tail(self, after_version: int | Mapping[str, int],
                         entries: Iterable[TailEntry | tuple[str, int, HLC | int, bytes | bytearray | memoryview]], *,
                         fields: Iterable[str] | None = None, current_versions: Mapping[str, int] | None = None) -> int:
        """Merge a log tail made by :meth:`export_log_tail` into this registry's logs (state transfer, joiner side).

        ``fields`` names the fields the sender shipped (default: the keys of an
        ``after_version`` map, else every field here); each must exist here, or
        :class:`LogTailError` names the one missing, before any log is touched.
        Each of them is first truncated to its ``after_version`` (what this node
        holds beyond it is dropped), then every entry is appended with its
        original version and timestamp (persisting every 32 MiB), the logs are persisted, and each field's
        ``.value`` is rebuilt from its latest entry. ``entries`` may be a generator
        that reads from a socket: it is consumed once, in order. If it raises, the
        entries appended so far stay (they are a prefix of the sender's tail),
        each field's ``.value`` is rebuilt from its log, and the error propagates.
        ``current_versions`` (the sender's :attr:`FieldTail.current_version`)
        restores the current version of delta fields whose last versions logged
        nothing. Returns the number of entries appended.
        """
        if fields is not None:
            names = list(fields)
        elif isinstance(after_version, Mapping):
            names = list(after_version)
        else:
            names = list(self.fields)
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise LogTailError(f"registry {self.prefix!r} has no Persistent field named {missing[0]!r} (it has "
                               f"{sorted(self.fields)}); the sender's replicated type declares fields this node's "
                               "factory did not create")
        afters = {n: (after_version.get(n, INVALID_VERSION) if isinstance(after_version, Mapping) else after_version)
                  for n in names}
        targets = {n: self.fields[n] for n in names}
        for name, field in targets.items():
            field.truncate(afters[name])
        self._current_version = min(self._current_version, max(afters.values(), default=self._current_version))
        count = unpersisted = 0
        try:
            for item in entries:
                name, version, timestamp, data = item
                target = targets.get(name)
                if target is None:
                    raise LogTailError(f"registry {self.prefix!r}: the log tail holds an entry of field {name!r}, "
                                       f"which is not among the fields it announced ({sorted(targets)})")
                if version <= afters[name]:
                    raise LogTailError(f"{target.log_name}: the log tail holds version {version}, not after "
                                       f"{afters[name]}")
                target.log.append(version, HLC.coerce(timestamp), data)
                count += 1
                unpersisted += len(data)
                if unpersisted >= _IMPORT_PERSIST_BYTES:  # a transfer cut short resumes from here next time
                    for f in targets.values():
                        f.persist()
                    unpersisted = 0
            for field in targets.values():
                field.persist()
        except BaseException:
            for field in targets.values():  # keep each .value in step with what its log now holds
                try:
                    field._value = field._rebuild_latest()
                    field._current_version = max(field._current_version, field.log.latest_version)
                except Exception:  # the original error matters more than this one
                    pass
            raise
        for name, field in targets.items():
            field._value = field._rebuild_latest()
            field._current_version = max(field._current_version, field.log.latest_version)
            if current_versions is not None and name in current_versions:
                field._current_version = max(field._current_version, current_versions[name])
            self._current_version = max(self._current_version, field.get_current_version())
        return count

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


# ----------------------------------------------------------------------------- log tails (state transfer)
#
# A joiner that already holds a prefix of a shard's logs only needs what comes after it. The old shard leader
# exports, per field, the entries with ``after < version <= upto`` (``PersistentRegistry.export_log_tail``); the
# joiner drops whatever it holds beyond ``after`` and appends those entries with their original versions and
# timestamps (``PersistentRegistry.import_log_tail``). derecho_core.state_transfer carries them over TCP.


#: import_log_tail persists after this many bytes, so a long transfer cut short keeps a durable prefix
_IMPORT_PERSIST_BYTES = 32 << 20


class LogTailError(StorageError):
    """A log tail that does not fit this registry: an unknown field, or versions out of order."""


class TailEntry(NamedTuple):
    """One entry of a log tail: the field's name and the entry as the leader's log holds it."""

    field: str
    version: int
    timestamp: HLC
    data: bytes


class FieldTail(NamedTuple):
    """The part of one field's log that a :class:`LogTail` ships."""

    name: str
    after_version: int  # the receiver truncates its log to this version first
    current_version: int  # the sender's current version of the field (delta versions without entries count)
    start_index: int  # first log index shipped
    end_index: int  # one past the last log index shipped
    num_bytes: int  # total length of the entries' data

    @property
    def num_entries(self) -> int:
        return self.end_index - self.start_index


def _tail_range(field: Persistent[Any], after_version: int, upto_version: int | None) -> tuple[int, int]:
    """Log indexes ``[start, end)`` of the entries with ``after_version < version <= upto_version``."""
    log = field.log
    if not len(log):
        return log.next_index, log.next_index
    try:
        start = log.get_by_version(after_version).index + 1
    except InvalidVersionError:  # every retained entry is after it
        start = log.earliest_index
    end = log.next_index
    if upto_version is not None:
        try:
            end = log.get_by_version(upto_version).index + 1
        except InvalidVersionError:
            end = log.earliest_index
    return start, max(start, end)


class LogTail:
    """The log tails of a registry's fields, read lazily: iterate for the :class:`TailEntry` items.

    Made by :meth:`PersistentRegistry.export_log_tail`. The index range of each
    field is fixed when the tail is made, so entries appended afterwards are not
    shipped; trimming a field while the tail is read raises the log's
    :class:`InvalidIndexError`. Iteration reads one entry at a time from the log
    (under the log's lock), so a tail of any size streams in constant memory.
    """

    def __init__(self, registry: PersistentRegistry, fields: list[FieldTail], upto_version: int | None):
        self.registry = registry
        self.fields = fields
        self.upto_version = upto_version

    @property
    def total_bytes(self) -> int:
        """Total length of the entries' data (for progress reports)."""
        return sum(f.num_bytes for f in self.fields)

    @property
    def num_entries(self) -> int:
        return sum(f.num_entries for f in self.fields)

    def __iter__(self) -> Iterator[TailEntry]:
        for ft in self.fields:
            log = self.registry.fields[ft.name].log
            for index in range(ft.start_index, ft.end_index):
                e = log.get_by_index(index)
                yield TailEntry(ft.name, e.version, e.timestamp, e.data)

    def __repr__(self) -> str:
        return f"<LogTail {self.registry.prefix!r} {self.num_entries} entries, {self.total_bytes} bytes>"
