"""RPC messages on the wire, and the serializer of arguments, replies and state (DESIGN §7).

An ordered call is the payload of a cooked multicast: ``[tag, invocation id, args]``.
A p2p request travels point to point on channel ``Q``: ``[subgroup id, tag,
invocation id, args]``. Replies travel on channel ``R`` in batches: a list of
``[kind, invocation id, status, body]``. ``args`` and a successful reply's
body are serializer output; a failed reply's body is ``[exception type,
message]``. Every decoder checks shapes and types and raises
:class:`RpcWireError` for anything else: a peer's bytes never crash a node.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import DerechoError
from ..persistent import UndecodableValue, decode_value, encode_value

CH_REQUEST = b"Q"
CH_REPLY = b"R"

ORDERED = 0
P2P = 1

OK = 0
RAISED = 1

U64 = (1 << 64) - 1


class RpcWireError(DerechoError, ValueError):
    """A malformed RPC message from a peer (dropped, logged)."""


class SerializationError(DerechoError, TypeError):
    """A value cannot be sent: its type has no encoding under the group's serializer."""


class Serializer:
    """msgpack by default (no code runs on decode); pickle only when ``DERECHO/serializer = pickle``."""

    def __init__(self, kind: str = "msgpack") -> None:
        if kind not in ("msgpack", "pickle"):
            raise ValueError(f"unknown serializer {kind!r}: use msgpack or pickle")
        self.kind = kind

    def dumps(self, value: Any, what: str = "value") -> bytes:
        try:
            return encode_value(value, self.kind)
        except TypeError as exc:
            raise SerializationError(f"cannot send this {what}: {exc}. Give the type __getstate__/__setstate__ "
                                     "(state made of msgpack types), or set DERECHO/serializer = pickle if "
                                     "every peer is trusted") from None

    def loads(self, data: bytes | memoryview) -> Any:
        try:
            return decode_value(bytes(data), allow_pickle=self.kind == "pickle", untrusted=True)
        except UndecodableValue as exc:
            raise RpcWireError(f"cannot decode an RPC value: {exc}") from None


def _int(value: Any, what: str, lo: int = 0, hi: int = U64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RpcWireError(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.60}")
    return value


def _bin(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise RpcWireError(f"{what} must be bytes, got {type(value).__name__}")
    return value


def _unpack(data: Any, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise RpcWireError(f"{what} is not valid msgpack: {exc}") from None


def encode_ordered(tag: int, invocation_id: int, args: bytes) -> bytes:
    packed: bytes = msgpack.packb([tag, invocation_id, args], use_bin_type=True)
    return packed


def decode_ordered(data: Any) -> tuple[int, int, bytes]:
    msg = _unpack(data, "an ordered RPC call")
    if not isinstance(msg, list) or len(msg) != 3:
        raise RpcWireError("an ordered RPC call must be [tag, invocation id, args]")
    return _int(msg[0], "tag"), _int(msg[1], "invocation id"), _bin(msg[2], "args")


def encode_request(subgroup_id: int, tag: int, invocation_id: int, args: bytes) -> bytes:
    packed: bytes = msgpack.packb([subgroup_id, tag, invocation_id, args], use_bin_type=True)
    return CH_REQUEST + packed


def decode_request(data: Any) -> tuple[int, int, int, bytes]:
    msg = _unpack(data, "a p2p request")
    if not isinstance(msg, list) or len(msg) != 4:
        raise RpcWireError("a p2p request must be [subgroup id, tag, invocation id, args]")
    return (_int(msg[0], "subgroup id", 0, 1 << 32), _int(msg[1], "tag"), _int(msg[2], "invocation id"),
            _bin(msg[3], "args"))


Reply = tuple[int, int, int, Any]  # kind, invocation id, status, body


def encode_replies(replies: list[Reply]) -> bytes:
    packed: bytes = msgpack.packb(replies, use_bin_type=True)
    return CH_REPLY + packed


def decode_replies(data: Any) -> list[Reply]:
    msg = _unpack(data, "an RPC reply batch")
    if not isinstance(msg, list):
        raise RpcWireError("an RPC reply batch must be a list")
    out: list[Reply] = []
    for item in msg:
        if not isinstance(item, list) or len(item) != 4:
            raise RpcWireError("an RPC reply must be [kind, invocation id, status, body]")
        kind = _int(item[0], "reply kind", 0, 1)
        inv = _int(item[1], "invocation id")
        status = _int(item[2], "reply status", 0, 1)
        body = item[3]
        if status == OK:
            _bin(body, "reply value")
        elif not (isinstance(body, list) and len(body) == 2 and all(isinstance(x, str) for x in body)):
            raise RpcWireError("a failed reply's body must be [exception type, message]")
        out.append((kind, inv, status, body))
    return out


def exception_body(exc: BaseException, limit: int) -> list[str]:
    """``[type, message]`` of a handler's exception, the message cut to fit ``limit`` bytes."""
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    message = str(exc)
    room = max(16, limit - len(kind) - 16)
    if len(message.encode()) > room:
        message = message.encode()[:room - 3].decode(errors="ignore") + "..."
    return [kind, message]
