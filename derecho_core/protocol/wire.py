"""Encoding and strict decoding of the membership protocol's messages.

Every message is a msgpack array ``[kind, ...fields]``. Decoding checks the
kind, the arity and the type of every field, so a peer's garbage becomes a
:class:`WireError` (logged, message dropped), never an exception deep inside
the state machine.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgpack

from ..errors import DerechoError

#: message kinds
SST = "sst"            # [SST, vid, {field: value}]          an SST row update from its owner
HEARTBEAT = "hb"       # [HEARTBEAT, vid]
JOIN = "join"          # [JOIN, node_id, [host, port], nonce, restart info | None]  joiner -> contact
JOIN_REPLY = "jrep"    # [JOIN_REPLY, code, leader_id, [host, port] | None, text]
WELCOME = "welcome"    # [WELCOME, view, leader_row, group id]  leader -> joiner, after the view is installed

# join reply codes, as Derecho's JoinResponseCode
OK = "OK"
ID_IN_USE = "ID_IN_USE"
LEADER_REDIRECT = "LEADER_REDIRECT"
WRONG_GROUP = "WRONG_GROUP"  # the joiner's logs belong to another group (Derecho issue #82)
JOIN_REPLY_CODES = (OK, ID_IN_USE, LEADER_REDIRECT, WRONG_GROUP)

MAX_MESSAGE = 300 << 20  # above the largest RDMC block or SMC batch a profile allows


class WireError(DerechoError):
    """A membership message that cannot be decoded or does not have the expected shape."""


def encode(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def decode(data: bytes | bytearray | memoryview) -> list[Any]:
    if len(data) > MAX_MESSAGE:
        raise WireError(f"membership message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(f"undecodable membership message: {exc}") from None
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise WireError(f"membership message is not [kind, ...]: {type(msg).__name__}")
    arity = {SST: (3,), HEARTBEAT: (2,), JOIN: (4, 5), JOIN_REPLY: (5,), WELCOME: (3, 4)}.get(msg[0])
    if arity is None:
        raise WireError(f"unknown membership message kind {msg[0]!r}")
    if len(msg) not in arity:
        raise WireError(f"{msg[0]} message has {len(msg)} fields, expected {' or '.join(map(str, arity))}")
    return msg


def decode_any(data: bytes | bytearray | memoryview) -> Any:
    """Decode any msgpack value with the size limit; garbage becomes a WireError."""
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(f"undecodable message: {exc}") from None


def check_int(value: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_ip(value: Any, what: str) -> str:
    """A numeric IPv4 address: views hold only these, so no member ever resolves a peer's host name."""
    try:
        if isinstance(value, str):
            return str(ipaddress.IPv4Address(value))
    except ValueError:
        pass
    raise WireError(f"{what} must be a numeric IPv4 address, got {value!r}")


def check_address(value: Any, what: str) -> tuple[str, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], int) or isinstance(value[1], bool) or not 0 <= value[1] <= 65535):
        raise WireError(f"{what} must be [host, port], got {value!r}")
    return value[0], value[1]
