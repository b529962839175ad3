"""State transfer to joiners: a replicated object's state and its Persistent log tails, over TCP (spec §8).

When a view adds members to a shard, the old shard leader ships each joiner
the shard's object. This module does the shipping; the group layer decides
who sends to whom and when:

- every node runs a :class:`StateTransferServer` on ``[DERECHO]
  state_transfer_port`` (``StateTransferServer.from_conf(conf)``);
- the joiner constructs the object with its factory (so its ``Persistent``
  fields have opened their local logs and registered with the
  :class:`~derecho_core.persistent.PersistentRegistry`), then calls
  ``server.expect(vid, subgroup_id, obj, registry, timeout)``, which blocks
  until the old shard leader has connected and the transfer is complete;
- the old shard leader calls :func:`send_state` once per joiner.

The object travels as a snapshot (:func:`snapshot_object`): its
``__getstate__`` with every ``Persistent`` attribute replaced by a marker that
names the field, since fields travel as log tails, not as values. The joiner
first tells the leader how much log it already holds (the minimum latest
persisted version of its registry, as Derecho does, and the same per field,
so a ``Volatile`` field does not force a full resend of the others); the
leader ships only the entries after that (``PersistentRegistry.export_log_tail``),
and the joiner merges them (``import_log_tail``) before restoring the object
(:func:`restore_object`), whose markers become the joiner's own fields.

Wire format, one TCP connection per (joiner, subgroup)::

    leader                                         joiner
    HELLO  {vid, subgroup, node, nonce_l}     ─►   held until expect(vid, subgroup)
                                              ◄─   READY {node, nonce_j, min, fields: {name: version}}
    HEADER {snapshot, total, upto, fields}    ─►   checks the fields, truncates its logs
    DATA   ... (the stream, ≤ 1 MiB a frame)  ─►   appends entries as they arrive
    END    {entries, bytes}                   ─►   persists, rebuilds, restores the object
                                              ◄─   ACK (or ERROR {error})

A frame is ``magic "DRST" | kind u8 | flags u8 | length u32`` (little
endian), the payload, and, with a cluster key (``[DERECHO]
cluster_key_file``), an HMAC-SHA256 over a label, the direction, both nonces,
a per-direction sequence number, the header and the payload, so frames cannot
be forged, reordered or replayed on another connection. The stream in the
DATA frames is the snapshot followed by one record per log entry:
``field index u32 | version i64 | hlc rtc i64 | hlc logic i64 | length u64``
and the entry's data. Control payloads are msgpack maps, checked field by
field. A REFUSE frame (never authenticated: it can only end a transfer) tells
a sender why its HELLO was turned away (wrong key, no key, too many pending).

Failures raise :class:`StateTransferError` ("Node X failed during state
transfer of subgroup S: ..."); each socket wait is bounded by the caller's
``timeout``, and nothing a peer sends can stop the server's thread.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import pickle
import secrets
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import msgpack

from .errors import DerechoError
from .persistent import (
    TAG_PICKLE,
    LogTail,
    Persistent,
    PersistentRegistry,
    TailEntry,
    UndecodableValue,
    decode_value,
    encode_value,
)
from .storage import HLC, StorageError

if TYPE_CHECKING:
    from .conf import Conf

__all__ = [
    "PersistentFieldRef",
    "StateTransferError",
    "StateTransferServer",
    "restore_object",
    "send_state",
    "snapshot_object",
]

log = logging.getLogger("derecho.state_transfer")

PROTOCOL_VERSION = 1
MAGIC = b"DRST"
FRAME = struct.Struct("<4sBBI")  # magic, kind, flags, payload length
FLAG_MAC = 1
MAC_LEN = 32
CHUNK = 1 << 20  # DATA frames carry at most this much of the stream
MAX_FRAME = 4 << 20  # no frame payload is longer (control frames are small; DATA ≤ CHUNK)
MAX_REFUSE = 4096
ENTRY = struct.Struct("<IqqqQ")  # field index, version, hlc rtc, hlc logic, data length
NONCE_LEN = 32
PROGRESS_BYTES = 8 << 20  # a progress bar (or log lines) for tails larger than this

K_HELLO, K_READY, K_HEADER, K_DATA, K_END, K_ACK, K_ERROR, K_REFUSE = range(1, 9)
_KIND_NAMES = {K_HELLO: "HELLO", K_READY: "READY", K_HEADER: "HEADER", K_DATA: "DATA", K_END: "END",
               K_ACK: "ACK", K_ERROR: "ERROR", K_REFUSE: "REFUSE"}
_LEADER, _JOINER = b"L", b"J"


class StateTransferError(DerechoError):
    """A state transfer failed: the peer died, timed out, sent garbage, failed the key check, or refused.

    ``node_id`` is the peer (None when unknown), ``subgroup_id`` and ``vid``
    identify the transfer.
    """

    def __init__(self, message: str, *, node_id: int | None = None, subgroup_id: int | None = None,
                 vid: int | None = None):
        super().__init__(message)
        self.node_id = node_id
        self.subgroup_id = subgroup_id
        self.vid = vid


class _ProtocolError(Exception):
    """What went wrong on the wire; turned into a StateTransferError that names the peer and subgroup."""


class _Refused(_ProtocolError):
    pass


class _PeerError(_ProtocolError):
    """The peer reported a failure of its own (an ERROR frame)."""


class _LocalProblem(Exception):
    """Something this node refuses in what arrived (not the sender's failure)."""


# ----------------------------------------------------------------------------- object snapshots


class PersistentFieldRef:
    """The marker a snapshot holds in place of a ``Persistent`` attribute: the field's name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __getstate__(self) -> str:
        return self.name

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, str):
            raise TypeError(f"a Persistent field marker holds a name, not a {type(state).__name__}")
        self.name = state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PersistentFieldRef) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("PersistentFieldRef", self.name))

    def __repr__(self) -> str:
        return f"PersistentFieldRef({self.name!r})"


_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, AttributeError, pickle.PicklingError)


def snapshot_object(obj: Any, serializer: str = "msgpack") -> bytes:
    """The state of ``obj`` for a joiner: ``obj.__getstate__()``, its Persistent attributes as markers.

    Encoded with :func:`~derecho_core.persistent.encode_value` (msgpack, or
    pickle when ``serializer == "pickle"``). Only a dict state (the default,
    ``__dict__``) has its ``Persistent``/``Volatile`` values replaced, by a
    :class:`PersistentFieldRef` naming the field (``field.name``); any other
    state is encoded unchanged. A value the codec cannot encode raises
    ``TypeError`` naming the attribute and the type.
    """
    state = obj.__getstate__()
    if isinstance(state, dict):
        state = {k: (PersistentFieldRef(v.name) if isinstance(v, Persistent) else v) for k, v in state.items()}
    try:
        return encode_value(state, serializer)
    except _ENCODE_ERRORS as exc:
        where = type(obj).__qualname__
        if isinstance(state, dict):
            for k, v in state.items():
                try:
                    encode_value(v, serializer)
                except _ENCODE_ERRORS as inner:
                    raise TypeError(f"cannot snapshot {where}.{k} for state transfer: {inner}") from exc
        raise TypeError(f"cannot snapshot a {where} for state transfer: {exc}") from exc


def restore_object(obj: Any, data: bytes, registry: PersistentRegistry | None, *,
                   allow_pickle: bool = False) -> None:
    """Give ``obj`` (made by its factory on the joiner) the state in ``data`` (from :func:`snapshot_object`).

    Each field marker becomes the joiner's own field ``registry.fields[name]``
    (:class:`StateTransferError` names a field the registry lacks). Then
    ``obj.__setstate__(state)`` if the class has one, else
    ``obj.__dict__.update(state)``. A pickled snapshot is refused unless
    ``allow_pickle`` (decoding pickle runs code).
    """
    state = decode_value(data, allow_pickle=allow_pickle)
    if isinstance(state, dict):
        fields = registry.fields if registry is not None else {}
        for k, v in list(state.items()):
            if isinstance(v, PersistentFieldRef):
                if v.name not in fields:
                    has = f"has the fields {sorted(fields)}" if registry is not None else "has no PersistentRegistry"
                    raise StateTransferError(
                        f"cannot restore {type(obj).__qualname__}.{k}: it is the Persistent field {v.name!r}, "
                        f"and this node {has}; construct the object with its factory (with this registry) "
                        "before the transfer")
                state[k] = fields[v.name]
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    elif isinstance(state, dict):
        obj.__dict__.update(state)
    elif isinstance(state, (tuple, list)) and len(state) == 2:  # (dict state, slots state), as copyreg makes
        for part in state:
            for k, v in (part or {}).items():
                setattr(obj, k, v)
    else:
        raise TypeError(f"cannot restore a {type(obj).__qualname__} from a {type(state).__name__} state: "
                        "give the class __setstate__")


# ----------------------------------------------------------------------------- frames


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _ProtocolError(f"connection closed by the peer (after {got} of {n} bytes of a frame)")
        got += k
    return buf


def _send_parts(sock: socket.socket, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


class _Channel:
    """Framing and per-frame HMAC over one socket. Raises _ProtocolError on any trouble."""

    def __init__(self, sock: socket.socket, key: bytes | None, role: bytes):
        self.sock = sock
        self.key = key
        self.role = role
        self.peer_role = _JOINER if role == _LEADER else _LEADER
        self.session = b""
        self.send_seq = 0
        self.recv_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def _mac(self, direction: bytes, seq: int, header: bytes | bytearray, payload: Any) -> bytes:
        assert self.key is not None
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        h.update(b"derecho/state-transfer/1" + direction + self.session + seq.to_bytes(8, "little"))
        h.update(header)
        h.update(payload)
        return h.digest()

    def send(self, kind: int, payload: bytes | bytearray | memoryview) -> None:
        flags = FLAG_MAC if self.key else 0
        header = FRAME.pack(MAGIC, kind, flags, len(payload))
        parts: list[Any] = [header, payload]
        if self.key:
            parts.append(self._mac(self.role, self.send_seq, header, payload))
        self.send_seq += 1
        try:
            _send_parts(self.sock, parts)
        except TimeoutError:
            raise _ProtocolError("timed out sending (the peer stopped reading)") from None
        except OSError as exc:
            raise _ProtocolError(f"connection lost while sending: {exc.strerror or exc}") from None
        self.bytes_sent += sum(len(p) for p in parts)

    def send_map(self, kind: int, payload: dict[str, Any]) -> None:
        self.send(kind, msgpack.packb(payload, use_bin_type=True))

    def send_refuse(self, reason: str) -> None:
        data = reason.encode()[:MAX_REFUSE]
        _send_parts(self.sock, [FRAME.pack(MAGIC, K_REFUSE, 0, len(data)), data])

    def recv(self, *expected: int) -> tuple[int, bytearray]:
        try:
            header = _recv_exact(self.sock, FRAME.size)
            magic, kind, flags, length = FRAME.unpack(header)
            if magic != MAGIC:
                raise _ProtocolError(f"garbage: not a state-transfer frame (starts {bytes(header[:8])!r})")
            if kind not in _KIND_NAMES:
                raise _ProtocolError(f"garbage: unknown frame kind {kind}")
            if kind == K_REFUSE:
                if length > MAX_REFUSE:
                    raise _ProtocolError(f"garbage: a {length}-byte refusal")
                reason = bytes(_recv_exact(self.sock, length)).decode("utf-8", "replace")
                raise _Refused(f"refused: {reason}")
            if length > MAX_FRAME:
                raise _ProtocolError(f"garbage: a {length}-byte {_KIND_NAMES[kind]} frame (limit {MAX_FRAME})")
            if self.key and not flags & FLAG_MAC:
                raise _ProtocolError("the peer sent a frame without a MAC: it has no cluster key but this node "
                                     "has one (set the same [DERECHO] cluster_key_file on every node)")
            if not self.key and flags & FLAG_MAC:
                raise _ProtocolError("the peer uses a cluster key but this node has none (set the same "
                                     "[DERECHO] cluster_key_file on every node)")
            payload = _recv_exact(self.sock, length + (MAC_LEN if self.key else 0))
        except TimeoutError:
            raise _ProtocolError("timed out waiting for data") from None
        except OSError as exc:
            raise _ProtocolError(f"connection lost: {exc.strerror or exc}") from None
        if self.key:
            mac = bytes(payload[length:])
            del payload[length:]
            if not hmac.compare_digest(mac, self._mac(self.peer_role, self.recv_seq, header, payload)):
                raise _ProtocolError(f"a {_KIND_NAMES[kind]} frame failed the cluster-key check (wrong key, "
                                     "or the data was altered)")
        self.recv_seq += 1
        self.bytes_received += FRAME.size + len(payload) + (MAC_LEN if self.key else 0)
        if kind == K_ERROR:
            raise _PeerError(str(_decode_map(payload, "ERROR").get("error", "an unspecified error")))
        if expected and kind not in expected:
            want = " or ".join(_KIND_NAMES[k] for k in expected)
            raise _ProtocolError(f"unexpected {_KIND_NAMES[kind]} frame (expected {want})")
        return kind, payload

    def recv_map(self, kind: int) -> dict[str, Any]:
        return _decode_map(self.recv(kind)[1], _KIND_NAMES[kind])

    def send_error(self, message: str, linger: float = 2.0) -> None:
        """Tell the peer why this end gives up (best effort: it may be gone).

        Then read and drop what the peer still sends for up to ``linger``
        seconds, until it closes: closing with unread data would reset the
        connection, and the peer would see "connection reset" instead of the
        reason.
        """
        try:
            self.sock.settimeout(1.0)
            self.send_map(K_ERROR, {"error": message[:MAX_REFUSE]})
            self.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + linger
            while (left := end - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    break
        except Exception:
            pass

    def check_peer(self) -> None:
        """While only sending: raise if the peer has already said something (an ERROR) or hung up."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            raise _ProtocolError("connection lost") from None
        if readable:
            kind, _ = self.recv()
            raise _ProtocolError(f"unexpected {_KIND_NAMES[kind]} frame while sending")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _decode_map(payload: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise _ProtocolError(f"garbage: undecodable {what} frame ({exc})") from None
    if not isinstance(value, dict):
        raise _ProtocolError(f"garbage: the {what} frame holds a {type(value).__name__}, not a map")
    return value


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = m.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _ProtocolError(f"garbage: the {what} frame's {key!r} is {value!r}")
    return value


def _get_int(m: dict[str, Any], key: str, what: str, lo: int = -(1 << 63), hi: int = (1 << 63) - 1) -> int:
    value: int = _get(m, key, int, what)
    if not lo <= value <= hi:
        raise _ProtocolError(f"garbage: the {what} frame's {key!r} is {value} (outside [{lo}, {hi}])")
    return value


# ----------------------------------------------------------------------------- the stream in DATA frames


class _StreamWriter:
    """Cuts the stream into DATA frames of CHUNK bytes, without copying large pieces twice."""

    def __init__(self, chan: _Channel, progress: _Progress):
        self.chan = chan
        self.progress = progress
        self.buf = bytearray()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self.written += len(mv)
        if self.buf:
            take = min(len(mv), CHUNK - len(self.buf))
            self.buf += mv[:take]
            mv = mv[take:]
            if len(self.buf) < CHUNK:
                return
            self._emit(self.buf)
            self.buf = bytearray()
        while len(mv) >= CHUNK:
            self._emit(mv[:CHUNK])
            mv = mv[CHUNK:]
        if len(mv):
            self.buf += mv

    def _emit(self, chunk: bytes | bytearray | memoryview) -> None:
        self.chan.check_peer()  # a joiner that gave up says why before it closes
        self.chan.send(K_DATA, chunk)
        self.progress.update(len(chunk))

    def flush(self) -> None:
        if self.buf:
            self._emit(self.buf)
            self.buf = bytearray()


class _StreamReader:
    """Reads the announced number of stream bytes out of DATA frames; never more."""

    def __init__(self, chan: _Channel, total: int, progress: _Progress):
        self.chan = chan
        self.total = total
        self.remaining = total  # announced bytes not yet read by the caller
        self.unreceived = total  # announced bytes not yet received in DATA frames
        self.buffered = memoryview(b"")
        self.progress = progress

    def _next_frame(self) -> None:
        _, payload = self.chan.recv(K_DATA)
        if len(payload) > self.unreceived:
            raise _ProtocolError(f"garbage: more stream data than the {self.total} bytes announced")
        self.unreceived -= len(payload)
        if not payload:
            raise _ProtocolError("garbage: an empty DATA frame")
        self.buffered = memoryview(payload)
        self.progress.update(len(payload))

    def read(self, n: int) -> bytes:
        if n > self.remaining:
            raise _ProtocolError(f"garbage: the stream needs {n} more bytes but only {self.remaining} of the "
                                 f"{self.total} announced remain")
        self.remaining -= n
        if len(self.buffered) >= n:
            out = bytes(self.buffered[:n])
            self.buffered = self.buffered[n:]
            return out
        parts = bytearray(self.buffered)
        self.buffered = memoryview(b"")
        while len(parts) < n:
            self._next_frame()
            take = min(n - len(parts), len(self.buffered))
            parts += self.buffered[:take]
            self.buffered = self.buffered[take:]
        return bytes(parts)


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar on a terminal, else a log line (at ``level``) per ~10%, for streams over PROGRESS_BYTES."""

    def __init__(self, total: int, label: str, enabled: bool, level: int = logging.INFO):
        self.total = total
        self.label = label
        self.level = level
        self.done = 0
        self.bar: Any = None
        self.next_report = 0
        self.active = enabled and total > PROGRESS_BYTES
        if self.active and sys.stderr is not None and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]

                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None
        self.next_report = total // 10

    def update(self, n: int) -> None:
        self.done += n
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_report and self.done < self.total:
            log.log(self.level, "%s: %d%% (%.1f of %.1f MiB)", self.label, self.done * 100 // self.total,
                     self.done / (1 << 20), self.total / (1 << 20))
            self.next_report = (self.done * 10 // self.total + 1) * self.total // 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- sender (old shard leader)


def _connect(address: tuple[str, int], deadline: float) -> socket.socket:
    """Connect, retrying refusals (the joiner may still be starting) until ``deadline``."""
    delay = 0.02
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _ProtocolError(f"could not connect to {address[0]}:{address[1]} before the timeout")
        try:
            sock = socket.create_connection(address, timeout=left)
        except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError):
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)
            continue
        except TimeoutError:
            raise _ProtocolError(f"connecting to {address[0]}:{address[1]} timed out") from None
        except OSError as exc:
            raise _ProtocolError(f"cannot connect to {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        if sock.getsockname() == sock.getpeername():  # TCP simultaneous open with ourselves (DESIGN §7)
            sock.close()
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def send_state(address: tuple[str, int], vid: int, subgroup_id: int, my_id: int, obj: Any,
               registry: PersistentRegistry | None, upto_version: int | None, key: bytes | None,
               timeout: float, progress: bool = True, *, serializer: str | None = None) -> int:
    """Ship ``obj`` and its log tails to the joiner whose state-transfer server listens at ``address``.

    Runs on the old shard leader. Connects (retrying while the joiner's port
    refuses, up to ``timeout``), sends HELLO, waits up to ``timeout`` for the
    joiner's ``expect`` to answer with the versions it holds, then sends the
    snapshot and every entry with ``joiner's version < version <= upto_version``
    (``None``: up to each field's current version) and waits for the joiner's
    acknowledgement. ``timeout`` bounds each wait (connect, each read and
    write), not the whole transfer. ``serializer`` defaults to the registry's
    (else msgpack). Returns the bytes sent on the wire. Raises
    :class:`StateTransferError` if the joiner refuses, dies, times out or
    reports a failure; ``TypeError`` if the object cannot be encoded (the joiner
    is told why first).
    """
    serializer = serializer or (registry.serializer if registry is not None else "msgpack")
    deadline = time.monotonic() + timeout
    peer: str = f"at {address[0]}:{address[1]}"
    joiner_id: int | None = None

    def failure(what: str) -> StateTransferError:
        return StateTransferError(f"Node {peer} failed during state transfer of subgroup {subgroup_id}: {what} "
                                  f"(view {vid})", node_id=joiner_id, subgroup_id=subgroup_id, vid=vid)

    try:
        sock = _connect(address, deadline)
    except _ProtocolError as exc:
        raise failure(str(exc)) from None
    chan = _Channel(sock, key, _LEADER)
    started = time.monotonic()
    bar: _Progress | None = None
    try:
        sock.settimeout(timeout)
        nonce_l = secrets.token_bytes(NONCE_LEN)
        chan.send_map(K_HELLO, {"v": PROTOCOL_VERSION, "vid": vid, "sg": subgroup_id, "node": my_id,
                                "nonce": nonce_l})
        chan.session = nonce_l
        try:
            ready = chan.recv_map(K_READY)
        except _ProtocolError as exc:
            if "timed out" in str(exc):
                raise _ProtocolError(f"no answer to the HELLO within {timeout:g} s (it did not expect subgroup "
                                     f"{subgroup_id} of view {vid} in time)") from None
            raise
        node = ready.get("node")
        if isinstance(node, int) and not isinstance(node, bool):
            joiner_id, peer = node, f"{node} ({address[0]}:{address[1]})"
        if _get_int(ready, "v", "READY") != PROTOCOL_VERSION:
            raise _ProtocolError(f"it speaks state-transfer protocol {ready['v']}, this node {PROTOCOL_VERSION}")
        nonce_j = _get(ready, "nonce", bytes, "READY")
        if len(nonce_j) != NONCE_LEN:
            raise _ProtocolError("garbage: the READY frame's nonce has the wrong length")
        held_min = _get_int(ready, "min", "READY")
        held = _get(ready, "fields", dict, "READY")
        for k, v in held.items():
            if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool):
                raise _ProtocolError(f"garbage: the READY frame's fields hold {k!r}: {v!r}")
        chan.session = nonce_l + nonce_j

        tail: LogTail | None = None
        if registry is not None:
            after = {name: held.get(name, held_min) for name in registry.fields}
            tail = registry.export_log_tail(after, upto_version)
        try:
            snapshot = snapshot_object(obj, serializer)
        except TypeError as exc:
            chan.send_error(f"the leader (node {my_id}) cannot encode the object: {exc}")
            raise
        fields = tail.fields if tail is not None else []
        total = len(snapshot) + sum(f.num_entries * ENTRY.size + f.num_bytes for f in fields)
        chan.send_map(K_HEADER, {
            "snapshot": len(snapshot), "total": total, "serializer": serializer,
            "upto": upto_version, "fields": [[f.name, f.after_version, f.current_version, f.num_entries,
                                               f.num_bytes] for f in fields]})
        bar = _Progress(total, f"sending subgroup {subgroup_id} to node {peer}", progress, logging.DEBUG)
        writer = _StreamWriter(chan, bar)
        writer.write(snapshot)
        del snapshot
        count = 0
        if tail is not None:
            index_of = {f.name: i for i, f in enumerate(fields)}
            for entry in tail:
                writer.write(ENTRY.pack(index_of[entry.field], entry.version, entry.timestamp.rtc_us,
                                        entry.timestamp.logic, len(entry.data)))
                writer.write(entry.data)
                count += 1
        writer.flush()
        if writer.written != total:  # only a bug in a store could do this: the joiner would refuse it anyway
            raise _ProtocolError(f"the tail changed while it was sent ({writer.written} bytes, not {total})")
        chan.send_map(K_END, {"entries": count, "bytes": total})
        chan.recv(K_ACK)
        elapsed = time.monotonic() - started
        log.info("sent subgroup %d (view %d) to node %s: %d log entries, %.1f MiB in %.2f s", subgroup_id, vid,
                 peer, count, chan.bytes_sent / (1 << 20), elapsed)
        return chan.bytes_sent
    except _PeerError as exc:
        raise failure(f"it reported: {exc}") from None
    except _ProtocolError as exc:
        raise failure(str(exc)) from None
    except StorageError as exc:  # the log changed under the tail (e.g. trimmed meanwhile)
        chan.send_error(f"the leader (node {my_id}) could not read its logs: {exc}")
        raise StateTransferError(f"state transfer of subgroup {subgroup_id} (view {vid}) to node {peer}: "
                                 f"cannot read the logs: {exc}", node_id=joiner_id, subgroup_id=subgroup_id,
                                 vid=vid) from exc
    finally:
        if bar is not None:
            bar.close()
        chan.close()


# ----------------------------------------------------------------------------- receiver (every node)


@dataclass
class _Held:
    chan: _Channel
    peer: tuple[str, int]
    vid: int
    subgroup_id: int
    leader: int
    nonce: bytes
    since: float = field(default_factory=time.monotonic)


class StateTransferServer:
    """Listens on the state-transfer port; :meth:`expect` receives one subgroup's state.

    ``StateTransferServer(host, port, key)`` binds at once (``port`` 0 picks a
    free one: see :attr:`port`) and starts a daemon thread that accepts
    connections and reads each one's HELLO (checking the cluster key) on a
    short-lived thread of its own. A valid connection is held until
    :meth:`expect` asks for its (vid, subgroup), for at most ``hold_timeout``
    seconds; at most ``max_pending`` connections are greeted or held at once.
    ``node_id`` (optional) is told to leaders, for their messages;
    ``serializer`` is this node's ``[DERECHO] serializer`` when :meth:`expect`
    gets no registry (a pickled snapshot is refused unless it is ``pickle``).
    """

    def __init__(self, host: str, port: int, key: bytes | None = None, *, node_id: int | None = None,
                 serializer: str = "msgpack", hold_timeout: float = 60.0, hello_timeout: float = 10.0,
                 max_pending: int = 64):
        self.host = host
        self.key = key
        self.node_id = node_id
        self.serializer = serializer
        self.hold_timeout = hold_timeout
        self.hello_timeout = hello_timeout
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held: dict[tuple[int, int], list[_Held]] = {}
        # the newest view whose state this node asked for: it installs views in order, so a transfer
        # for an older view can never be received, and holding it would stall its sender (whose
        # delivery thread waits for its transfers) for hold_timeout
        self._newest_vid = -1
        self._refusals: collections.deque[str] = collections.deque(maxlen=32)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise OSError(exc.errno, f"cannot listen on the state-transfer port {host}:{port} ({exc.strerror}); "
                          "another process may use it: pick another DERECHO/state_transfer_port") from None
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"state_transfer-{self.port}", daemon=True)
        self._thread.start()

    @classmethod
    def from_conf(cls, conf: Conf, host: str | None = None, **kwargs: Any) -> StateTransferServer:
        """The server of this node: ``[DERECHO] local_ip`` (or ``host``), ``state_transfer_port``, the cluster key."""
        from .handshake import load_cluster_key

        return cls(host if host is not None else conf.get("DERECHO/local_ip"), conf.get("DERECHO/state_transfer_port"),
                   load_cluster_key(conf), node_id=conf.get("DERECHO/local_id"),
                   serializer=conf.get("DERECHO/serializer", "msgpack"), **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ----------------------------------------------------------------- accepting and greeting
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                self._expire()
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._closing.is_set():
                        return
                    time.sleep(0.05)  # e.g. EMFILE: let connections close, then go on
                    continue
                if not self._slots.acquire(blocking=False):
                    log.warning("state-transfer port: too many pending connections; refused %s:%d", *peer[:2])
                    self._refuse(conn, "too many pending state transfers at this node")
                    continue
                threading.Thread(target=self._greet, args=(conn, peer), daemon=True,
                                 name=f"state_transfer_greet-{self.port}").start()
            except Exception:  # never let the listener die
                log.exception("state-transfer listener: unexpected error (continuing)")

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        try:
            conn.settimeout(1.0)
            data = reason.encode()[:MAX_REFUSE]
            _send_parts(conn, [FRAME.pack(MAGIC, K_REFUSE, 0, len(data)), data])
        except OSError:
            pass
        finally:
            conn.close()

    def _greet(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        held = False
        chan = _Channel(conn, self.key, _JOINER)
        try:
            conn.settimeout(self.hello_timeout)
            try:
                _, payload = chan.recv(K_HELLO)
                hello = _decode_map(payload, "HELLO")
                if _get_int(hello, "v", "HELLO") != PROTOCOL_VERSION:
                    raise _ProtocolError(f"it speaks state-transfer protocol {hello['v']}, this node "
                                         f"{PROTOCOL_VERSION}")
                vid = _get_int(hello, "vid", "HELLO")
                sg = _get_int(hello, "sg", "HELLO", 0)
                leader = _get_int(hello, "node", "HELLO", 0)
                nonce = _get(hello, "nonce", bytes, "HELLO")
                if len(nonce) != NONCE_LEN:
                    raise _ProtocolError("garbage: the HELLO frame's nonce has the wrong length")
            except _ProtocolError as exc:
                reason = str(exc)
                log.warning("state-transfer port: connection from %s:%d refused: %s", peer[0], peer[1], reason)
                with self._lock:
                    self._refusals.append(f"{peer[0]}:{peer[1]}: {reason}")
                try:
                    chan.send_refuse(reason)
                except OSError:  # it hung up (or reset) first: nobody left to tell
                    pass
                return
            chan.session = nonce
            with self._cond:
                if self._closing.is_set():
                    return
                newest = self._newest_vid
                if vid >= newest:
                    self._held.setdefault((vid, sg), []).append(_Held(chan, peer, vid, sg, leader, nonce))
                    held = True
                    self._cond.notify_all()
            if not held:
                self._refuse_stale(chan, peer, leader, vid, sg, newest)
                return
            log.debug("state-transfer port: node %d (%s:%d) is ready to send subgroup %d of view %d",
                      leader, peer[0], peer[1], sg, vid)
        except Exception:
            log.exception("state-transfer port: unexpected error greeting %s:%d (connection closed)", *peer[:2])
        finally:
            if not held:
                chan.close()
                self._slots.release()

    @staticmethod
    def _refuse_stale(chan: _Channel, peer: tuple[str, int], leader: int, vid: int, sg: int, newest: int) -> None:
        reason = (f"this node is receiving the state of view {newest}; a transfer for view {vid} can never be "
                  "received (it was removed and rejoined meanwhile)")
        log.info("state-transfer port: refused node %d's (%s:%d) transfer of subgroup %d: %s", leader, peer[0],
                 peer[1], sg, reason)
        try:
            chan.send_refuse(reason)
        except OSError:
            pass

    def _expire(self) -> None:
        now = time.monotonic()
        expired: list[_Held] = []
        with self._lock:
            for k in list(self._held):
                keep: list[_Held] = []
                for h in self._held[k]:
                    (expired if now - h.since > self.hold_timeout else keep).append(h)
                if keep:
                    self._held[k] = keep
                else:
                    del self._held[k]
        for h in expired:
            log.warning("state-transfer port: node %d offered subgroup %d of view %d, but no transfer was "
                        "expected within %.0f s; connection closed", h.leader, h.subgroup_id, h.vid,
                        self.hold_timeout)
            h.chan.close()
            self._slots.release()

    def _take(self, key: tuple[int, int], deadline: float) -> _Held | None:
        with self._cond:
            while True:
                if self._closing.is_set():
                    raise StateTransferError("the state-transfer server is closed", subgroup_id=key[1], vid=key[0])
                pending = self._held.get(key)
                if pending:
                    h = pending.pop(0)
                    if not pending:
                        del self._held[key]
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
        self._slots.release()
        return h

    @staticmethod
    def _is_dead(sock: socket.socket) -> bool:
        """True when the peer hung up (or sent something) before it was asked to go on."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    # ----------------------------------------------------------------- receiving
    def expect(self, vid: int, subgroup_id: int, obj: Any, registry: PersistentRegistry | None, timeout: float,
               progress: bool = True) -> None:
        """Receive subgroup ``subgroup_id``'s state for view ``vid`` into ``obj`` and ``registry``.

        Blocks until the old shard leader has connected (up to ``timeout``
        seconds) and the transfer is complete; afterwards each read waits at
        most ``timeout``. Before calling, construct ``obj`` with its factory so
        its Persistent fields have opened their logs in ``registry``. Tells
        the leader ``registry.get_minimum_latest_persisted_version()`` (and
        each field's latest persisted version), merges the log tails it sends
        (``import_log_tail``: truncate, append, persist, rebuild ``.value``),
        then restores the object (:func:`restore_object`). A connection that
        fails before the leader's HEADER (a dead or replayed HELLO) is dropped
        and the wait goes on; a failure after it raises
        :class:`StateTransferError` at once.
        """
        deadline = time.monotonic() + timeout
        last_problem = ""
        stale: list[_Held] = []
        with self._cond:
            if vid > self._newest_vid:
                self._newest_vid = vid
                for key in [k for k in self._held if k[0] < vid]:
                    stale += self._held.pop(key)
        for old in stale:
            self._refuse_stale(old.chan, old.peer, old.leader, old.vid, old.subgroup_id, vid)
            old.chan.close()
            self._slots.release()
        while True:
            h = self._take((vid, subgroup_id), deadline)
            if h is None:
                raise StateTransferError(self._timeout_message(vid, subgroup_id, timeout, last_problem),
                                         subgroup_id=subgroup_id, vid=vid)
            try:
                if self._is_dead(h.chan.sock):
                    last_problem = f"node {h.leader} connected but hung up before the transfer began"
                    log.info("state transfer of subgroup %d (view %d): %s; waiting for another connection",
                             subgroup_id, vid, last_problem)
                    h.chan.close()
                    continue
                header = self._begin(h, registry, timeout)
            except _PeerError as exc:
                h.chan.close()
                raise StateTransferError(f"Node {h.leader} failed during state transfer of subgroup {subgroup_id}: "
                                         f"it reported: {exc} (view {vid})", node_id=h.leader,
                                         subgroup_id=subgroup_id, vid=vid) from None
            except _ProtocolError as exc:
                last_problem = f"node {h.leader} ({h.peer[0]}:{h.peer[1]}) connected but {exc}"
                log.warning("state transfer of subgroup %d (view %d): %s; waiting for another connection",
                            subgroup_id, vid, last_problem)
                h.chan.close()
                continue
            except BaseException:
                h.chan.close()
                raise
            try:
                self._receive(h, header, obj, registry, timeout, progress)
            finally:
                h.chan.close()
            return

    def _timeout_message(self, vid: int, subgroup_id: int, timeout: float, last_problem: str) -> str:
        msg = f"state transfer of subgroup {subgroup_id} (view {vid}): no leader completed a connection within " \
              f"{timeout:g} s"
        if last_problem:
            msg += f"; {last_problem}"
        with self._lock:
            refusals = list(self._refusals)
        if refusals:
            msg += f"; connections refused meanwhile: {refusals[-1]}" + (
                f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else "")
        return msg

    def _begin(self, h: _Held, registry: PersistentRegistry | None, timeout: float) -> dict[str, Any]:
        """READY out, HEADER in. _ProtocolError here means 'try another connection'."""
        chan = h.chan
        chan.sock.settimeout(timeout)
        nonce_j = secrets.token_bytes(NONCE_LEN)
        if registry is not None:
            held_min = registry.get_minimum_latest_persisted_version()
            held = {name: f.get_last_persisted_version() for name, f in registry.fields.items()}
        else:
            held_min, held = -1, {}
        chan.send_map(K_READY, {"v": PROTOCOL_VERSION, "node": self.node_id, "nonce": nonce_j, "min": held_min,
                                "fields": held})
        chan.session = h.nonce + nonce_j
        try:
            return chan.recv_map(K_HEADER)
        except _PeerError:
            raise
        except _ProtocolError as exc:
            raise _ProtocolError(f"its transfer did not start: {exc}") from None

    def _receive(self, h: _Held, header: dict[str, Any], obj: Any, registry: PersistentRegistry | None,
                 timeout: float, progress: bool) -> None:
        chan, sg, vid = h.chan, h.subgroup_id, h.vid
        started = time.monotonic()

        def peer_failed(what: str) -> StateTransferError:
            return StateTransferError(f"Node {h.leader} failed during state transfer of subgroup {sg}: {what} "
                                      f"(view {vid})", node_id=h.leader, subgroup_id=sg, vid=vid)

        def local_failure(what: str) -> StateTransferError:
            chan.send_error(f"node {self.node_id if self.node_id is not None else 'joiner'} could not take the "
                            f"state: {what}")
            return StateTransferError(f"state transfer of subgroup {sg} (view {vid}) from node {h.leader} failed "
                                      f"on this node: {what}", node_id=h.leader, subgroup_id=sg, vid=vid)

        serializer = registry.serializer if registry is not None else self.serializer
        allow_pickle = serializer == "pickle"
        try:
            snap_len = _get_int(header, "snapshot", "HEADER", 0)
            total = _get_int(header, "total", "HEADER", 0)
            sent_serializer = _get(header, "serializer", str, "HEADER")
            fields_raw = _get(header, "fields", list, "HEADER")
            fields: list[tuple[str, int, int, int, int]] = []
            for f in fields_raw:
                if (not isinstance(f, list) or len(f) != 5 or not isinstance(f[0], str)
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in f[1:])):
                    raise _ProtocolError(f"garbage: a HEADER field entry {f!r}")
                fields.append((f[0], f[1], f[2], f[3], f[4]))
            n_entries = sum(f[3] for f in fields)
            if any(f[3] < 0 or f[4] < 0 for f in fields) or \
                    snap_len + n_entries * ENTRY.size + sum(f[4] for f in fields) != total:
                raise _ProtocolError("garbage: the HEADER's sizes do not add up")
        except _ProtocolError as exc:
            raise peer_failed(str(exc)) from None
        if sent_serializer == "pickle" and not allow_pickle:
            raise local_failure("the leader sends pickle, but this node's serializer is msgpack (decoding pickle "
                                "from a peer runs its code; set [DERECHO] serializer = pickle on every node)")
        names = [f[0] for f in fields]
        if fields and registry is None:
            raise local_failure(f"the leader sends log tails of the Persistent fields {names}, but this node has "
                                "no PersistentRegistry for the subgroup")
        if registry is not None:
            missing = [n for n in names if n not in registry.fields]
            if missing:
                raise local_failure(f"the leader has the Persistent field {missing[0]!r}, which this node's "
                                    f"registry {registry.prefix!r} lacks (it has {sorted(registry.fields)})")
            extra = sorted(set(registry.fields) - set(names))
            if extra:
                log.warning("state transfer of subgroup %d: the leader sent no log of the field(s) %s", sg, extra)

        bar = _Progress(total, f"state transfer of subgroup {sg} from node {h.leader}", progress)
        reader = _StreamReader(chan, total, bar)
        received = 0

        def entries() -> Iterator[TailEntry]:
            nonlocal received
            while received < n_entries:
                idx, version, rtc, logic, length = ENTRY.unpack(reader.read(ENTRY.size))
                if idx >= len(fields):
                    raise _ProtocolError(f"garbage: an entry of field #{idx} (the HEADER announced {len(fields)})")
                data = reader.read(length)
                if data[:1] == TAG_PICKLE and not allow_pickle:
                    raise _LocalProblem("the leader sent a pickled log entry, but this node's serializer is msgpack")
                received += 1
                yield TailEntry(fields[idx][0], version, HLC(rtc, logic), data)

        try:
            try:
                snapshot = reader.read(snap_len)
                if registry is not None and fields:
                    registry.import_log_tail({f[0]: f[1] for f in fields}, entries(), fields=names,
                                             current_versions={f[0]: f[2] for f in fields})
                if reader.remaining:
                    raise _ProtocolError(f"garbage: {reader.remaining} announced bytes were not entries")
                end = chan.recv_map(K_END)
                if _get_int(end, "entries", "END") != n_entries or _get_int(end, "bytes", "END") != total:
                    raise _ProtocolError("garbage: the END frame's counts differ from the HEADER's")
            finally:
                bar.close()
        except _PeerError as exc:
            raise peer_failed(f"it reported: {exc}") from None
        except _ProtocolError as exc:
            raise peer_failed(f"{exc} (after {bar.done} of {total} bytes)") from None
        except _LocalProblem as exc:
            raise local_failure(str(exc)) from None
        except (StorageError, UndecodableValue) as exc:
            raise local_failure(f"{type(exc).__name__}: {exc}") from exc
        try:
            restore_object(obj, snapshot, registry, allow_pickle=allow_pickle)
        except StateTransferError as exc:
            raise local_failure(str(exc)) from None
        except Exception as exc:
            raise local_failure(f"cannot restore the object: {type(exc).__name__}: {exc}") from exc
        try:
            chan.send_map(K_ACK, {})
        except _ProtocolError as exc:
            raise peer_failed(f"the state arrived but the acknowledgement could not be sent: {exc}") from None
        log.info("received subgroup %d (view %d) from node %d: %d log entries, %.1f MiB in %.2f s", sg, vid,
                 h.leader, n_entries, chan.bytes_received / (1 << 20), time.monotonic() - started)

    def close(self) -> None:
        """Stop listening and drop held connections; a waiting :meth:`expect` raises."""
        self._closing.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._cond:
            held = [h for hs in self._held.values() for h in hs]
            self._held.clear()
            self._cond.notify_all()
        for h in held:
            h.chan.close()
            self._slots.release()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def __enter__(self) -> StateTransferServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StateTransferServer {self.host}:{self.port}>"

