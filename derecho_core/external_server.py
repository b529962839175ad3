"""Serving external clients (spec §6.8): the member side of :class:`~derecho_core.ExternalGroupClient`.

Every member of a group with replicated types listens on ``[DERECHO]
local_ip``:``external_port`` (:meth:`ExternalServer.for_group`, called by
:class:`~derecho_core.Group` once its first view is installed). A process
outside the group connects there to fetch the view, ask for the member's
status, call ``@p2p`` methods, and receive notifications.

The protocol (this module owns it; :mod:`derecho_core.external_client` speaks
it from the other end). Plain TCP, one connection per (client, member). A
frame is::

    magic "DEXT" | version u8 | kind u8 | flags u8 | pad u8 | length u32   (little endian)
    payload: a msgpack list, then (flag MAC) a 32-byte HMAC-SHA256

With a key every frame but REFUSE carries an HMAC over a direction label,
both connection nonces, a per-direction sequence number, the header and the
payload, so frames cannot be forged, reordered, or replayed on another
connection. A REFUSE is never authenticated: it can only end a handshake. The
key is the *client key* (``[DERECHO] client_key_file``) when one is set, so
clients never hold the key that admits members; without one it is the cluster
key (``cluster_key_file``). A member with a client key refuses a client that
proves the cluster key instead. See :func:`load_client_key` and
``docs/security.md``.

The client proves the key first in its HELLO (over its own nonce), then in
every later frame (over both nonces: the HELLO alone could be a replay). The
member proves it in its WELCOME, over the client's nonce. A greeted
connection that sends no authenticated frame within ``hello_timeout`` is
closed, so a replayed HELLO cannot hold a client id.

====================  ==========  =================================================
kind                  direction   payload
====================  ==========  =================================================
HELLO (1)             C → S       [client id, nonce_c (32 bytes)]
WELCOME (2)           S → C       [member id, nonce_s (32 bytes), vid]
REFUSE (3)            S → C       [code, message]; then the member closes
GET_VIEW (4)          C → S       [request id]
VIEW (5)              S → C       [request id, View.to_bytes(), adequately provisioned]
P2P_REQUEST (6)       C → S       [subgroup id, tag, invocation id, args]
P2P_REPLY (7)         S → C       [kind, invocation id, status, body] (rpc.wire's reply)
GET_STATUS (8)        C → S       [request id]
STATUS (9)            S → C       [request id, status map]
NOTIFY (10)           S → C       [subgroup id, message (serializer bytes)]
ERROR (11)            S → C       [request id, message]
====================  ==========  =================================================

REFUSE codes: ``ID_IN_USE`` (the client id is a member's id, or another
client with that id is connected to this member), ``AUTH`` (client or cluster
key missing, unexpected or wrong), ``VERSION``, ``TOO_MANY_CLIENTS``,
``PROTOCOL``.

The member runs one selector thread for every client connection: it accepts
(at most ``max_clients`` connections; more are refused with
``TOO_MANY_CLIENTS``), reads and checks frames, answers GET_VIEW and
GET_STATUS itself, and posts each P2P_REQUEST to the delivery thread, where
:class:`~derecho_core.rpc.manager.RpcManager` runs it like a member's call and
hands the reply to :meth:`ExternalServer.reply_sink`. A client may have
``[DERECHO] p2p_window_size`` requests outstanding; beyond that the member
stops reading its socket until replies go out (TCP back-pressure). Replies and
notifications are written by the thread that produces them while the socket
takes them; the rest waits in a bounded buffer the selector thread drains (a
client that lets it grow past 64 MiB is dropped). Anything malformed closes
that one connection with a WARNING on the ``derecho.external`` logger; it never
stops the member.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable

import msgpack

from .errors import DerechoError, NodeRemovedFromGroupError
from .rpc import wire

if TYPE_CHECKING:
    from .group import Group

__all__ = [
    "CLIENT_KEY",
    "CLUSTER_KEY",
    "ExternalAuthError",
    "ExternalClientCallback",
    "ExternalClientRefusedError",
    "ExternalServer",
    "ExternalWireError",
    "FrameCodec",
    "PROTOCOL_VERSION",
    "load_client_key",
]

log = logging.getLogger("derecho.external")

PROTOCOL_VERSION = 1
MAGIC = b"DEXT"
HEADER = struct.Struct("<4sBBBxI")  # magic, version, kind, flags, pad, payload length (MAC included)
FLAG_MAC = 1
MAC_LEN = 32
NONCE_LEN = 32
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

K_HELLO, K_WELCOME, K_REFUSE, K_GET_VIEW, K_VIEW, K_P2P_REQUEST, K_P2P_REPLY, K_GET_STATUS, K_STATUS, \
    K_NOTIFY, K_ERROR = range(1, 12)
KIND_NAMES = {K_HELLO: "HELLO", K_WELCOME: "WELCOME", K_REFUSE: "REFUSE", K_GET_VIEW: "GET_VIEW", K_VIEW: "VIEW",
              K_P2P_REQUEST: "P2P_REQUEST", K_P2P_REPLY: "P2P_REPLY", K_GET_STATUS: "GET_STATUS",
              K_STATUS: "STATUS", K_NOTIFY: "NOTIFY", K_ERROR: "ERROR"}

REFUSE_ID_IN_USE = "ID_IN_USE"
REFUSE_AUTH = "AUTH"
REFUSE_VERSION = "VERSION"
REFUSE_TOO_MANY = "TOO_MANY_CLIENTS"
REFUSE_PROTOCOL = "PROTOCOL"

MAX_CLIENTS = 1024
HELLO_TIMEOUT = 10.0
MAX_HELLO_FRAME = 4096
MAX_REFUSE_FRAME = 64 * 1024
MAX_OUTBUF = 64 << 20
RECV_CHUNK = 256 * 1024

CLIENT_KEY = "DERECHO/client_key_file"
CLUSTER_KEY = "DERECHO/cluster_key_file"


def load_client_key(conf: Any) -> tuple[bytes | None, str]:
    """The key external clients prove, and the configuration key that named it.

    ``[DERECHO] client_key_file`` when set (on the members and on the clients), else
    ``cluster_key_file``; ``(None, CLUSTER_KEY)`` when neither is set. A missing or
    empty file raises :class:`~derecho_core.transport.AuthenticationError`.
    """
    from .handshake import load_cluster_key
    from .transport import AuthenticationError

    path = conf.get(CLIENT_KEY)
    if not path:
        return load_cluster_key(conf), CLUSTER_KEY
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise AuthenticationError(f"cannot read client_key_file {path!r}: {exc.strerror or exc}") from None
    if not key:
        raise AuthenticationError(f"client_key_file {path!r} is empty")
    return key, CLIENT_KEY


class ExternalWireError(DerechoError, ValueError):
    """A malformed external-client frame (the connection that carried it is closed)."""


class ExternalAuthError(ExternalWireError):
    """A frame failed the cluster-key check, or only one end has a cluster key."""


class ExternalClientRefusedError(DerechoError):
    """A member refused an external client's HELLO; ``code`` is one of the REFUSE codes (e.g. ``ID_IN_USE``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- frames (both ends)


class FrameCodec:
    """Frames of one connection, and its MAC state (nonces, sequence numbers per direction).

    ``client_side`` picks the direction labels. Until the handshake is done
    the server nonce is 32 zero bytes.
    """

    def __init__(self, key: bytes | None, *, client_side: bool, key_name: str = CLUSTER_KEY) -> None:
        self.key = key
        self.key_name = key_name  # the configuration key that holds ``key``, for messages
        self.nonce_c = b""
        self.nonce_s = b""
        self._send_label = b"derecho/external/c2s" if client_side else b"derecho/external/s2c"
        self._recv_label = b"derecho/external/s2c" if client_side else b"derecho/external/c2s"
        self._send_seq = 0
        self._recv_seq = 0

    def _mac(self, label: bytes, seq: int, header: bytes, data: bytes) -> bytes:
        assert self.key is not None
        msg = b"".join((label, self.nonce_c, self.nonce_s or bytes(NONCE_LEN), struct.pack("<Q", seq), header, data))
        return hmac.new(self.key, msg, hashlib.sha256).digest()

    def encode(self, kind: int, body: list[Any], *, authenticate: bool = True) -> bytes:
        """One frame; ``authenticate=False`` only for REFUSE."""
        data: bytes = msgpack.packb(body, use_bin_type=True)
        with_mac = self.key is not None and authenticate
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, FLAG_MAC if with_mac else 0,
                             len(data) + (MAC_LEN if with_mac else 0))
        if not with_mac:
            return header + data
        mac = self._mac(self._send_label, self._send_seq, header, data)
        self._send_seq += 1
        return header + data + mac

    @staticmethod
    def split(flags: int, payload: bytes) -> tuple[bytes, bytes | None]:
        """``(data, mac)`` of a frame's payload (``mac`` None when the frame carries none)."""
        if flags & ~FLAG_MAC:
            raise ExternalWireError(f"unknown frame flags {flags:#x}")
        if not flags & FLAG_MAC:
            return payload, None
        if len(payload) < MAC_LEN:
            raise ExternalWireError("a frame is too short for its MAC")
        return payload[:-MAC_LEN], payload[-MAC_LEN:]

    def verify(self, header: bytes, data: bytes, mac: bytes | None) -> None:
        """Check the next incoming frame's MAC (raises :class:`ExternalAuthError`)."""
        what = "client" if self.key_name == CLIENT_KEY else "cluster"
        if self.key is None:
            if mac is not None:
                raise ExternalAuthError("the peer authenticates its frames with a key, but this end has none: set "
                                        "the same DERECHO/client_key_file (or cluster_key_file) on the group and "
                                        "the client, or on neither")
            return
        if mac is None:
            raise ExternalAuthError(f"this end requires the {what} key but the peer's frames carry no MAC: set "
                                    f"{self.key_name} to the group's {what} key file")
        if not hmac.compare_digest(mac, self._mac(self._recv_label, self._recv_seq, header, data)):
            raise ExternalAuthError(f"a frame failed the {what}-key check (wrong key, or a forged or replayed "
                                    "frame)")
        self._recv_seq += 1


def parse_header(header: bytes, max_length: int) -> tuple[int, int, int, int]:
    """``(version, kind, flags, length)`` of a frame header; garbage raises :class:`ExternalWireError`."""
    magic, version, kind, flags, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ExternalWireError(f"not an external-client frame (magic {magic!r}, expected {MAGIC!r})")
    if length > max_length:
        raise ExternalWireError(f"a {KIND_NAMES.get(kind, f'kind {kind}')} frame announces {length} bytes, "
                                f"over the limit of {max_length}")
    return version, kind, flags, length


def unpack_body(data: bytes, kind: int, size: int) -> list[Any]:
    """The msgpack list of a frame of ``kind``, which must have ``size`` elements."""
    name = KIND_NAMES.get(kind, f"kind {kind}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ExternalWireError(f"a {name} frame is not valid msgpack: {exc or type(exc).__name__}") from None
    if not isinstance(body, list) or len(body) != size:
        raise ExternalWireError(f"a {name} frame must be a list of {size} elements")
    return body


def check_int(value: Any, what: str, lo: int = 0, hi: int = U64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ExternalWireError(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.60}")
    return value


def check_bytes(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise ExternalWireError(f"{what} must be bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise ExternalWireError(f"{what} must be {size} bytes, got {len(value)}")
    return value


def check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ExternalWireError(f"{what} must be a string, got {type(value).__name__}")
    return value


def check_reply(body: list[Any]) -> wire.Reply:
    """A P2P_REPLY's ``[kind, invocation id, status, body]``, checked as rpc.wire checks member replies."""
    kind = check_int(body[0], "reply kind", 0, 1)
    inv = check_int(body[1], "invocation id")
    status = check_int(body[2], "reply status", 0, 1)
    value = body[3]
    if status == wire.OK:
        check_bytes(value, "reply value")
    elif not (isinstance(value, list) and len(value) == 2 and all(isinstance(x, str) for x in value)):
        raise ExternalWireError("a failed reply's body must be [exception type, message]")
    return kind, inv, status, value


# ----------------------------------------------------------------------------- the member side


class _Garbage(Exception):
    """What a client sent cannot be served: close its connection (message for the WARNING)."""


class _Conn:
    """One client connection. The selector thread owns the read side; writes take ``lock``."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], key: bytes | None, key_name: str) -> None:
        self.sock = sock
        self.peer = peer
        self.codec = FrameCodec(key, client_side=False, key_name=key_name)
        self.lock = threading.Lock()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.client_id: int | None = None
        self.opened = time.monotonic()
        self.events = 0
        self.closing = False       # write what is buffered, then close (after a REFUSE)
        self.closed = False
        self.paused = False        # p2p window full: stop reading until replies go out
        self.outstanding = 0       # p2p requests posted, not yet answered
        self.proven = False        # sent an authenticated frame after WELCOME (a HELLO alone may be a replay)
        self.failure: str | None = None  # a writer thread's error, for the selector thread to act on
        self.failure_level = logging.INFO

    def name(self) -> str:
        who = f"external client {self.client_id}" if self.client_id is not None else "a connection"
        return f"{who} from {self.peer[0]}:{self.peer[1]}"


_LISTENER = object()
_WAKE = object()


class ExternalServer:
    """A member's server for external clients (see the module docstring for the protocol).

    ``ExternalServer(group, host, port, key=None, max_clients=1024)`` binds at
    once (``port`` 0 picks a free one: :attr:`port`) and starts its selector
    thread. :meth:`for_group` builds it from the group's configuration
    (``key`` is then the client key, or the cluster key: :func:`load_client_key`;
    ``key_name`` names the configuration key that held it, for messages).
    """

    def __init__(self, group: Group, host: str, port: int, key: bytes | None = None, *,
                 max_clients: int = MAX_CLIENTS, hello_timeout: float = HELLO_TIMEOUT,
                 key_name: str = CLUSTER_KEY) -> None:
        self.group = group
        conf = group.conf
        self.node_id: int = conf.get("DERECHO/local_id")
        self.host = host
        self.key = key
        self.key_name = key_name
        self.max_clients = max_clients
        self.hello_timeout = hello_timeout
        self._max_request: int = conf.get("DERECHO/max_p2p_request_payload_size")
        # a request frame is its args plus a few integers; a client with a larger limit than ours still gets
        # a clear error reply (not a dropped connection) for args up to twice our limit
        self._max_frame = 2 * self._max_request + 64 * 1024
        self._window: int = conf.get("DERECHO/p2p_window_size")
        self._serializer = wire.Serializer(conf.get("DERECHO/serializer"))
        self._lock = threading.Lock()
        self._clients: dict[int, _Conn] = {}   # by client id, once greeted
        self._conns: set[_Conn] = set()        # every open connection (selector thread)
        self._dirty: set[_Conn] = set()        # connections another thread wrote to or unpaused
        self._tls = threading.local()
        self._last_vid = -1
        self._closing = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            self._sel.close()
            raise OSError(exc.errno, f"cannot listen for external clients on {host}:{port} ({exc.strerror}); "
                          "another process may use it: pick another DERECHO/external_port") from None
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._run, name=f"external-{self.port}", daemon=True)
        self._thread.start()

    @classmethod
    def for_group(cls, group: Group, **kwargs: Any) -> ExternalServer:
        """The server of ``group``'s node: ``[DERECHO] local_ip``, ``external_port``, the client (or cluster) key."""
        conf = group.conf
        key, key_name = load_client_key(conf)
        return cls(group, conf.get("DERECHO/local_ip"), conf.get("DERECHO/external_port"), key,
                   key_name=key_name, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ------------------------------------------------------------------ for Group and RpcManager
    def reply_sink(self, node_id: int) -> Callable[[wire.Reply], None] | None:
        """A sender of p2p replies to client ``node_id``, or None if no such client is connected here.

        Called by the RPC layer on the delivery thread right after it ran a
        request: the reply goes to the connection that carried that request
        (and is dropped if it closed meanwhile).
        """
        serving: _Conn | None = getattr(self._tls, "conn", None)
        conn = serving if serving is not None and serving.client_id == node_id else None
        if conn is None:
            with self._lock:
                conn = self._clients.get(node_id)
        if conn is None:
            return None
        target = conn
        return lambda reply: self._send_reply(target, reply)

    def client_callback(self, subgroup_type: Hashable, index: int = 0) -> ExternalClientCallback:
        """The handle ``group.get_client_callback(T, index)`` returns."""
        return ExternalClientCallback(self, subgroup_type, index)

    def has_external_client(self, client_id: int) -> bool:
        with self._lock:
            conn = self._clients.get(client_id)
        return conn is not None and not conn.closed

    def connected_clients(self) -> list[int]:
        with self._lock:
            return sorted(self._clients)

    def close(self) -> None:
        """Stop accepting, close every client connection (their pending replies are dropped)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ writing (any thread)
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _send(self, conn: _Conn, kind: int, body: list[Any], *, authenticate: bool = True) -> bool:
        """Queue one frame to ``conn``, writing at once what the socket takes; False if it is closed."""
        on_loop = threading.current_thread() is self._thread
        with conn.lock:
            if conn.closed or conn.failure is not None or (conn.closing and authenticate):
                return False
            frame = conn.codec.encode(kind, body, authenticate=authenticate)
            if not conn.outbuf:
                try:
                    sent = conn.sock.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    conn.failure = f"writing failed: {exc}"
                    sent = len(frame)
                frame = frame[sent:]
            if frame:
                conn.outbuf += frame
                if len(conn.outbuf) > MAX_OUTBUF:
                    conn.failure = (f"it does not read what this member sends ({len(conn.outbuf)} bytes "
                                    "buffered)")
                    conn.failure_level = logging.WARNING
            notify = bool(conn.outbuf) or conn.failure is not None
        if notify and not on_loop:
            with self._lock:
                self._dirty.add(conn)
            self._wake()
        return True

    def _send_reply(self, conn: _Conn, reply: wire.Reply) -> None:
        kind, inv, status, body = reply
        self._send(conn, K_P2P_REPLY, [kind, inv, status, body])
        with conn.lock:
            conn.outstanding = max(0, conn.outstanding - 1)
            resume = conn.paused and conn.outstanding < self._window
        if resume:
            with self._lock:
                self._dirty.add(conn)
            self._wake()

    def _notify(self, client_id: int, subgroup_id: int, message: Any) -> None:
        from .rpc.manager import PayloadTooLargeError

        with self._lock:
            conn = self._clients.get(client_id)
        if conn is None or conn.closed:
            raise NodeRemovedFromGroupError(client_id, f"external client {client_id} is not connected to node "
                                            f"{self.node_id}")
        blob = self._serializer.dumps(message, "notification")
        if len(blob) > self._max_request:
            raise PayloadTooLargeError(f"a notification of {len(blob)} bytes is over "
                                       f"max_p2p_request_payload_size = {self._max_request}; raise "
                                       "DERECHO/max_p2p_request_payload_size")
        if not self._send(conn, K_NOTIFY, [subgroup_id, blob]):
            raise NodeRemovedFromGroupError(client_id, f"external client {client_id} disconnected from node "
                                            f"{self.node_id}")

    # ------------------------------------------------------------------ the selector thread
    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    events = self._sel.select(0.2)
                    for key, mask in events:
                        if key.data is _LISTENER:
                            self._accept()
                        elif key.data is _WAKE:
                            self._drain_wake()
                        else:
                            self._serve(key.data, mask)
                    self._service_dirty()
                    self._housekeeping()
                except Exception:  # never let the server thread die
                    log.exception("external-client server of node %d: unexpected error (continuing)", self.node_id)
                    time.sleep(0.05)
        finally:
            for conn in list(self._conns):
                self._drop(conn, None)
            for s in (self._listener, self._wake_r, self._wake_w):
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError, OSError):
                    pass
                s.close()
            self._sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave the rest in the backlog for now
                log.warning("external port of node %d: accept failed: %s", self.node_id, exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, (str(peer[0]), int(peer[1])), self.key, self.key_name)
            self._conns.add(conn)
            if len(self._conns) > self.max_clients:
                self._refuse(conn, REFUSE_TOO_MANY, f"node {self.node_id} already serves {self.max_clients} "
                             "external-client connections; try another member")
            self._update_interest(conn)

    def _serve(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read(conn)
        except _Garbage as exc:
            log.warning("external port of node %d: %s sent garbage (%s); connection closed", self.node_id,
                        conn.name(), exc)
            self._drop(conn, None)
        except Exception:
            log.exception("external port of node %d: serving %s failed; connection closed", self.node_id, conn.name())
            self._drop(conn, None)
        else:
            if not conn.closed:
                self._update_interest(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(conn, f"{conn.name()}: connection lost ({exc})")
            return
        if not data:
            self._drop(conn, f"{conn.name()} disconnected")
            return
        if conn.closing:
            return  # refused: read and ignore until our REFUSE is out
        conn.inbuf += data
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle every complete frame in ``conn.inbuf`` while the p2p window allows."""
        while not conn.closed and not conn.closing and not conn.paused:
            if len(conn.inbuf) < HEADER.size:
                return
            limit = MAX_HELLO_FRAME if conn.client_id is None else self._max_frame
            header = bytes(conn.inbuf[:HEADER.size])
            try:
                version, kind, flags, length = parse_header(header, limit)
            except ExternalWireError as exc:
                raise _Garbage(str(exc)) from None
            if version != PROTOCOL_VERSION:
                self._refuse(conn, REFUSE_VERSION, f"node {self.node_id} speaks external-client protocol version "
                             f"{PROTOCOL_VERSION}, the client {version}: use the same derecho-core version")
                return
            if len(conn.inbuf) < HEADER.size + length:
                return
            payload = bytes(conn.inbuf[HEADER.size:HEADER.size + length])
            del conn.inbuf[:HEADER.size + length]
            try:
                data, mac = FrameCodec.split(flags, payload)
                if conn.client_id is None:
                    self._hello(conn, kind, header, data, mac)
                else:
                    conn.codec.verify(header, data, mac)
                    conn.proven = True
                    self._request(conn, kind, data)
            except ExternalWireError as exc:
                raise _Garbage(str(exc)) from None

    def _hello(self, conn: _Conn, kind: int, header: bytes, data: bytes, mac: bytes | None) -> None:
        if kind != K_HELLO:
            raise ExternalWireError(f"the first frame must be HELLO, not {KIND_NAMES.get(kind, f'kind {kind}')}")
        body = unpack_body(data, K_HELLO, 2)
        client_id = check_int(body[0], "client id", 0, U32)
        conn.codec.nonce_c = check_bytes(body[1], "client nonce", NONCE_LEN)
        try:
            conn.codec.verify(header, data, mac)
        except ExternalAuthError:
            self._refuse(conn, REFUSE_AUTH, self._auth_failure(client_id, mac is not None))
            return
        view = self.group._engine.view
        if view is not None and client_id in view.members:
            self._refuse(conn, REFUSE_ID_IN_USE,
                         f"node {self.node_id} refused external client id {client_id}: it is the id of a member of "
                         f"the group (view {view.vid}, members {view.members}); give the client a "
                         "DERECHO/local_id that no member uses")
            return
        with self._lock:
            other = self._clients.get(client_id)
            if other is None:
                self._clients[client_id] = conn
                conn.client_id = client_id
        if other is not None:
            self._refuse(conn, REFUSE_ID_IN_USE,
                         f"node {self.node_id} refused external client id {client_id}: another external client "
                         f"with that id is connected ({other.peer[0]}:{other.peer[1]}); every client needs its "
                         "own DERECHO/local_id")
            return
        conn.codec.nonce_s = secrets.token_bytes(NONCE_LEN)
        self._send(conn, K_WELCOME, [self.node_id, conn.codec.nonce_s, view.vid if view is not None else -1])
        log.info("external port of node %d: %s connected", self.node_id, conn.name())

    def _auth_failure(self, client_id: int, has_mac: bool) -> str:
        """Why client ``client_id``'s HELLO failed the key check (for the REFUSE and the WARNING)."""
        if self.key is None:
            return (f"node {self.node_id} has no client or cluster key, but client {client_id} authenticates its "
                    "frames: set the same DERECHO/client_key_file (or cluster_key_file) on the group and the "
                    "client, or on neither")
        if self.key_name == CLIENT_KEY:
            if not has_mac:
                return (f"bad or missing client key: node {self.node_id} requires the client key, but client "
                        f"{client_id}'s frames carry no MAC: set the client's DERECHO/client_key_file to the "
                        "group's client key file")
            return (f"bad or missing client key: client {client_id}'s HELLO failed the client-key check of node "
                    f"{self.node_id}: its key is not the group's client key (DERECHO/client_key_file; a client "
                    "holding the cluster key instead is refused too)")
        if not has_mac:
            return (f"bad or missing cluster key: node {self.node_id} requires the cluster key, but client "
                    f"{client_id}'s frames carry no MAC: set the client's DERECHO/cluster_key_file to the group's "
                    "key file (or give the group and its clients a DERECHO/client_key_file)")
        return (f"bad or missing cluster key: client {client_id}'s HELLO failed the cluster-key check of node "
                f"{self.node_id}: its DERECHO/cluster_key_file holds another key than the group's")

    def _request(self, conn: _Conn, kind: int, data: bytes) -> None:
        if kind == K_P2P_REQUEST:
            body = unpack_body(data, kind, 4)
            sg = check_int(body[0], "subgroup id", 0, U32)
            tag = check_int(body[1], "tag")
            inv = check_int(body[2], "invocation id")
            blob = check_bytes(body[3], "args")
            self._p2p(conn, sg, tag, inv, blob)
        elif kind in (K_GET_VIEW, K_GET_STATUS):
            body = unpack_body(data, kind, 1)
            req = check_int(body[0], "request id")
            try:
                if kind == K_GET_VIEW:
                    view = self.group._current()
                    reply = [req, view.to_bytes(), bool(view.is_adequately_provisioned)]
                else:
                    reply = [req, self._status()]
                self._send(conn, K_VIEW if kind == K_GET_VIEW else K_STATUS, reply)
            except Exception as exc:
                self._send(conn, K_ERROR, [req, f"node {self.node_id}: {exc}"])
        else:
            raise ExternalWireError(f"a client may not send {KIND_NAMES.get(kind, f'kind {kind}')} frames")

    def _status(self) -> dict[str, Any]:
        """``group.status()`` if the group has it, else the view's vid and members; always JSON-shaped."""
        status = getattr(self.group, "status", None)
        if callable(status):
            result = status()
        else:
            view = self.group._current()
            result = {"vid": view.vid, "members": list(view.members)}
        if not isinstance(result, dict):
            raise DerechoError(f"status() returned a {type(result).__name__}, not a dict")
        # string keys and JSON values only, whatever the group put in (the client decodes strictly)
        normalized: dict[str, Any] = json.loads(json.dumps(result, default=str))
        return normalized

    def _p2p(self, conn: _Conn, sg: int, tag: int, inv: int, blob: bytes) -> None:
        if len(blob) > self._max_request:
            self._send(conn, K_P2P_REPLY, [wire.P2P, inv, wire.RAISED, [
                "PayloadTooLargeError",
                f"a p2p request of {len(blob)} bytes of arguments is over max_p2p_request_payload_size = "
                f"{self._max_request} at node {self.node_id}; raise DERECHO/max_p2p_request_payload_size "
                "(on the members and the client)"]])
            return
        with conn.lock:
            conn.outstanding += 1
            if conn.outstanding >= self._window:
                conn.paused = True
        client_id = conn.client_id
        assert client_id is not None

        def job() -> None:
            if conn.closed:
                return  # the client went away: nothing to answer
            self._tls.conn = conn
            try:
                self.group.rpc._on_request(client_id, sg, tag, inv, blob)
            finally:
                self._tls.conn = None

        self.group._post(job)

    def _refuse(self, conn: _Conn, code: str, message: str) -> None:
        if code != REFUSE_TOO_MANY:
            log.warning("external port of node %d: refused %s: %s", self.node_id, conn.name(), message)
        else:
            log.warning("external port of node %d: %s", self.node_id, message)
        self._send(conn, K_REFUSE, [code, message], authenticate=False)
        conn.closing = True
        conn.inbuf.clear()
        with self._lock:
            if conn.client_id is not None and self._clients.get(conn.client_id) is conn:
                del self._clients[conn.client_id]
        conn.client_id = None

    def _flush(self, conn: _Conn) -> None:
        with conn.lock:
            if not conn.outbuf or conn.closed:
                return
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                conn.failure = f"writing failed: {exc}"
                return
            del conn.outbuf[:sent]

    def _service_dirty(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if conn.closed:
                continue
            with conn.lock:
                resume = conn.paused and conn.outstanding < self._window
                if resume:
                    conn.paused = False
            if resume:
                try:
                    self._process(conn)
                except _Garbage as exc:
                    log.warning("external port of node %d: %s sent garbage (%s); connection closed",
                                self.node_id, conn.name(), exc)
                    self._drop(conn, None)
                    continue
            self._update_interest(conn)

    def _update_interest(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if conn.failure is not None:
            log.log(conn.failure_level, "external port of node %d: %s: %s; connection closed", self.node_id,
                    conn.name(), conn.failure)
            self._drop(conn, None)
            return
        with conn.lock:
            pending_out = bool(conn.outbuf)
        if conn.closing and not pending_out:
            self._drop(conn, None)
            return
        want = 0
        if not conn.paused:
            want |= selectors.EVENT_READ  # while closing too, to notice the peer's close
        if pending_out:
            want |= selectors.EVENT_WRITE
        if want == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, want, conn)
        elif want == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, want, conn)
        conn.events = want

    def _drop(self, conn: _Conn, message: str | None) -> None:
        """Close ``conn`` (selector thread); a disconnected client is forgotten with its pending replies."""
        if conn.closed:
            return
        if conn.events:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.events = 0
        with conn.lock:
            conn.closed = True
            conn.outbuf.clear()
            try:
                conn.sock.close()
            except OSError:
                pass
        self._conns.discard(conn)
        with self._lock:
            if conn.client_id is not None and self._clients.get(conn.client_id) is conn:
                del self._clients[conn.client_id]
            self._dirty.discard(conn)
        if message is not None:
            log.info("external port of node %d: %s", self.node_id, message)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns):
            if (conn.client_id is None or conn.closing) and now - conn.opened > self.hello_timeout:
                if not conn.closing:
                    log.warning("external port of node %d: %s sent no HELLO within %.0f s; closed", self.node_id,
                                conn.name(), self.hello_timeout)
                self._drop(conn, None)
            elif self.key is not None and not conn.proven and now - conn.opened > self.hello_timeout:
                # its HELLO proved the key over its own nonce only: without a frame over ours it may be a replay
                log.warning("external port of node %d: refused %s: no authenticated frame within %.0f s of its "
                            "HELLO (a replayed HELLO?); closed", self.node_id, conn.name(), self.hello_timeout)
                self._drop(conn, None)
        view = self.group._engine.view
        if view is None or view.vid == self._last_vid:
            return
        self._last_vid = view.vid
        members = set(view.members)
        with self._lock:
            clash = [c for cid, c in self._clients.items() if cid in members]
        for conn in clash:
            log.warning("external port of node %d: %s uses the id of a member of view %d; disconnected",
                        self.node_id, conn.name(), view.vid)
            self._drop(conn, None)


class ExternalClientCallback:
    """A member's handle for notifying the external clients of one subgroup (``group.get_client_callback(T)``).

    ``notify(client_id, message)`` sends ``message`` (bytes, or any value the
    group's serializer encodes) to that client, if it is connected to this
    member; the client's handler registered for this subgroup receives it.
    """

    def __init__(self, server: ExternalServer, subgroup_type: Hashable, index: int) -> None:
        self._server = server
        self.subgroup_type = subgroup_type
        self.index = index

    def notify(self, client_id: int, message: bytes | Any) -> None:
        """Send a notification; ``NodeRemovedFromGroupError`` if the client is not connected to this member."""
        sg = self._server.group._current().subgroup_id(self.subgroup_type, self.index)
        self._server._notify(client_id, sg, message)

    def has_external_client(self, client_id: int) -> bool:
        """Whether external client ``client_id`` is connected to this member."""
        return self._server.has_external_client(client_id)

    def __repr__(self) -> str:
        name = getattr(self.subgroup_type, "__name__", str(self.subgroup_type))
        return f"ExternalClientCallback[{name}](index={self.index})"
