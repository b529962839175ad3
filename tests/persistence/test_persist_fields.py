"""Persistent / Volatile / PersistentRegistry, used without a group (the caller supplies versions)."""

from __future__ import annotations

import enum
import os

import msgpack
import pytest

from derecho_core import (
    HLC,
    InvalidIndexError,
    InvalidTimestampError,
    InvalidVersionError,
    LogCorruptionError,
    Persistent,
    PersistentRegistry,
    Volatile,
    VersionNotStableError,
)
from derecho_core.persistent import decode_value, encode_value, make_prefix
from derecho_core.storage import load_object, object_path, save_object

pytestmark = pytest.mark.timeout(30)


class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Account:
    def __init__(self, owner="", balance=0):
        self.owner = owner
        self.balance = balance

    def __eq__(self, other):
        return isinstance(other, Account) and vars(self) == vars(other)


class Counter:
    """A delta type: logs the increments, not the total."""

    def __init__(self):
        self.total = 0
        self._pending: list[int] = []

    def add(self, n: int) -> None:
        self.total += n
        self._pending.append(n)

    def get_delta(self) -> bytes | None:
        pending, self._pending = self._pending, []
        return msgpack.packb(pending) if pending else None

    def apply_delta(self, delta: bytes) -> None:
        self.total += sum(msgpack.unpackb(delta))


class KV:
    """Stands for a replicated type (its qualified name goes into the prefix)."""


@pytest.fixture
def registry(conf):
    reg = PersistentRegistry.for_subgroup(KV, 0, 1, conf)
    yield reg
    reg.close()


def test_prefix_and_log_names_are_stable(registry):
    assert registry.prefix == f"{__name__}.KV-0-1" == make_prefix(KV, 0, 1)
    field = Persistent(dict, registry, "store")
    assert field.log_name == f"{__name__}.KV-0-1.store"


def test_versions_and_reads(registry):
    kv = Persistent(dict, registry, "kv")
    assert kv.value == {} and kv.get_latest_version() == -1 and kv.get_latest_index() == -1
    for v in range(1, 6):
        kv.value[f"k{v}"] = v
        registry.make_version(v * 10, HLC(1000 * v, 0))
    assert kv.get(30) == {"k1": 1, "k2": 2, "k3": 3}
    assert kv[35] == kv.get(30)  # latest before
    assert kv.get_by_index(-1) == kv.value and kv.get_by_index(0) == {"k1": 1}
    assert kv.get_by_time(2500) == {"k1": 1, "k2": 2}
    assert kv.get_version_at_time(HLC(3000, 0)) == 30
    assert kv.get_index_at_time(10**12) == 4
    assert (kv.get_latest_version(), kv.get_latest_index(), kv.get_earliest_index(), kv.get_earliest_version(),
            kv.get_num_versions()) == (50, 4, 0, 10, 5)
    assert [(v, t) for v, t, _ in kv] == [(10 * i, 1000 * i) for i in range(1, 6)]
    assert kv.get_previous_version_of(30) == 20 and kv.get_next_version_of(30) == 40
    assert kv.get_next_version_of(50) == -1
    with pytest.raises(InvalidVersionError):
        kv.get(5)
    with pytest.raises(InvalidTimestampError):
        kv.get_by_time(999)
    with pytest.raises(InvalidIndexError):
        kv.get_by_index(5)
    assert kv.trim(20) == 2
    assert kv.get_earliest_index() == 2 and kv.get_by_index(2) == kv.get(30)
    with pytest.raises(InvalidVersionError):
        registry.make_version(50)


def test_temporal_queries_respect_the_stability_frontier(conf):
    frontier = [HLC(2500, 0)]
    reg = PersistentRegistry("F-0-0", conf, frontier=lambda: frontier[0])
    try:
        f = Persistent(list, reg, "l")
        for v in (1, 2, 3):
            f.value.append(v)
            reg.make_version(v, v * 1000)
        assert f.get_by_time(2000) == [1, 2]
        with pytest.raises(VersionNotStableError):
            f.get_by_time(2500)
        with pytest.raises(VersionNotStableError):
            f.get_version_at_time(HLC(2600, 0))
        frontier[0] = HLC(10**7, 0)
        assert f.get_by_time(3000) == [1, 2, 3]
        assert reg.get_frontier() == HLC(10**7, 0)
    finally:
        reg.close()


def test_restart_restores_values_whatever_the_construction_order(conf):
    reg = PersistentRegistry("R-0-0", conf)
    a, b = Persistent(dict, reg, "a"), Persistent(list, reg, "b")
    a.value["x"] = 1
    b.value.append("y")
    reg.make_version(7)
    assert reg.persist() == 7
    reg.close()
    reg = PersistentRegistry("R-0-0", conf)
    b, a = Persistent(list, reg, "b"), Persistent(dict, reg, "a")  # the other order
    assert a.value == {"x": 1} and b.value == ["y"]
    assert reg.get_current_version() == 7 and reg.get_minimum_latest_persisted_version() == 7
    reg.close()


def test_registry_fans_out_and_reports_the_minimum(conf):
    reg = PersistentRegistry("M-0-0", conf)
    try:
        p, v = Persistent(dict, reg, "p"), Volatile(dict, reg, "v")
        assert reg.persist() == -1
        for ver in (1, 2, 3):
            p.value["n"] = ver
            v.value["n"] = ver
            reg.make_version(ver)
        assert p.get_last_persisted_version() == -1
        assert reg.persist() == 3
        reg.truncate(2)
        assert p.value == {"n": 2} and v.value == {"n": 2} and reg.get_current_version() == 2
        reg.trim(1)
        assert p.get_num_versions() == v.get_num_versions() == 1
        assert sorted(reg.fields) == ["p", "v"]
    finally:
        reg.close()


def test_volatile_uses_ram_and_no_files(conf):
    reg = PersistentRegistry("V-0-0", conf)
    try:
        v = Volatile(list, reg, "cache")
        v.value.append(1)
        reg.make_version(1)
        assert v.storage == "mem" and v.get(1) == [1]
        assert not os.path.exists(conf.get("PERS/file_path")) or not os.listdir(conf.get("PERS/file_path"))
    finally:
        reg.close()


def test_per_field_storage_override(conf):
    reg = PersistentRegistry("S-0-0", conf, storage="mem")
    try:
        assert Persistent(dict, reg, "m").storage == "mem"
        assert Persistent(dict, reg, "f", storage="file").storage == "file"
    finally:
        reg.close()


def test_names_must_be_distinct_and_stable(registry):
    Persistent(dict, registry, "same")
    with pytest.raises(ValueError, match="distinct name"):
        Persistent(list, registry, "same")
    with pytest.raises(ValueError, match="give this Persistent a name"):
        Persistent(lambda: {}, registry)
    assert Persistent(dict, registry).name == "builtins.dict"  # a named factory names the field


def test_delta_types_log_changes_and_replay_them(conf):
    reg = PersistentRegistry("D-0-0", conf)
    c = Persistent(Counter, reg, "c")
    c.value.add(5)
    reg.make_version(1, 100)
    reg.make_version(2, 200)  # no change: no entry, but the version counts
    c.value.add(3)
    c.value.add(4)
    reg.make_version(3, 300)
    assert c.get_num_versions() == 2 and c.get_current_version() == 3 and c.get_latest_version() == 3
    assert c.get(1).total == 5 and c.get(2).total == 5 and c.get(3).total == 12
    assert c.get_by_time(250).total == 5
    assert [(v, x.total) for v, _, x in c] == [(1, 5), (3, 12)]
    assert c.log.get_by_version(3).data[:1] == b"D"
    with pytest.raises(InvalidVersionError):
        reg.make_version(3)
    reg.make_version(4)  # entry-less version
    assert reg.persist() == 4
    reg.close()
    reg = PersistentRegistry("D-0-0", conf)
    c = Persistent(Counter, reg, "c")
    assert c.value.total == 12
    reg.close()


def test_values_of_many_types_round_trip(registry):
    f = Persistent(dict, registry, "things")
    value = {"t": (1, 2), "s": {3}, "fs": frozenset({4}), "e": Color.BLUE, "a": Account("ann", 7),
             "b": b"\x00\xff", 5: [None, 1.5, True]}
    f.value = value
    registry.make_version(1)
    assert f.get(1) == value
    assert decode_value(encode_value(Account("bob", 1))) == Account("bob", 1)


def test_pickle_serializer(conf):
    reg = PersistentRegistry("P-0-0", conf.with_overrides({"DERECHO/serializer": "pickle"}))
    try:
        f = Persistent(dict, reg, "p")
        f.value["k"] = Account("x", 1)
        reg.make_version(1)
        assert f.log.get_by_index(0).data[:1] == b"P" and f.get(1) == {"k": Account("x", 1)}
    finally:
        reg.close()


def test_without_a_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default conf puts logs in ./.plog
    f = Persistent(list, name="standalone")
    try:
        f.value.append(1)
        f.version(1)
        f.persist()
        assert f.get(1) == [1] and (tmp_path / ".plog").is_dir()
    finally:
        f.close()


def test_saved_objects_are_atomic_and_checked(conf, tmp_path):
    assert load_object(conf, "view") is None
    save_object(conf, "view", b"one")
    save_object(conf, "view", b"two")
    assert load_object(conf, "view") == b"two"
    path = object_path(conf, "view")
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary left behind
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    with pytest.raises(LogCorruptionError, match=str(path)):
        load_object(conf, "view")
    save_object(conf, "RaggedTrim_0_0", b"rt")
    assert load_object(conf.with_overrides({"PERS/reset": True}), "RaggedTrim_0_0") is None
    assert load_object(conf, "RaggedTrim_0_0") is None  # reset deleted it
