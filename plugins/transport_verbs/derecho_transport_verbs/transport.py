"""The derecho transport contract over libfabric (FI_EP_RDM).

Design (see ``docs/transport-verbs.md`` for the measurements behind it):

* **Out of band**: a small TCP socket per peer carries the handshake of
  :mod:`derecho_core.handshake` (magic, version, node id, incarnation,
  optional cluster-key HMAC). Its ``extra`` field carries the libfabric
  endpoint name, the provider, a random per-connection *epoch* and the size
  of the posted receive buffers. After the handshake the peer's name goes
  into the address vector. The socket then stays open as the liveness
  channel: EOF or a reset is a failure, a ``BYE`` frame an orderly close.
  Anything else there (absurd length, unknown kind, truncated frame) is
  logged and closes that connection.
* **Messages** flow over libfabric. Every message starts with a 24-byte
  header (sender id, receiver's epoch, kind, length). Small ones
  (header + payload <= ``eager_size``) are one ``fi_send`` into one of the
  ``rx_depth`` posted receive buffers (copied out, the buffer reposted at
  once). Larger ones send a header ``fi_send`` followed by an ``fi_tsend`` of
  the payload straight from the caller's buffers (no copy) with tag
  ``epoch << 32 | seq``; the receiver posts an ``fi_trecv`` into a fresh
  buffer when the header arrives (the provider's rendezvous moves the bytes
  once). Per-peer FIFO: headers are ordered (``FI_ORDER_SAS`` is required)
  and deliveries wait behind an unfinished large message.
* **Progress** is manual: :meth:`VerbsTransport.poll` calls ``fi_cq_read``,
  retries posts that met ``-FI_EAGAIN`` and watches the OOB sockets. After
  activity it busy-polls for ``p2p_loop_busy_wait_before_sleep_ms``, then
  sleeps in ``select`` on the OOB sockets, the wake-up pipe and the CQ's
  wait fd (``FI_WAIT_FD``, after ``fi_trywait`` says nothing is pending), in
  slices of at most 20 ms so timers run; a provider without a wait fd
  sleeps in 1 ms slices (libfabric tcp needs ``fi_cq_read`` to move data).
* **Bounded**: at most ``tx_depth`` messages (and ``max_queued_bytes``) per
  peer are posted or waiting for a retry; ``try_send`` says False beyond.
  A queue without progress for ``sst_poll_cq_timeout_ms`` fails the peer.
* **RMA** (``transport.rma``) when the provider offers FI_RMA: registration
  honours ``mr_mode`` (provider keys, virtual addresses, local MRs,
  endpoint binding), bounds are checked here before every post.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any, Sequence

from derecho_core import handshake as hs
from derecho_core.transport import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_QUEUED_BYTES,
    Address,
    Buffer,
    Event,
    FrameError,
    HandshakeError,
    MemoryRegion,
    MessageReceived,
    NotConnectedError,
    PeerConnected,
    PeerFailed,
    RemoteRegion,
    RMAWriteCompleted,
    SelfConnectionError,
    SendQueueFull,
    Transport,
    TransportClosedError,
    TransportError,
)

from . import fabric as fab

#: libfabric messages kept for a connection whose handshake has not completed
MAX_PENDING_RX = 4096
log = logging.getLogger("derecho.transport.verbs")

#: message header: sender node id, receiver's epoch, kind, aux (sequence of a large message), length
HDR = struct.Struct("<IIB3xIQ")
K_EAGER = 1  # payload follows in the same frame
K_RNDV = 2  # payload follows as a tagged message (tag = receiver's epoch << 32 | aux)
K_RTS = 3  # "I have `length` bytes for you" (RMA-write protocol)
K_CTS = 4  # "write them here": body = key u64, remote base u64
K_DONE = 5  # the writes of message `aux` are complete
CTS_BODY = struct.Struct("<QQ")
#: bytes of large messages a receiver lets one peer write at once (one message always fits)
RX_WINDOW = 64 << 20
#: large messages: "write" (receiver-provided buffer, one-sided writes; needs FI_RMA) or "tagged" (rendezvous)
LARGE_PROTOCOL = os.environ.get("DERECHO_VERBS_LARGE", "write")
#: handshake extra: epoch, eager buffer size, name length, provider length
EXTRA = struct.Struct("<IIHH")
#: RMA descriptor: key, remote base, length
RMA_DESC = struct.Struct("<QQQ")
#: control frames on the OOB socket after the handshake: body length u32, kind u8, body
CTRL = struct.Struct("<IB")
C_BYE = 1
BYE = CTRL.pack(0, C_BYE)
MAX_CTRL_BODY = 4096
DEFAULT_EAGER_SIZE = 16384
SLEEP_SLICE = 0.001
_DONE_AFTER = object()  # token of the last write of a large message when DONE must wait for its completion
#: small frames go out with fi_inject (no completion to reap) up to what the provider grants of this
INJECT_WISH = 1024
#: longest single sleep when the CQ has a wait fd (timers are checked at least this often)
MAX_SLEEP = 0.02
#: while busy-polling, the OOB sockets and timers are checked this often (seconds)
OOB_CHECK = 0.0005

_ctx_counter = 0


class _Conn:
    """One OOB socket and, once the handshake is done, one libfabric peer."""

    __slots__ = ("sock", "role", "node_id", "handshake", "state", "created", "fi_addr", "epoch", "peer_epoch",
                 "peer_eager", "inflight", "inflight_bytes", "backlog", "last_progress", "rx_queue", "large_seq",
                 "incarnation", "peer_address", "out", "bye_sent", "pending_rx", "target", "rx_large_seq", "ctrl_buf",
                 "rts_pending", "rts_rx", "rts_wait", "granted")

    def __init__(self, sock: socket.socket, role: str, node_id: int | None, target: Address | None = None):
        self.sock = sock
        self.role = role
        self.node_id = node_id
        self.handshake: hs.Handshake | None = None
        self.state = "connecting" if role == "initiator" else "handshake"
        self.created = time.monotonic()
        self.fi_addr = -1
        self.epoch = int.from_bytes(os.urandom(4), "little") or 1
        self.peer_epoch = 0
        self.peer_eager = 0
        self.inflight = 0
        self.inflight_bytes = 0
        self.backlog: collections.deque = collections.deque()
        self.last_progress = time.monotonic()
        self.rx_queue: collections.deque = collections.deque()  # [data or None (pending large)]
        self.large_seq = 0
        self.rx_large_seq = 0
        self.rts_pending: dict = {}  # seq -> (data op, parts, cbufs): sent RTS, waiting for CTS
        self.rts_rx: dict = {}  # seq -> rx_queue slot [data, buf, mr]: sent CTS, waiting for DONE
        self.rts_wait: collections.deque = collections.deque()  # (seq, length, slot) not granted yet
        self.granted = 0  # bytes granted by CTS and not yet DONE
        self.ctrl_buf = b""
        self.incarnation = 0
        self.peer_address: Address | None = None
        self.out = b""
        self.bye_sent = False
        self.pending_rx: list = []
        self.target = target


class _Op:
    __slots__ = ("conn", "kind", "refs", "nbytes", "token", "slot", "mr", "seq")

    def __init__(self, conn: _Conn | None, kind: str, refs: Any = None, nbytes: int = 0, token: Any = None):
        self.conn = conn
        self.kind = kind  # "send", "recv", "trecv", "write"
        self.refs = refs
        self.nbytes = nbytes
        self.token = token
        self.slot = None
        self.mr = None
        self.seq = 0


class VerbsTransport(Transport):
    """A derecho transport on one libfabric provider (``tcp``, ``verbs``, ``shm`` ...)."""

    provider = "tcp"

    def __init__(self, conf: Any, node_id: int, address: Address, *, provider: str = "tcp",
                 eager_size: int = DEFAULT_EAGER_SIZE):
        self.provider = provider  # type: ignore[misc]
        self.node_id = int(node_id)
        self.conf = conf
        self.tx_depth = int(conf.get("RDMA/tx_depth"))
        self.rx_depth = int(conf.get("RDMA/rx_depth"))
        self.busy_wait = int(conf.get("DERECHO/p2p_loop_busy_wait_before_sleep_ms")) / 1000.0
        self.stall_timeout = int(conf.get("DERECHO/sst_poll_cq_timeout_ms")) / 1000.0
        self.max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        self.max_queued_bytes = DEFAULT_MAX_QUEUED_BYTES
        self._key = hs.load_cluster_key(conf)
        self._incarnation = hs.new_incarnation()
        host, port = address
        self._requested = (host, int(port))
        domain = (conf.get("RDMA/domain") or "").strip()
        node = host or conf.get("DERECHO/local_ip")
        fi_domain: str | None = domain or None
        if domain:
            try:  # an address rather than a libfabric domain name: bind there
                ipaddress.ip_address(domain)
                node, fi_domain = domain, None
            except ValueError:
                pass
        if provider == "shm":  # shm names its endpoints itself (per process); an address would collide
            node = None
        self._fi_node = node
        try:
            self.ep = fab.Endpoint(provider, fi_domain, node=node, tx_size=0, rx_size=0,
                                   wait_fd=os.environ.get("DERECHO_VERBS_WAIT_FD", "1") != "0",
                                   inject_size=INJECT_WISH)
        except fab.FabricError as exc:
            hint = ""
            if provider == "verbs":
                hint = " (the verbs provider needs an RDMA NIC and rdma-core; use provider tcp without one)"
            try:
                listed = ", ".join(fab.provider_names())
            except Exception:
                listed = "?"
            raise TransportError(f"libfabric provider {provider!r} (domain {fi_domain!r}, node {node!r}) "
                                 f"is not usable here: {exc}{hint}; fi_getinfo offers: {listed}") from exc
        lib = fab._lib
        self._lib = lib
        self._ffi = fab._ffi
        self.eager_size = max(HDR.size + 64, int(eager_size))
        self.inject_size = min(self.ep.info.inject_size, self.eager_size)
        self._scratch = bytearray(self.eager_size)
        self._cscratch = self._ffi.from_buffer(self._scratch)
        # fi_inject reads the buffer with no local descriptor: not with FI_MR_LOCAL providers
        if self.ep.needs_local_mr:
            self.inject_size = 0
        self.rma = _VerbsRMA(self) if self.ep.has_rma else None
        self._large_write = self.ep.has_rma and LARGE_PROTOCOL == "write"
        #: send-after-write order: a DONE posted after the writes arrives after their data
        self._saw = bool(self.ep.info.msg_order & self._lib.FI_ORDER_SAW)
        self._lock = threading.RLock()
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        if self.ep.wait_fd is not None:  # the CQ's fd: an idle poll sleeps until libfabric has work
            self._sel.register(self.ep.wait_fd, selectors.EVENT_READ, "cq")
        self._wake_flag = False
        self._listener: socket.socket | None = None
        self._address = self._requested
        self._conns: set[_Conn] = set()
        self._peers: dict[int, _Conn] = {}  # established (and handshaking acceptors once WELCOME is sent)
        self._connecting: dict[int, _Conn] = {}  # outgoing attempts
        self._by_epoch: dict[int, _Conn] = {}
        self._events: list[Event] = []
        self._ops: dict[int, _Op] = {}
        self._next_ctx = 1
        self._completions: list = []
        self._last_activity = time.monotonic()
        self._free_slots: list = []
        self._retry_connect: dict[int, tuple[Address, float, float]] = {}  # node -> (addr, deadline, next_try)
        self._rx_bufs: list = []
        self._backlogged = False
        self._next_oob_check = 0.0
        self._post_receives()

    # ----------------------------------------------------------------- helpers
    def _ctx(self, op: _Op) -> int:
        c = self._next_ctx
        self._next_ctx = c + 1 if c < (1 << 62) else 1
        self._ops[c] = op
        return c

    def _post_receives(self) -> None:
        ffi = self._ffi
        limit = max(1, self.ep.info.rx_size // 2)  # the other half is for large-message (tagged) receives
        if self.rx_depth > limit:
            log.warning("[RDMA] rx_depth %d exceeds half of provider %s's receive queue (%d); posting %d",
                        self.rx_depth, self.ep.info.provider, self.ep.info.rx_size, limit)
            self.rx_depth = limit
        for _ in range(self.rx_depth):
            buf = bytearray(self.eager_size)
            cbuf = ffi.from_buffer(buf)
            mr = self.ep.register(buf) if self.ep.needs_local_mr else None
            op = _Op(None, "recv", (buf, cbuf))
            op.slot = memoryview(buf)  # receive buffers: a view to copy payloads out of in one go
            op.mr = mr
            self._rx_bufs.append(op)
            self._repost(op)

    def _repost(self, op: _Op) -> None:
        if op.token is None:
            op.token = self.ep.context_ptr(self._ctx(op))  # permanent context of this receive buffer
        buf, cbuf = op.refs
        if self.ep.post_recv(cbuf, len(buf), op.mr.desc if op.mr else None, op.token):
            return
        deadline = time.monotonic() + self.stall_timeout
        while not self.ep.post_recv(cbuf, len(buf), op.mr.desc if op.mr else None, op.token):
            self._drain_cq()
            if time.monotonic() > deadline:
                raise TransportError(f"could not post a receive buffer (rx_depth {self.rx_depth} > provider's "
                                     f"rx size {self.ep.info.rx_size}?)")

    def _slot(self) -> tuple[bytearray, Any, Any]:
        if self._free_slots:
            return self._free_slots.pop()
        buf = bytearray(self.eager_size)
        cbuf = self._ffi.from_buffer(buf)
        mr = self.ep.register(buf) if self.ep.needs_local_mr else None
        return (buf, cbuf, mr)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("transport is closed")

    # ----------------------------------------------------------------- lifecycle
    def listen(self) -> Address:
        with self._lock:
            self._check_open()
            if self._listener is None:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(self._requested)
                s.listen(128)
                s.setblocking(False)
                self._listener = s
                self._address = s.getsockname()[:2]
                self._sel.register(s, selectors.EVENT_READ, "listen")
            return self._address

    @property
    def address(self) -> Address:
        return self._address

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in list(self._conns):
                if c.state == "established" and not c.bye_sent:
                    try:
                        c.sock.send(BYE)
                    except OSError:
                        pass
                self._drop_conn(c)
            if self._listener is not None:
                try:
                    self._sel.unregister(self._listener)
                except Exception:
                    pass
                self._listener.close()
            if self.rma is not None:
                self.rma._close()
            self.ep.close()  # MR -> EP -> CQ/AV -> domain -> fabric
            self._ops.clear()
            self._rx_bufs.clear()
            self._free_slots.clear()
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # ----------------------------------------------------------------- connections
    def connect(self, node_id: int, address: Address) -> None:
        with self._lock:
            self._check_open()
            if node_id in self._peers or node_id in self._connecting:
                return
            if node_id == self.node_id:
                raise ValueError("a node cannot connect to itself")
            self._retry_connect[node_id] = (tuple(address), time.monotonic() + self.stall_timeout, 0.0)
            self._start_connect(node_id)

    def _start_connect(self, node_id: int) -> None:
        addr, deadline, _ = self._retry_connect[node_id]
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(s, "initiator", node_id, addr)
        try:
            err = s.connect_ex(addr)
        except (OSError, ValueError) as exc:  # gaierror, or a host that is no host name (UnicodeError)
            s.close()
            del self._retry_connect[node_id]
            self._events.append(PeerFailed(node_id, f"could not connect to {addr[0]}:{addr[1]}: "
                                                    f"the address does not resolve: {exc}"))
            return
        self._conns.add(c)
        self._connecting[node_id] = c
        if err not in (0, errno.EINPROGRESS):
            self._connect_failed(c, os.strerror(err))
            return
        self._sel.register(s, selectors.EVENT_WRITE, c)

    def _connect_failed(self, c: _Conn, why: str) -> None:
        node = c.node_id
        self._drop_conn(c)
        if node is None or node not in self._retry_connect:
            return
        addr, deadline, _ = self._retry_connect[node]
        now = time.monotonic()
        if now >= deadline:
            del self._retry_connect[node]
            self._events.append(PeerFailed(node, f"could not connect to {addr[0]}:{addr[1]}: {why}"))
        else:
            self._retry_connect[node] = (addr, deadline, now + 0.02)

    def _extra(self, c: _Conn) -> bytes:
        name = self.ep.name
        prov = self.provider.encode()
        return EXTRA.pack(c.epoch, self.eager_size, len(name), len(prov)) + name + prov

    def _parse_extra(self, extra: bytes) -> tuple[int, int, bytes, str]:
        if not extra:  # a peer without a libfabric endpoint: control connection only
            return 0, 0, b"", self.provider
        if len(extra) < EXTRA.size:
            raise HandshakeError("peer is not a libfabric (verbs plugin) transport: no endpoint name in its handshake")
        epoch, eager, nlen, plen = EXTRA.unpack_from(extra)
        name = extra[EXTRA.size:EXTRA.size + nlen]
        prov = extra[EXTRA.size + nlen:EXTRA.size + nlen + plen].decode(errors="replace")
        if len(name) != nlen or eager < HDR.size:
            raise HandshakeError("malformed libfabric address in handshake")
        return epoch, eager, name, prov

    def _accept_hello(self, c: _Conn, h: hs.Hello) -> tuple[int, str] | None:
        try:
            _, _, _, prov = self._parse_extra(h.extra)
        except HandshakeError as exc:
            return hs.REFUSE_OTHER, str(exc)
        if prov != self.provider:
            return hs.REFUSE_OTHER, (f"node {self.node_id} uses libfabric provider {self.provider!r}, "
                                     f"node {h.node_id} uses {prov!r}")
        # The HELLO is not authenticated yet (the CONFIRM proves the key): it may refuse this connection,
        # but what it would replace is only given up once this connection is established (_publish_peer).
        # Otherwise one HELLO from a process without the key could evict a member.
        old = self._peers.get(h.node_id)
        if old is not None and old is not c:
            if not (old.incarnation != h.incarnation and old.state == "established"):
                return hs.REFUSE_DUPLICATE, f"node {self.node_id} already has a connection with node {h.node_id}"
        out = self._connecting.get(h.node_id)
        if out is not None and self.node_id < h.node_id:
            return hs.REFUSE_DUPLICATE, (f"simultaneous connect: the connection opened by node "
                                         f"{self.node_id} (the smaller id) wins")
        return None

    def _on_listen(self) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                s, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(s, "acceptor", None)
            c.handshake = hs.Handshake("acceptor", self.node_id, self._incarnation, key=self._key,
                                       version=hs.PROTOCOL_VERSION,
                                       address=self._address, extra=self._extra(c),
                                       accept=lambda h, c=c: self._accept_hello(c, h))
            self._conns.add(c)
            self._sel.register(s, selectors.EVENT_READ, c)

    def _on_conn_event(self, c: _Conn, mask: int) -> None:
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._connect_failed(c, os.strerror(err))
                return
            c.state = "handshake"
            c.handshake = hs.Handshake("initiator", self.node_id, self._incarnation, key=self._key,
                                       version=hs.PROTOCOL_VERSION,
                                       expected_peer=c.node_id, address=self._address, extra=self._extra(c))
            self._sel.modify(c.sock, selectors.EVENT_READ, c)
            self._send_oob(c, c.handshake.start())
            return
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = None
            why = f"connection error: {exc.strerror or exc}"
        else:
            why = "connection closed by the peer"
        if not data:
            if c.state == "established":
                if c.ctrl_buf:
                    log.warning("node %s closed its control connection in the middle of a frame (truncated frame)",
                                c.node_id)
                    why = "truncated control frame, then " + why
                self._fail_conn(c, why + " (no BYE: process died or the network failed)", clean=False)
            elif c.role == "initiator" and c.state == "handshake":
                self._connect_failed(c, why + " during the handshake")
            else:
                self._drop_conn(c)
            return
        if c.state == "handshake":
            self._on_handshake_bytes(c, data)
        elif c.state == "established":
            self._on_control_bytes(c, data)

    def _on_control_bytes(self, c: _Conn, data: bytes) -> None:
        buf = c.ctrl_buf + bytes(data)
        while len(buf) >= CTRL.size:
            length, kind = CTRL.unpack_from(buf)
            if length > MAX_CTRL_BODY:
                self._garbage(c, f"absurd control frame length {length} (max {MAX_CTRL_BODY})")
                return
            if len(buf) < CTRL.size + length:
                break
            buf = buf[CTRL.size + length:]
            if kind == C_BYE:
                self._fail_conn(c, "peer closed the connection", clean=True)
                return
            self._garbage(c, f"garbage: unknown control frame kind {kind}")
            return
        c.ctrl_buf = buf

    def _garbage(self, c: _Conn, what: str) -> None:
        exc = FrameError(f"node {c.node_id} sent {what} on its control connection; closing it", node_id=c.node_id)
        log.warning("%s", exc)
        self._fail_conn(c, str(exc), clean=False)

    def _on_handshake_bytes(self, c: _Conn, data: bytes) -> None:
        assert c.handshake is not None
        try:
            out = c.handshake.receive(data)
        except HandshakeError as exc:
            reply = getattr(exc, "reply", b"")
            if reply:
                try:
                    c.sock.send(reply)
                except OSError:
                    pass
            node = c.node_id if c.node_id is not None else (c.handshake.peer.node_id if c.handshake.peer else None)
            if isinstance(exc, hs.DuplicateConnectionError):
                log.debug("dropping duplicate connection with node %s: %s", node, exc)
                self._drop_conn(c)
                return
            if isinstance(exc, SelfConnectionError) and c.role == "initiator":
                log.info("connection to node %s reached itself; retrying", node)
                self._connect_failed(c, str(exc))
                return
            log.warning("handshake with %s failed: %s", f"node {node}" if node is not None else "a peer", exc)
            if c.role == "initiator" and node is not None:
                self._retry_connect.pop(node, None)
                self._drop_conn(c)
                self._events.append(PeerFailed(node, f"handshake failed: {exc}"))
            else:
                if c.node_id is not None and self._peers.get(c.node_id) is c:
                    del self._peers[c.node_id]
                self._drop_conn(c)
            return
        if out:
            self._send_oob(c, out)
        h = c.handshake
        try:
            if c.role == "acceptor" and h.peer is not None and c.node_id is None:
                # WELCOME sent: learn the peer now, so libfabric messages that arrive before CONFIRM are kept.
                self._adopt_peer(c, h.peer)
            elif h.done and c.role == "initiator":
                if h.peer is None or not h.peer.extra:
                    raise HandshakeError(f"node {c.node_id} is not a libfabric transport (no endpoint name in its "
                                         f"handshake; is it on [RDMA] provider {self.provider!r}?)")
                self._adopt_peer(c, h.peer)
        except (HandshakeError, fab.FabricError) as exc:
            node = h.peer.node_id if h.peer is not None else c.node_id
            log.warning("handshake with node %s failed: %s", node, exc)
            if c.node_id is not None and self._peers.get(c.node_id) is c:
                del self._peers[c.node_id]
            if c.role == "initiator" and node is not None:
                self._retry_connect.pop(node, None)
                self._drop_conn(c)
                self._events.append(PeerFailed(node, f"handshake failed: {exc}"))
            else:
                self._drop_conn(c)
            return
        if h.done:
            if c.role == "initiator":
                self._connecting.pop(c.node_id, None)
                self._retry_connect.pop(c.node_id, None)
            else:
                self._publish_peer(c)
            c.state = "established"
            c.last_progress = time.monotonic()
            self._events.append(PeerConnected(c.node_id, c.peer_address, c.incarnation))
            pending, c.pending_rx = c.pending_rx, []
            for kind, payload in pending:
                self._on_message(c, kind, payload)
            if h.leftover:
                self._on_control_bytes(c, h.leftover)

    def _adopt_peer(self, c: _Conn, h: hs.Hello | None) -> None:
        assert h is not None
        epoch, eager, name, _ = self._parse_extra(h.extra)
        c.node_id = h.node_id
        c.incarnation = h.incarnation
        c.peer_address = h.address
        c.peer_epoch = epoch
        c.peer_eager = eager
        c.fi_addr = self.ep.insert(name) if name else -1
        self._by_epoch[c.epoch] = c  # libfabric messages that beat the CONFIRM wait in pending_rx
        if c.role == "initiator":
            self._peers[h.node_id] = c

    def _publish_peer(self, c: _Conn) -> None:
        """An accepted connection proved the key: it becomes the peer's, replacing an older one."""
        assert c.node_id is not None
        old = self._peers.get(c.node_id)
        if old is not None and old is not c:
            self._fail_conn(old, "peer restarted (new incarnation)", clean=False)
        out = self._connecting.get(c.node_id)
        if out is not None and out is not c:
            self._drop_conn(out)  # the smaller id's connection wins: ours loses
            self._retry_connect.pop(c.node_id, None)
        self._peers[c.node_id] = c

    def _send_oob(self, c: _Conn, data: bytes) -> None:
        if not data:
            return
        try:
            n = c.sock.send(data)
            if n != len(data):  # handshake records are small; a short write on a fresh socket is a failure
                raise OSError(errno.EAGAIN, "short write")
        except OSError as exc:
            log.debug("OOB write to node %s failed: %s", c.node_id, exc)

    def _drop_conn(self, c: _Conn) -> None:
        """Forget a connection without events (the caller reports what is needed)."""
        if c not in self._conns:
            return
        self._conns.discard(c)
        try:
            self._sel.unregister(c.sock)
        except Exception:
            pass
        try:
            c.sock.close()
        except OSError:
            pass
        if c.node_id is not None:
            if self._peers.get(c.node_id) is c:
                del self._peers[c.node_id]
            if self._connecting.get(c.node_id) is c:
                del self._connecting[c.node_id]
        if self._by_epoch.get(c.epoch) is c:
            del self._by_epoch[c.epoch]
        if c.fi_addr >= 0:
            self._cancel_for(c)
            if not self._closed:
                self.ep.remove(c.fi_addr)
            c.fi_addr = -1
        c.state = "dead"
        c.backlog.clear()
        c.rx_queue.clear()
        for slot in c.rts_rx.values():
            if slot[2] is not None and not self._closed:
                slot[2].close()
        c.rts_rx.clear()
        c.rts_pending.clear()
        c.rts_wait.clear()

    def _cancel_for(self, c: _Conn) -> None:
        lib, ffi = self._lib, self._ffi
        for ctx, op in list(self._ops.items()):
            if op.conn is c and op.kind == "trecv" and not self._closed:
                lib.fi_cancel(ffi.addressof(self.ep._ep.fid), ffi.cast("void *", ctx))

    def _fail_conn(self, c: _Conn, reason: str, clean: bool) -> None:
        was = c.state == "established" and self._peers.get(c.node_id) is c
        node = c.node_id
        self._drop_conn(c)
        if was and node is not None:
            self._events.append(PeerFailed(node, reason, clean))

    def disconnect(self, node_id: int) -> None:
        with self._lock:
            self._retry_connect.pop(node_id, None)
            c = self._peers.get(node_id) or self._connecting.get(node_id)
            if c is None:
                return
            if c.state == "established":
                try:
                    c.sock.send(BYE)
                    c.bye_sent = True
                except OSError:
                    pass
                self._fail_conn(c, "disconnected by this node", clean=True)
            else:
                self._drop_conn(c)

    def peers(self) -> set[int]:
        with self._lock:
            return {n for n, c in self._peers.items() if c.state == "established"}

    # ----------------------------------------------------------------- sending
    def queued(self, node_id: int) -> int:
        c = self._peers.get(node_id)
        return c.inflight if c is not None and c.state == "established" else 0

    def try_send(self, node_id: int, buffers: Sequence[Buffer]) -> bool:
        with self._lock:
            self._check_open()
            c = self._peers.get(node_id)
            if c is None or c.state != "established":
                raise NotConnectedError(f"node {node_id} is not connected", node_id=node_id)
            if c.fi_addr < 0:
                raise NotConnectedError(f"node {node_id} completed the handshake without a libfabric endpoint "
                                        "(control connection only): it cannot receive messages", node_id=node_id)
            if isinstance(buffers, (bytes, bytearray, memoryview)):
                buffers = [buffers]
            size = 0
            for x in buffers:
                if type(x) is bytes or type(x) is bytearray:
                    size += len(x)
                else:  # memoryviews of other formats, numpy arrays ...: count bytes, copy as bytes
                    buffers = [x if type(x) is bytes or type(x) is bytearray else memoryview(x).cast("B")
                               for x in buffers]
                    size = sum(len(x) for x in buffers)
                    break
            if size > self.max_message_size:
                raise ValueError(f"message of {size} bytes exceeds max_message_size {self.max_message_size}")
            if c.inflight and (c.inflight >= self.tx_depth or c.inflight_bytes + size > self.max_queued_bytes):
                return False
            frame = size + HDR.size
            if frame <= self.inject_size and not c.backlog and frame <= c.peer_eager:
                # fast path: build the frame in a scratch buffer and inject it (no completion, no op)
                buf = self._scratch
                HDR.pack_into(buf, 0, self.node_id, c.peer_epoch, K_EAGER, 0, size)
                off = HDR.size
                for x in buffers:
                    n = len(x)
                    buf[off:off + n] = x
                    off += n
                if self.ep.post_inject(self._cscratch, frame, c.fi_addr):
                    return True
            views = buffers
            c.inflight += 1
            c.inflight_bytes += size
            if c.inflight == 1:
                c.last_progress = time.monotonic()
            if size + HDR.size <= c.peer_eager:
                buf, cbuf, mr = self._slot()
                HDR.pack_into(buf, 0, self.node_id, c.peer_epoch, K_EAGER, 0, size)
                off = HDR.size
                for v in views:
                    n = len(v)
                    buf[off:off + n] = v
                    off += n
                op = _Op(c, "send", None, size)
                op.slot = (buf, cbuf, mr)
                post = ("send", cbuf, off, mr.desc if mr else None)
                self._post_or_queue(c, op, post)
            elif self._large_write:
                self._send_rts(c, [v for v in views if len(v)], size)
            else:
                seq = c.large_seq
                c.large_seq = (seq + 1) & 0xFFFFFFFF
                self._send_ctrl(c, K_RNDV, seq, size)
                tag = (c.peer_epoch << 32) | seq
                parts = [v for v in views if len(v)]
                ffi = self._ffi
                if self.ep.needs_local_mr:  # one registered copy
                    data = bytearray(b"".join(parts))
                    cdata = ffi.from_buffer(data)
                    dop = _Op(c, "send", (data, cdata), size)
                    dop.mr = self.ep.register(data)
                    self._post_or_queue(c, dop, ("tsend", cdata, size, dop.mr.desc, tag))
                elif len(parts) == 1 or len(parts) > self.ep.info.iov_limit:
                    data = parts[0] if len(parts) == 1 else b"".join(parts)
                    cdata = ffi.from_buffer(data)
                    self._post_or_queue(c, _Op(c, "send", (data, cdata), size), ("tsend", cdata, size, None, tag))
                else:  # gather straight from the caller's buffers: no copy
                    cbufs = [ffi.from_buffer(v) for v in parts]
                    iov = ffi.new("struct iovec[]", len(parts))
                    for i, cb in enumerate(cbufs):
                        iov[i].iov_base = cb
                        iov[i].iov_len = len(cb)
                    self._post_or_queue(c, _Op(c, "send", (parts, cbufs, iov), size),
                                        ("tsendv", iov, len(parts), None, tag))
            return True

    def _send_ctrl(self, c: _Conn, kind: int, aux: int, length: int, body: bytes = b"") -> None:
        """A header-only frame (RNDV, RTS, CTS, DONE): not counted in the peer's queue."""
        buf, cbuf, mr = self._slot()
        HDR.pack_into(buf, 0, self.node_id, c.peer_epoch, kind, aux, length)
        if body:
            buf[HDR.size:HDR.size + len(body)] = body
        op = _Op(c, "send", None, 0)
        op.slot = (buf, cbuf, mr)
        self._post_or_queue(c, op, ("send", cbuf, HDR.size + len(body), mr.desc if mr else None), count=False)

    def _send_rts(self, c: _Conn, parts: list, size: int) -> None:
        """RMA-write protocol, sender: announce; the data waits (referenced, counted) for the CTS."""
        seq = c.large_seq
        c.large_seq = (seq + 1) & 0xFFFFFFFF
        ffi = self._ffi
        if self.ep.needs_local_mr or (len(parts) > 1 and not self._saw):
            # one registered copy; or one write, so that its completion covers the whole message
            data = bytearray(b"".join(parts))
            parts = [data]
        cbufs = [ffi.from_buffer(p) for p in parts]
        op = _Op(c, "write", (parts, cbufs), size)
        if self.ep.needs_local_mr:
            op.mr = self.ep.register(parts[0])
        c.rts_pending[seq] = op
        self._send_ctrl(c, K_RTS, seq, size)

    def _on_cts(self, c: _Conn, seq: int, length: int, body: bytes) -> None:
        op = c.rts_pending.pop(seq, None)
        if op is None or length != op.nbytes or len(body) != CTS_BODY.size:
            self._garbage_frame(c, f"unexpected CTS for large message {seq}")
            return
        key, base = CTS_BODY.unpack(body)
        parts, cbufs = op.refs
        desc = op.mr.desc if op.mr else None
        off = 0
        last = len(cbufs) - 1
        for i, cb in enumerate(cbufs):  # bounds: the parts add up to `length`, the receiver's buffer size
            n = len(cb)
            if i == last:
                wop = op
                wop.token = _DONE_AFTER if not self._saw else None
                wop.kind = "lwrite"
                wop.seq = seq
            else:
                wop = _Op(c, "lwrite", None, -1)
                wop.seq = seq
            self._post_or_queue(c, wop, ("write", cb, n, desc, base + off, key, not self._saw),
                                count=(i == last))
            off += n
        if not cbufs:  # cannot happen: large messages are never empty
            return
        if self._saw:  # the provider delivers a send after the writes posted before it
            self._send_ctrl(c, K_DONE, seq, length)

    def _on_rts(self, c: _Conn, seq: int, length: int) -> None:
        slot = [None, None, None]
        c.rx_queue.append(slot)  # its place in the peer's FIFO
        c.rts_wait.append((seq, length, slot))
        self._grant(c)

    def _grant(self, c: _Conn) -> None:
        """Answer RTSs in order while the peer's granted bytes stay under RX_WINDOW (always one at least)."""
        while c.rts_wait:
            seq, length, slot = c.rts_wait[0]
            if c.granted and c.granted + length > RX_WINDOW:
                return
            c.rts_wait.popleft()
            buf = bytearray(length)
            mr = self.ep.register(buf, self._lib.FI_REMOTE_WRITE | self._lib.FI_WRITE | self._lib.FI_RECV)
            slot[1], slot[2] = buf, mr
            c.rts_rx[seq] = slot
            c.granted += length
            self._send_ctrl(c, K_CTS, seq, length, CTS_BODY.pack(mr.key, mr.remote_base))

    def _on_done(self, c: _Conn, seq: int) -> None:
        slot = c.rts_rx.pop(seq, None)
        if slot is None:
            self._garbage_frame(c, f"unexpected DONE for large message {seq}")
            return
        slot[2].close()
        slot[0] = memoryview(slot[1])
        slot[2] = None
        c.granted -= len(slot[1])
        self._deliver_ready(c)
        self._grant(c)

    def _garbage_frame(self, c: _Conn, what: str) -> None:
        exc = FrameError(f"node {c.node_id}: {what}; closing the connection", node_id=c.node_id)
        log.warning("%s", exc)
        self._fail_conn(c, str(exc), clean=False)

    def _post_or_queue(self, c: _Conn, op: _Op, post: tuple, count: bool = True) -> None:
        if not count:
            op.nbytes = -1  # header of a large message: not counted in the queue
        if c.backlog or not self._post(c, op, post):
            c.backlog.append((op, post))
            self._backlogged = True

    def _post(self, c: _Conn, op: _Op, post: tuple) -> bool:
        ctx = self._ctx(op)
        kind = post[0]
        if kind == "send":
            ok = self.ep.post_send(post[1], post[2], post[3], c.fi_addr, ctx)
        elif kind == "tsendv":
            ok = self.ep.post_tsendv(post[1], post[2], c.fi_addr, post[4], ctx)
        elif kind == "tsend":
            ok = self.ep.post_tsend(post[1], post[2], post[3], c.fi_addr, post[4], ctx)
        else:  # "write"
            _, cbuf, n, desc, raddr, key, delivery = post
            ok = self.ep.post_write(cbuf, n, desc, c.fi_addr, raddr, key, ctx, delivery_complete=delivery)
        if not ok:
            del self._ops[ctx]
        return ok

    def _flush_backlog(self, c: _Conn) -> None:
        while c.backlog:
            op, post = c.backlog[0]
            try:
                ok = self._post(c, op, post)
            except fab.FabricError as exc:
                self._fail_conn(c, f"libfabric post failed: {exc}", clean=False)
                return
            if not ok:
                return
            c.backlog.popleft()

    def send(self, node_id: int, buffers: Sequence[Buffer], *, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        while True:
            if self.try_send(node_id, buffers):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SendQueueFull(f"send queue of node {node_id} still full after {timeout} s", node_id=node_id)
            with self._lock:  # drive progress ourselves: the engine thread may be the one waiting on us
                if self._closed:
                    raise TransportClosedError("transport is closed")
                self._progress()
                if now >= self._next_oob_check:
                    self._next_oob_check = now + OOB_CHECK
                    self._check_sockets(0)
                    self._check_timers(now)
            spins += 1
            # spin a little (the peer is usually about to free room), then back off up to 1 ms
            time.sleep(0 if spins < 100 else min(0.001, 0.00001 * (spins - 99)))

    # ----------------------------------------------------------------- progress
    def _drain_cq(self) -> int:
        total = 0
        poll = self.ep.poll_fast
        handle = self._on_completion
        while True:
            comps = poll()
            if comps is None:
                return total
            total += len(comps)
            for ctx, length, err, msg in comps:
                handle(ctx, length, err, msg)
            if len(comps) < 64:
                return total

    def _on_completion(self, ctx: int, n: int, error: int, message: str) -> None:
        ops = self._ops
        op = ops.get(ctx)
        if op is None:
            return
        kind = op.kind
        if kind == "recv":  # receive buffers keep their context for life
            if error:
                if not self._closed and error != self._lib.FI_ECANCELED:
                    log.warning("receive failed: %s", message)
                    if error == self._lib.FI_ETRUNC:
                        self._repost(op)
                return
            buf = op.refs[0]
            if n < HDR.size:
                log.warning("dropping a %d-byte libfabric message: shorter than a header", n)
                self._repost(op)
                return
            src, epoch, k, aux, length = HDR.unpack_from(buf, 0)
            if k == K_EAGER:
                payload = bytes(op.slot[HDR.size:n]) if length == n - HDR.size else None
            elif k == K_CTS:
                payload = (aux, length, bytes(op.slot[HDR.size:n]))
            else:
                payload = (aux, length) if n == HDR.size else None
            self._repost(op)
            c = self._by_epoch.get(epoch)
            if c is None or c.node_id != src or payload is None or not K_EAGER <= k <= K_DONE:
                log.warning("dropping a libfabric message that claims to come from node %d: unknown "
                            "connection or malformed frame", src)
                return
            if c.state != "established":
                if len(c.pending_rx) >= MAX_PENDING_RX:  # a peer that never confirms cannot grow this
                    log.warning("dropping the connection of node %d: %d libfabric messages before its "
                                "handshake completed", src, MAX_PENDING_RX)
                    self._drop_conn(c)
                    return
                c.pending_rx.append((k, payload))
                return
            self._on_message(c, k, payload)
            return
        del ops[ctx]
        c = op.conn
        if kind == "trecv":
            if c is None or c.state == "dead":
                return
            if error:
                self._fail_conn(c, f"large message receive failed: {message}", clean=False)
                return
            slot = op.refs
            slot[0] = memoryview(op.refs[1])
            slot[1] = None
            self._deliver_ready(c)
            return
        # send / write completions
        if op.slot is not None:
            if not self._closed:
                self._free_slots.append(op.slot)
            op.slot = None
        if op.mr is not None:
            op.mr.close()
            op.mr = None
        if c is None or c.state == "dead":
            return
        c.last_progress = time.monotonic()
        if op.nbytes >= 0:
            c.inflight -= 1
            c.inflight_bytes -= op.nbytes
        if error:
            self._fail_conn(c, f"libfabric {kind} failed: {message}", clean=False)
            return
        if kind == "write" and op.token is not None:
            self._events.append(RMAWriteCompleted(c.node_id, op.token))
        elif kind == "lwrite" and op.token is _DONE_AFTER:  # delivery complete: now tell the receiver
            self._send_ctrl(c, K_DONE, op.seq, op.nbytes)

    def _on_message(self, c: _Conn, k: int, payload: Any) -> None:
        if k == K_EAGER:
            if c.rx_queue:
                c.rx_queue.append([payload, None])
            else:
                self._events.append(MessageReceived(c.node_id, memoryview(payload)))
            return
        if k == K_CTS:
            self._on_cts(c, *payload)
            return
        if k == K_DONE:
            self._on_done(c, payload[0])
            return
        seq, length = payload
        if length > self.max_message_size:
            exc = FrameError(f"node {c.node_id} announced a message of {length} bytes, more than "
                             f"max_message_size {self.max_message_size}; closing the connection", node_id=c.node_id)
            log.warning("%s", exc)
            self._fail_conn(c, str(exc), clean=False)
            return
        if k == K_RTS:
            if not self.ep.has_rma:
                self._garbage_frame(c, "RMA-write protocol used but this provider has no FI_RMA")
                return
            self._on_rts(c, seq, length)
            return
        buf = bytearray(length)
        cbuf = self._ffi.from_buffer(buf)
        slot = [None, buf]
        c.rx_queue.append(slot)
        op = _Op(c, "trecv", slot)
        tag = (c.epoch << 32) | seq
        mr = self.ep.register(buf) if self.ep.needs_local_mr else None
        op.mr = mr
        ctx = self._ctx(op)
        deadline = time.monotonic() + self.stall_timeout
        while not self.ep.post_trecv(cbuf, length, mr.desc if mr else None, c.fi_addr, tag, ctx):
            self._ops.pop(ctx, None)
            self._drain_cq()
            if time.monotonic() > deadline:
                self._fail_conn(c, "could not post a large receive (-FI_EAGAIN until the deadline)", clean=False)
                return
            ctx = self._ctx(op)

    def _rx_seq(self, c: _Conn) -> int:
        s = c.rx_large_seq
        c.rx_large_seq = (s + 1) & 0xFFFFFFFF
        return s

    def _deliver_ready(self, c: _Conn) -> None:
        q = c.rx_queue
        while q and q[0][0] is not None:
            data = q.popleft()[0]
            self._events.append(MessageReceived(c.node_id, data if isinstance(data, memoryview) else memoryview(data)))

    def _check_timers(self, now: float) -> None:
        for node, (_addr, _deadline, next_try) in list(self._retry_connect.items()):
            if node not in self._connecting and node not in self._peers and now >= next_try:
                self._start_connect(node)
        for c in list(self._conns):
            if c.state in ("connecting", "handshake") and now - c.created > self.stall_timeout:
                if c.role == "initiator":
                    self._connect_failed(c, "no answer to the handshake")
                else:
                    log.info("closing a connection that did not finish its handshake in %.1f s", self.stall_timeout)
                    if c.node_id is not None and self._peers.get(c.node_id) is c:
                        del self._peers[c.node_id]
                    self._drop_conn(c)
            elif c.state == "established" and c.inflight and now - c.last_progress > self.stall_timeout:
                self._fail_conn(c, f"send queue made no progress for {self.stall_timeout:.1f} s", clean=False)

    def _check_sockets(self, timeout: float) -> bool:
        return self._handle_sock_events(self._sel.select(timeout))

    def _handle_sock_events(self, events: list) -> bool:
        for key, mask in events:
            data = key.data
            if data is None:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            if data == "cq":
                continue  # the next fi_cq_read handles it
            if data == "listen":
                self._on_listen()
            else:
                self._on_conn_event(data, mask)
        return bool(events)

    def _progress(self) -> int:
        n = self._drain_cq()
        if self._backlogged:
            self._backlogged = False
            for c in list(self._peers.values()):
                if c.backlog:
                    self._flush_backlog(c)
                    if c.backlog:
                        self._backlogged = True
        return n

    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        if self._closed:
            raise TransportClosedError("transport is closed")
        clock = time.monotonic
        start = clock()
        deadline = None if timeout is None else start + timeout
        lock = self._lock
        busy_until = self._last_activity + self.busy_wait
        while True:
            with lock:
                if self._closed:
                    raise TransportClosedError("transport is closed")
                n = self._progress()
                now = clock()
                if now >= self._next_oob_check:  # OOB sockets and timers: at most every OOB_CHECK seconds
                    self._next_oob_check = now + OOB_CHECK
                    self._check_sockets(0)
                    self._check_timers(now)
                if self._events:
                    ev, self._events = self._events, []
                    self._last_activity = now
                    return ev
            if n:
                self._last_activity = now
                busy_until = now + self.busy_wait
            if self._wake_flag:
                self._wake_flag = False
                return []
            if deadline is not None and now >= deadline:
                return []
            if now < busy_until:
                continue
            if self.ep.wait_fd is not None:
                with lock:
                    if self._closed:
                        raise TransportClosedError("transport is closed")
                    if self._events or not self.ep.trywait():
                        continue  # completions pending: poll again
                limit = MAX_SLEEP
            else:
                limit = SLEEP_SLICE
            sl = limit if deadline is None else max(0.0, min(limit, deadline - now))
            try:  # sleep without the lock, so other threads can send meanwhile
                events = self._sel.select(sl)
            except (OSError, ValueError, KeyError):
                if self._closed:
                    raise TransportClosedError("transport is closed") from None
                raise
            with lock:
                if self._closed:
                    raise TransportClosedError("transport is closed")
                self._handle_sock_events(events)
                self._next_oob_check = 0.0

    def wake(self) -> None:
        if self._closed:
            return
        self._wake_flag = True
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):
            pass


class _VerbsRMA:
    """Registered memory and one-sided writes (``transport.rma``)."""

    def __init__(self, t: VerbsTransport):
        self._t = t
        self._regions: dict[int, fab.MemoryRegion] = {}

    def register(self, buffer: Buffer) -> MemoryRegion:
        t = self._t
        lib = t._lib
        with t._lock:
            mr = t.ep.register(buffer, lib.FI_READ | lib.FI_WRITE | lib.FI_REMOTE_READ | lib.FI_REMOTE_WRITE
                               | lib.FI_SEND | lib.FI_RECV)
            self._regions[mr.key] = mr
            desc = RMA_DESC.pack(mr.key, mr.remote_base, mr.length)
            return MemoryRegion(mr.key, mr.length, desc, buffer)

    def deregister(self, region: MemoryRegion) -> None:
        with self._t._lock:
            mr = self._regions.pop(region.key, None)
            if mr is not None:
                mr.close()

    def remote_region(self, node_id: int, descriptor: bytes) -> RemoteRegion:
        if len(descriptor) != RMA_DESC.size:
            raise ValueError(f"bad RMA descriptor of {len(descriptor)} bytes (want {RMA_DESC.size})")
        key, _base, length = RMA_DESC.unpack(descriptor)
        return RemoteRegion(node_id, key, length, bytes(descriptor))

    def _local_desc(self, cbuf: Any, n: int) -> tuple[Any, Any]:
        """(desc, temporary MR) for a local source buffer when the provider needs FI_MR_LOCAL."""
        t = self._t
        if not t.ep.needs_local_mr:
            return None, None
        addr = int(t._ffi.cast("uintptr_t", cbuf))
        for mr in self._regions.values():
            if mr.address <= addr and addr + n <= mr.address + mr.length:
                return mr.desc, None
        return None, "register"

    def write(self, remote: RemoteRegion, offset: int, data: Buffer, *, token: Any = None) -> bool:
        t = self._t
        with t._lock:
            t._check_open()
            c = t._peers.get(remote.node_id)
            if c is None or c.state != "established" or c.fi_addr < 0:
                raise NotConnectedError(f"node {remote.node_id} is not connected", node_id=remote.node_id)
            key, base, length = RMA_DESC.unpack(remote.descriptor) if remote.descriptor else \
                (remote.key, 0, remote.length)
            if key != remote.key or length != remote.length:
                raise ValueError("RemoteRegion does not match its descriptor")
            mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
            n = len(mv)
            if offset < 0 or n < 0 or offset + n > length:
                raise ValueError(f"RMA write of {n} bytes at offset {offset} is outside node {remote.node_id}'s "
                                 f"region of {length} bytes (key {key})")
            if c.inflight and c.inflight >= t.tx_depth:
                return False
            cbuf = t._ffi.from_buffer(mv)
            desc, tmp = self._local_desc(cbuf, n)
            op = _Op(c, "write", (mv, cbuf), n, token)
            if tmp == "register":
                op.mr = t.ep.register(bytearray(mv))
                cbuf = t._ffi.from_buffer(op.mr.buffer)
                op.refs = (op.mr.buffer, cbuf)
                desc = op.mr.desc
            c.inflight += 1
            c.inflight_bytes += n
            if c.inflight == 1:
                c.last_progress = time.monotonic()
            t._post_or_queue(c, op, ("write", cbuf, n, desc, base + offset, key, token is not None))
            return True

    def _close(self) -> None:
        for mr in list(self._regions.values()):
            mr.close()
        self._regions.clear()
