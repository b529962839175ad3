"""The RPC layer's pure parts: tags, method tables, the wire format and the serializer."""

from __future__ import annotations

import enum

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derecho_core import ordered, p2p, rpc_name
from derecho_core.rpc import methods, wire
from derecho_core.rpc.methods import RpcDefinitionError, UnknownMethodError, method_table, resolve
from derecho_core.rpc.query_results import DeadlockError, PendingResults, QueryResults


class Store:
    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    @ordered
    def put(self, key: str, value: int) -> None:
        self.data[key] = value

    @ordered
    @p2p
    def contains(self, key: str) -> bool:
        return key in self.data

    @p2p
    def get(self, key: str) -> int | None:
        return self.data.get(key)

    def plain(self) -> None:
        pass


class Color(enum.Enum):
    RED = 1


def test_rpc_name_is_the_unsigned_64_bit_mmh3_of_the_name() -> None:
    import mmh3

    assert rpc_name("put") == mmh3.hash64(b"put", signed=False)[0]
    assert 0 <= rpc_name("a") < 1 << 64 and rpc_name("a") != rpc_name("b")
    with pytest.raises(TypeError):
        rpc_name("")


def test_decorated_methods_still_work_as_methods() -> None:
    s = Store()
    s.put("k", 3)
    assert s.contains("k") and s.get("k") == 3
    assert Store.put.__name__ == "put"


def test_method_table_modes_and_inheritance() -> None:
    table = {m.name: m for m in method_table(Store).values()}
    assert set(table) == {"put", "contains", "get"}
    assert table["contains"].ordered and table["contains"].p2p
    assert table["put"].ordered and not table["put"].p2p

    class Sub(Store):
        def get(self, key: str) -> int | None:  # a plain override hides the RPC
            return None

        @ordered
        def extra(self) -> int:
            return 1

    names = {m.name for m in method_table(Sub).values()}
    assert names == {"put", "contains", "extra"}


@pytest.mark.parametrize("spec", [Store.put, "put", rpc_name("put")])
def test_resolve_accepts_method_name_or_tag(spec: object) -> None:
    assert resolve(Store, spec, mode="ordered").name == "put"


def test_resolve_explains_wrong_mode_and_unknown_names() -> None:
    with pytest.raises(UnknownMethodError, match="not a p2p RPC target; decorate it with @p2p"):
        resolve(Store, "put", mode="p2p")
    with pytest.raises(UnknownMethodError, match=r"no ordered RPC method 'plain'.*\['contains', 'put'\]"):
        resolve(Store, "plain", mode="ordered")
    with pytest.raises(TypeError):
        resolve(Store, 3.5, mode="ordered")


def test_tag_collision_inside_a_class_is_refused_at_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "rpc_name", lambda name: 42)
    with pytest.raises(RuntimeError) as info:
        class Clash:
            @ordered
            def one(self) -> None: ...

            @ordered
            def two(self) -> None: ...
    assert isinstance(info.value.__cause__, RpcDefinitionError)
    assert "same RPC tag 42" in str(info.value.__cause__)


def test_staticmethods_are_refused() -> None:
    with pytest.raises(RpcDefinitionError, match="plain method"):
        ordered(staticmethod(lambda: None))  # type: ignore[arg-type]


def test_serializer_round_trips_and_names_what_it_cannot_encode() -> None:
    s = wire.Serializer()
    value = [1, "x", b"y", (1, 2), {"k": [None, 2.5]}, {3, 4}, Color.RED]
    assert s.loads(s.dumps(value)) == value
    with pytest.raises(wire.SerializationError, match="lock"):
        import threading

        s.dumps(threading.Lock(), "argument list")


def test_pickle_serializer_only_when_configured() -> None:
    blob = wire.Serializer("pickle").dumps(Color.RED)
    assert wire.Serializer("pickle").loads(blob) is Color.RED
    with pytest.raises(wire.RpcWireError, match="pickle"):
        wire.Serializer("msgpack").loads(blob)


def test_request_and_reply_round_trip() -> None:
    data = wire.encode_request(3, rpc_name("get"), 9, b"args")
    assert data[:1] == wire.CH_REQUEST
    assert wire.decode_request(data[1:]) == (3, rpc_name("get"), 9, b"args")
    replies: list[wire.Reply] = [(wire.ORDERED, 1, wire.OK, b"v"), (wire.P2P, 2, wire.RAISED, ["KeyError", "k"])]
    assert wire.decode_replies(wire.encode_replies(replies)[1:]) == [tuple(r) for r in replies]
    assert wire.decode_ordered(wire.encode_ordered(5, 6, b"z")) == (5, 6, b"z")


def test_exception_body_is_cut_to_the_reply_limit() -> None:
    body = wire.exception_body(ValueError("x" * 10_000), 200)
    assert body[0] == "ValueError" and len(body[1].encode()) < 200 and body[1].endswith("...")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_turn_garbage_into_wire_errors(data: bytes) -> None:
    for decode in (wire.decode_ordered, wire.decode_request, wire.decode_replies):
        try:
            decode(data)
        except wire.RpcWireError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
                    | st.binary(max_size=5), lambda c: st.lists(c, max_size=5), max_leaves=12))
def test_decoders_refuse_well_formed_msgpack_of_the_wrong_shape(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    for decode in (wire.decode_ordered, wire.decode_request, wire.decode_replies):
        try:
            decode(data)
        except wire.RpcWireError:
            pass


def test_waiting_for_an_ordered_call_on_the_delivery_thread_is_refused() -> None:
    pending = PendingResults("ordered", 0, 1, lambda: True)
    with pytest.raises(DeadlockError, match="would deadlock"):
        QueryResults(pending).get(timeout=1)


def test_replies_before_the_map_are_kept_and_late_ones_ignored() -> None:
    pending = PendingResults("ordered", 0, 1, lambda: False)
    assert pending.set_reply(2, "early")
    pending.fulfil_map([1, 2], version=7)
    results = QueryResults(pending)
    futures = results.get(1)
    assert futures[2].result(0) == "early" and not futures[1].done()
    assert pending.node_removed(1)
    assert not pending.set_reply(1, "late")
    with pytest.raises(Exception, match="removed"):
        futures[1].result(0)
    assert results.version == 7


def test_integers_beyond_64_bits_survive_and_stateless_objects_are_refused() -> None:
    s = wire.Serializer()
    for n in (2**64, 2**70, -(2**70), 2**64 - 1, -(2**63)):
        assert s.loads(s.dumps(n)) == n
    for bad in (len, Store, print, (x for x in ())):
        with pytest.raises(wire.SerializationError):
            s.dumps(bad)


class Point:
    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def test_values_from_peers_never_import_modules_or_rebuild_standard_library_classes() -> None:
    import collections
    import sys

    from derecho_core.persistent import _EXT_OBJECT, _packb

    s = wire.Serializer()
    assert s.loads(s.dumps([Point(1, 2)])) == [Point(1, 2)]  # an imported application class is fine
    forged = [b"M" + _packb(msgpack.ExtType(_EXT_OBJECT, _packb(["subprocess:Popen", {"pid": 1}]))),
              b"M" + _packb(msgpack.ExtType(_EXT_OBJECT, _packb(["functools:partial", None]))),
              b"M" + _packb(msgpack.ExtType(_EXT_OBJECT, _packb(["some_module_not_imported:X", {}])))]
    for blob in forged:
        with pytest.raises(wire.RpcWireError):
            s.loads(blob)
    assert "some_module_not_imported" not in sys.modules
    assert collections  # the standard library's classes are refused even when imported
