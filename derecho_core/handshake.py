"""The connection handshake (DESIGN §7), Sans-IO: bytes in, bytes out, no sockets.

Every transport connection starts with three records, then carries frames::

    initiator                                   acceptor
    HELLO   (node id, incarnation, nonce_i,  ─►  checks magic, version, node id,
             flags, listen address, extra)       self-connection, duplicates, key
                                             ◄─  WELCOME (same fields, nonce_a,
                                                          mac_a)   or REFUSE(code, reason)
    checks version, expected node id, mac_a
    CONFIRM (mac_i)                          ─►  checks mac_i
    ── frames ──                                 ── frames ──

A **record** is ``magic (8 bytes, "DERECHO\\x00") | kind (u8) | version (u16)
| body length (u32)`` little-endian, then the body. The record header never
changes between protocol versions, so a node always understands a peer's
REFUSE and can say "version mismatch" clearly; only bodies depend on the
version. Bodies are capped at :data:`MAX_BODY`.

With a cluster key (``[DERECHO] cluster_key_file``) both ends prove they know
it: ``mac_a = HMAC-SHA256(key, "derecho/acceptor" | transcript)`` and
``mac_i = HMAC-SHA256(key, "derecho/initiator" | transcript)``, where the
transcript binds both nonces, node ids, incarnations and the version, so a
record cannot be replayed on another connection. A key on one end only is
refused with a message that says so.

A connection that reaches its own node (same node id, or the initiator reads
back its own HELLO: TCP simultaneous open on loopback) raises
:class:`~derecho_core.transport.SelfConnectionError`; the transport closes it
and retries.

``extra`` (≤ :data:`MAX_EXTRA` bytes) is free for the transport: the libfabric
plugin puts its endpoint name and memory keys there, for an out-of-band
address exchange over a TCP socket.

Use :class:`Handshake` from a transport; the ``encode_*``/``decode_record``
functions are exposed for tests and other plugins.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Callable

from .transport import (
    Address,
    AuthenticationError,
    HandshakeError,
    SelfConnectionError,
    VersionMismatchError,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "DuplicateConnectionError",
    "Handshake",
    "HandshakeRefused",
    "Hello",
    "Record",
    "REFUSE_AUTH",
    "REFUSE_DUPLICATE",
    "REFUSE_OTHER",
    "REFUSE_SELF",
    "REFUSE_VERSION",
    "RECORD_HEADER",
    "decode_record",
    "encode_confirm",
    "encode_hello",
    "encode_refuse",
    "encode_welcome",
    "load_cluster_key",
    "new_incarnation",
    "parse_hello",
]

#: Bumped whenever anything on the wire changes incompatibly.
PROTOCOL_VERSION = 1
MAGIC = b"DERECHO\x00"
RECORD_HEADER = struct.Struct("<8sBHI")  # magic, kind, version, body length
MAX_BODY = 64 * 1024
MAX_EXTRA = 16 * 1024
NONCE_LEN = 32
MAC_LEN = 32

KIND_HELLO = 1
KIND_WELCOME = 2
KIND_CONFIRM = 3
KIND_REFUSE = 4
_KINDS = {KIND_HELLO: "HELLO", KIND_WELCOME: "WELCOME", KIND_CONFIRM: "CONFIRM", KIND_REFUSE: "REFUSE"}

REFUSE_OTHER = 0
REFUSE_VERSION = 1
REFUSE_AUTH = 2
REFUSE_SELF = 3
REFUSE_DUPLICATE = 4

FLAG_HAS_KEY = 1

# HELLO / WELCOME body: node_id u32, incarnation u64, flags u16, nonce 32s, port u16, host length u8
_HELLO_FIXED = struct.Struct("<IQH32sHB")
_REFUSE_FIXED = struct.Struct("<BIH")  # code, node_id, reason length


class HandshakeRefused(HandshakeError):
    """The other end refused the handshake; ``code`` is one of the ``REFUSE_*`` values."""

    def __init__(self, message: str, *, node_id: int | None = None, code: int = REFUSE_OTHER):
        super().__init__(message, node_id=node_id)
        self.code = code


class DuplicateConnectionError(HandshakeError):
    """Both ends connected at once and this connection lost; drop it silently."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    version: int
    body: bytes

    @property
    def kind_name(self) -> str:
        return _KINDS.get(self.kind, f"kind {self.kind}")


@dataclass(frozen=True, slots=True)
class Hello:
    """The fields of a HELLO or WELCOME (``mac`` is empty in a HELLO)."""

    node_id: int
    incarnation: int
    nonce: bytes
    has_key: bool = False
    address: Address | None = None
    extra: bytes = b""
    version: int = PROTOCOL_VERSION
    mac: bytes = b""


def _record(kind: int, body: bytes, version: int) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"handshake body of {len(body)} bytes exceeds {MAX_BODY}")
    return RECORD_HEADER.pack(MAGIC, kind, version, len(body)) + body


def _hello_body(h: Hello) -> bytes:
    if not 0 <= h.node_id < 2**32:
        raise ValueError(f"node id {h.node_id} out of range")
    if len(h.nonce) != NONCE_LEN:
        raise ValueError("nonce must be 32 bytes")
    if len(h.extra) > MAX_EXTRA:
        raise ValueError(f"handshake extra of {len(h.extra)} bytes exceeds {MAX_EXTRA}")
    host, port = h.address if h.address else ("", 0)
    hb = host.encode()
    if len(hb) > 255:
        raise ValueError("host name too long")
    return (_HELLO_FIXED.pack(h.node_id, h.incarnation, FLAG_HAS_KEY if h.has_key else 0, h.nonce, port, len(hb))
            + hb + struct.pack("<H", len(h.extra)) + h.extra)


def encode_hello(h: Hello) -> bytes:
    return _record(KIND_HELLO, _hello_body(h), h.version)


def encode_welcome(h: Hello) -> bytes:
    mac = h.mac if h.mac else bytes(MAC_LEN)
    if len(mac) != MAC_LEN:
        raise ValueError("mac must be 32 bytes")
    return _record(KIND_WELCOME, _hello_body(h) + mac, h.version)


def encode_confirm(mac: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    if len(mac) != MAC_LEN:
        raise ValueError("mac must be 32 bytes")
    return _record(KIND_CONFIRM, mac, version)


def encode_refuse(code: int, node_id: int, reason: str, version: int = PROTOCOL_VERSION) -> bytes:
    rb = reason.encode("utf-8", "replace")[:4000]
    return _record(KIND_REFUSE, _REFUSE_FIXED.pack(code, node_id, len(rb)) + rb, version)


def decode_record(buf: bytes | bytearray | memoryview) -> tuple[Record, int] | None:
    """Decode one record from the start of ``buf``: ``(record, bytes consumed)``, or None if incomplete.

    Raises :class:`HandshakeError` at the first byte that proves ``buf`` is
    not a handshake (wrong magic, unknown kind, body too long).
    """
    mv = memoryview(buf)
    n = min(len(mv), len(MAGIC))
    if bytes(mv[:n]) != MAGIC[:n]:
        raise HandshakeError(f"not a derecho handshake (bad magic {bytes(mv[:n])!r})")
    if len(mv) < RECORD_HEADER.size:
        return None
    _, kind, version, length = RECORD_HEADER.unpack_from(mv)
    if kind not in _KINDS:
        raise HandshakeError(f"unknown handshake record kind {kind}")
    if length > MAX_BODY:
        raise HandshakeError(f"handshake record of absurd length {length} (max {MAX_BODY})")
    end = RECORD_HEADER.size + length
    if len(mv) < end:
        return None
    return Record(kind, version, bytes(mv[RECORD_HEADER.size:end])), end


def parse_hello(rec: Record) -> Hello:
    """The :class:`Hello` in a HELLO or WELCOME record (same protocol version only)."""
    body = rec.body
    try:
        node_id, inc, flags, nonce, port, hlen = _HELLO_FIXED.unpack_from(body)
        off = _HELLO_FIXED.size
        host = body[off:off + hlen].decode()
        off += hlen
        (elen,) = struct.unpack_from("<H", body, off)
        off += 2
        extra = body[off:off + elen]
        if len(extra) != elen:
            raise ValueError("truncated extra")
        off += elen
        mac = b""
        if rec.kind == KIND_WELCOME:
            mac = body[off:off + MAC_LEN]
            if len(mac) != MAC_LEN:
                raise ValueError("truncated mac")
            off += MAC_LEN
        if off != len(body):
            raise ValueError(f"{len(body) - off} trailing bytes")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise HandshakeError(f"malformed {rec.kind_name}: {exc}") from None
    return Hello(node_id, inc, nonce, bool(flags & FLAG_HAS_KEY), (host, port) if host or port else None,
                 extra, rec.version, mac)


def parse_refuse(rec: Record) -> tuple[int, int, str]:
    try:
        code, node_id, rlen = _REFUSE_FIXED.unpack_from(rec.body)
        reason = rec.body[_REFUSE_FIXED.size:_REFUSE_FIXED.size + rlen].decode("utf-8", "replace")
    except struct.error:
        return REFUSE_OTHER, 0, "(malformed refusal)"
    return code, node_id, reason


# ----------------------------------------------------------------------------- keys


def load_cluster_key(conf_or_path) -> bytes | None:
    """The cluster key named by ``[DERECHO] cluster_key_file`` (a Conf) or a path; None if unset.

    Surrounding whitespace is stripped. A missing or empty file is an
    :class:`AuthenticationError` (a node configured for a key must not run without one).
    """
    path = conf_or_path.get("DERECHO/cluster_key_file") if hasattr(conf_or_path, "get") else conf_or_path
    if not path:
        return None
    try:
        with open(os.fspath(path), "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise AuthenticationError(f"cannot read cluster_key_file {path!r}: {exc.strerror or exc}") from None
    if not key:
        raise AuthenticationError(f"cluster_key_file {path!r} is empty")
    return key


def new_incarnation() -> int:
    """A random 64-bit id for one transport instance: a new value tells peers this node restarted."""
    return secrets.randbits(64) or 1


def _transcript(version: int, init: Hello, acc: Hello) -> bytes:
    return struct.pack("<HIQIQ", version, init.node_id, init.incarnation, acc.node_id, acc.incarnation) + \
        init.nonce + acc.nonce


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


# ----------------------------------------------------------------------------- state machine


class Handshake:
    """One end of one connection's handshake. Feed bytes, send what it returns.

    ::

        hs = Handshake("initiator", my_id, incarnation, key=key, expected_peer=3, address=my_addr)
        sock.sendall(hs.start())
        while not hs.done:
            out = hs.receive(sock.recv(4096))   # may raise HandshakeError (send exc.reply, close)
            sock.sendall(out)
        peer = hs.peer                          # Hello of the other end
        first_frames = hs.leftover              # bytes that followed the handshake

    ``accept(peer_hello)`` (acceptor only) may return ``None`` to go on or a
    ``(code, reason)`` pair to refuse (``REFUSE_DUPLICATE`` for a connection
    that lost a simultaneous connect). On failure :meth:`receive` raises a
    :class:`HandshakeError` subclass whose ``reply`` attribute holds the bytes
    to send (best effort) before closing, so the other end learns why.
    """

    def __init__(self, role: str, node_id: int, incarnation: int, *, key: bytes | None = None,
                 expected_peer: int | None = None, address: Address | None = None, extra: bytes = b"",
                 version: int | None = None,
                 accept: Callable[[Hello], tuple[int, str] | None] | None = None):
        if role not in ("initiator", "acceptor"):
            raise ValueError("role must be 'initiator' or 'acceptor'")
        self.role = role
        self.node_id = node_id
        self.key = key
        self.expected_peer = expected_peer
        # read at call time, so a test can make a node speak another version
        self.version = PROTOCOL_VERSION if version is None else version
        self._accept = accept
        self.me = Hello(node_id, incarnation, secrets.token_bytes(NONCE_LEN), key is not None, address, extra,
                        self.version)
        self.peer: Hello | None = None
        self.done = False
        self.leftover = b""
        self._buf = bytearray()
        self._state = "start" if role == "initiator" else "wait_hello"

    def start(self) -> bytes:
        """The first bytes to send: the HELLO for an initiator, nothing for an acceptor."""
        if self.role == "initiator" and self._state == "start":
            self._state = "wait_welcome"
            return encode_hello(self.me)
        return b""

    # -- errors that tell the other end why -------------------------------------------
    def _fail(self, exc: HandshakeError, code: int | None) -> HandshakeError:
        exc.reply = encode_refuse(code, self.node_id, str(exc), self.version) if code is not None else b""  # type: ignore[attr-defined]
        self._state = "failed"
        return exc

    def _peer_label(self, h: Hello | None = None) -> str:
        h = h or self.peer
        return f"node {h.node_id}" if h else "the peer"

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Consume bytes from the peer; returns bytes to send (possibly empty)."""
        if self._state == "failed":
            raise HandshakeError("handshake already failed")
        if self.done:
            self.leftover += bytes(data)
            return b""
        self._buf += data
        out = b""
        while not self.done:
            try:
                got = decode_record(self._buf)
            except HandshakeError as exc:
                raise self._fail(exc, REFUSE_OTHER) from None
            if got is None:
                break
            rec, used = got
            del self._buf[:used]
            out += self._step(rec)
        if self.done:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return out

    def _check_version(self, rec: Record, who: str) -> None:
        if rec.version != self.version:
            msg = (f"protocol version mismatch: this node ({self.node_id}) speaks derecho wire version "
                   f"{self.version}, {who} speaks version {rec.version}; upgrade the older node")
            raise self._fail(VersionMismatchError(msg, ours=self.version, theirs=rec.version), REFUSE_VERSION)

    def _refused(self, rec: Record) -> HandshakeError:
        code, node_id, reason = parse_refuse(rec)
        msg = f"node {node_id} refused the connection: {reason}"
        self._state = "failed"
        if code == REFUSE_VERSION or rec.version != self.version:
            exc: HandshakeError = VersionMismatchError(msg, node_id=node_id, ours=self.version, theirs=rec.version)
        elif code == REFUSE_AUTH:
            exc = AuthenticationError(msg, node_id=node_id)
        elif code == REFUSE_SELF:
            exc = SelfConnectionError(msg, node_id=node_id)
        elif code == REFUSE_DUPLICATE:
            exc = DuplicateConnectionError(msg, node_id=node_id)
        else:
            exc = HandshakeRefused(msg, node_id=node_id, code=code)
        exc.reply = b""  # type: ignore[attr-defined]
        return exc

    def _step(self, rec: Record) -> bytes:
        if rec.kind == KIND_REFUSE:
            raise self._refused(rec)
        if self._state == "wait_hello":
            return self._on_hello(rec)
        if self._state == "wait_welcome":
            return self._on_welcome(rec)
        if self._state == "wait_confirm":
            return self._on_confirm(rec)
        raise self._fail(HandshakeError(f"unexpected {rec.kind_name} in state {self._state}"), REFUSE_OTHER)

    def _on_hello(self, rec: Record) -> bytes:
        if rec.kind != KIND_HELLO:
            raise self._fail(HandshakeError(f"expected HELLO, got {rec.kind_name}"), REFUSE_OTHER)
        self._check_version(rec, "the connecting node")
        h = parse_hello(rec)
        self.peer = h
        if h.node_id == self.node_id:
            raise self._fail(SelfConnectionError(
                f"connection from a node with this node's own id {h.node_id} (a connection to oneself, "
                f"or two nodes configured with the same local_id)", node_id=h.node_id), REFUSE_SELF)
        if self.key is None and h.has_key:
            raise self._fail(AuthenticationError(
                f"node {h.node_id} uses a cluster key but this node has none (set [DERECHO] cluster_key_file)",
                node_id=h.node_id), REFUSE_AUTH)
        if self.key is not None and not h.has_key:
            raise self._fail(AuthenticationError(
                f"node {h.node_id} has no cluster key; this node requires one", node_id=h.node_id), REFUSE_AUTH)
        if self._accept is not None:
            verdict = self._accept(h)
            if verdict is not None:
                code, reason = verdict
                exc_type = DuplicateConnectionError if code == REFUSE_DUPLICATE else HandshakeRefused
                exc = exc_type(reason, node_id=h.node_id)
                if isinstance(exc, HandshakeRefused):
                    exc.code = code
                raise self._fail(exc, code)
        mac = b""
        if self.key is not None:
            mac = _mac(self.key, b"derecho/acceptor", _transcript(self.version, h, self.me))
        self.me = Hello(self.me.node_id, self.me.incarnation, self.me.nonce, self.me.has_key, self.me.address,
                        self.me.extra, self.version, mac)
        self._state = "wait_confirm"
        return encode_welcome(self.me)

    def _on_welcome(self, rec: Record) -> bytes:
        if rec.kind == KIND_HELLO:
            # We read a HELLO where a WELCOME belongs: either our own bytes came back
            # (TCP simultaneous open to ourselves) or we dialed another initiator.
            if rec.version == self.version:
                h = parse_hello(rec)
                if h.node_id == self.node_id and h.nonce == self.me.nonce:
                    raise self._fail(SelfConnectionError(
                        "connected to itself (TCP simultaneous open on loopback)", node_id=self.node_id), None)
            raise self._fail(HandshakeError("expected WELCOME, got HELLO"), REFUSE_OTHER)
        if rec.kind != KIND_WELCOME:
            raise self._fail(HandshakeError(f"expected WELCOME, got {rec.kind_name}"), REFUSE_OTHER)
        self._check_version(rec, "the node it connected to")
        h = parse_hello(rec)
        self.peer = h
        if h.node_id == self.node_id:
            raise self._fail(SelfConnectionError(f"connected to a node with its own id {h.node_id}",
                                                 node_id=h.node_id), REFUSE_SELF)
        if self.expected_peer is not None and h.node_id != self.expected_peer:
            raise self._fail(HandshakeError(
                f"expected node {self.expected_peer} but node {h.node_id} answered", node_id=h.node_id),
                REFUSE_OTHER)
        if self.key is not None and not h.has_key:
            raise self._fail(AuthenticationError(
                f"node {h.node_id} has no cluster key; this node requires one", node_id=h.node_id), REFUSE_AUTH)
        if self.key is None and h.has_key:
            raise self._fail(AuthenticationError(
                f"node {h.node_id} uses a cluster key but this node has none", node_id=h.node_id), REFUSE_AUTH)
        mac_i = bytes(MAC_LEN)
        if self.key is not None:
            transcript = _transcript(self.version, self.me, h)
            if not hmac.compare_digest(h.mac, _mac(self.key, b"derecho/acceptor", transcript)):
                raise self._fail(AuthenticationError(
                    f"node {h.node_id} failed the cluster-key challenge (different key)", node_id=h.node_id),
                    REFUSE_AUTH)
            mac_i = _mac(self.key, b"derecho/initiator", transcript)
        self.done = True
        self._state = "done"
        return encode_confirm(mac_i, self.version)

    def _on_confirm(self, rec: Record) -> bytes:
        if rec.kind != KIND_CONFIRM:
            raise self._fail(HandshakeError(f"expected CONFIRM, got {rec.kind_name}"), REFUSE_OTHER)
        assert self.peer is not None
        if self.key is not None:
            want = _mac(self.key, b"derecho/initiator", _transcript(self.version, self.peer, self.me))
            if not hmac.compare_digest(rec.body, want):
                raise self._fail(AuthenticationError(
                    f"node {self.peer.node_id} failed the cluster-key challenge (different key)",
                    node_id=self.peer.node_id), REFUSE_AUTH)
        self.done = True
        self._state = "done"
        return b""
