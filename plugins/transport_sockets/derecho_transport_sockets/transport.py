"""Provider ``sockets``: the transport contract over non-blocking TCP sockets and epoll.

Design (see ``docs/transports.md``):

* one ``select.epoll`` (level-triggered) holds the listening socket, every
  connection and a wake-up socketpair; :meth:`SocketsTransport.poll` drives it
  in the calling (engine) thread: no helper threads;
* frames are ``length (u32) | kind (u8)`` then the payload; kind DATA or BYE;
* sends are *corked*: :meth:`try_send` queues the message's buffers (no copy)
  and the next :meth:`poll` writes everything queued for a peer with one
  vectored ``sendmsg`` (a sender on another thread, or a queue past
  :data:`FLUSH_BYTES`, writes at once instead);
* small frames are received in bulk into a preallocated per-connection buffer;
  a large message is received straight into its own ``bytearray`` of the
  announced size (one copy, kernel to final buffer);
* per-peer queue bounded by ``[RDMA] tx_depth`` messages and
  ``max_queued_bytes``; a queue with no write progress for
  ``sst_poll_cq_timeout_ms`` fails the peer.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import itertools
import logging
import mmap
import select
import socket
import struct
import sys
import threading
import time
from typing import Any, Sequence

from derecho_core.handshake import (
    REFUSE_DUPLICATE,
    DuplicateConnectionError,
    Handshake,
    Hello,
    load_cluster_key,
    new_incarnation,
)
from derecho_core.transport import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_QUEUED_BYTES,
    Address,
    Event,
    FrameError,
    HandshakeError,
    MessageReceived,
    NotConnectedError,
    PeerConnected,
    PeerFailed,
    SelfConnectionError,
    SendQueueFull,
    Transport,
    TransportClosedError,
    VersionMismatchError,
)

log = logging.getLogger("derecho.transport")

FRAME = struct.Struct("<IB")
K_DATA = 0
K_BYE = 1
RECV_BUF = 256 * 1024           # preallocated receive buffer per connection
LARGE = 64 * 1024               # messages at least this big get their own buffer
FLUSH_BYTES = 256 * 1024        # a corked queue past this is written at once
IOV_MAX = 1024
BIG_READ_CAP = 16 * 1024 * 1024  # bytes read per readiness event (fairness between peers)
POOL_MIN = 256 * 1024          # large receive buffers from this size are recycled ...
POOL_MAX_BYTES = 160 * 1024 * 1024  # ... up to this many bytes kept for reuse (per transport)
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
BATCH_BYTES = 4 * 1024 * 1024
EAGER_BYTES = 64 * 1024
RCVLOWAT = 512 * 1024          # while a large message arrives, epoll wakes us per this many bytes
BULK_SLICE_US = 2000           # longest blocking sendmsg when flushing a big queue (SO_SNDTIMEO)        # messages up to this size may take the write-at-once fast path  # one sendmsg takes queued buffers up to about this many bytes

_R = select.EPOLLIN
_W = select.EPOLLOUT
_RERR = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WERR = select.EPOLLOUT | select.EPOLLERR
MAX_WAIT = 0.25  # an idle poll still looks at its timers this often
MAX_HANDSHAKING = 256  # incoming connections allowed in their handshake at once


def _resolve_domain(domain: str) -> str:
    """``[RDMA] domain``: an IP address, or an interface name (its IPv4 address). No DNS look-ups."""
    try:
        ipaddress.ip_address(domain)
        return domain
    except ValueError:
        pass
    try:
        socket.if_nametoindex(domain)
    except OSError:
        names = ", ".join(name for _, name in socket.if_nameindex())
        raise ValueError(f"[RDMA] domain {domain!r} is neither an IP address nor a network interface "
                         f"(interfaces here: {names})") from None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", domain.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError as exc:
        raise ValueError(f"[RDMA] domain {domain!r}: interface has no IPv4 address ({exc.strerror})") from None
    finally:
        s.close()


class _Conn:
    __slots__ = (
        "sock", "fd", "state", "initiator", "node_id", "dial", "hs", "hs_out", "deadline", "mask",
        "rbuf", "rmv", "rstart", "rend", "big", "big_mv", "big_got",
        "iov", "msg_ends", "queued_total", "sent_total", "last_progress", "peer_addr", "incarnation",
        "remote", "gen", "last_big", "lowat",
    )

    def __init__(self, sock: socket.socket, initiator: bool, node_id: int | None, dial: Address | None):
        self.sock = sock
        self.fd = sock.fileno()
        self.state = "connecting" if initiator else "handshake"
        self.initiator = initiator
        self.node_id = node_id
        self.dial = dial
        self.hs: Handshake | None = None
        self.hs_out = bytearray()
        self.deadline = 0.0
        self.mask = 0
        self.rbuf: bytearray | None = None
        self.rmv: memoryview | None = None
        self.rstart = 0
        self.rend = 0
        self.big: bytearray | None = None
        self.big_mv: memoryview | None = None
        self.big_got = 0
        self.iov: collections.deque[Any] = collections.deque()  # bytes-like, len() == byte count
        self.msg_ends: collections.deque[int] = collections.deque()
        self.queued_total = 0
        self.sent_total = 0
        self.last_progress = 0.0
        self.peer_addr: Address | None = None
        self.incarnation = 0
        self.gen = -1
        self.last_big = False
        self.lowat = 1
        try:
            self.remote = sock.getpeername()
        except OSError:
            self.remote = dial

    @property
    def msgs(self) -> int:
        return len(self.msg_ends)

    @property
    def qbytes(self) -> int:
        return self.queued_total - self.sent_total

    def label(self) -> str:
        who = f"node {self.node_id}" if self.node_id is not None else "unknown peer"
        where = self.remote or self.dial
        return f"{who} ({where[0]}:{where[1]})" if where else who


class _Dial:
    """An outgoing connection attempt that may take several sockets (refused, self-connect)."""

    __slots__ = ("node_id", "address", "deadline", "retry_at", "conn", "backoff", "last_error")

    def __init__(self, node_id: int, address: Address, deadline: float):
        self.node_id = node_id
        self.address = address
        self.deadline = deadline
        self.retry_at = 0.0
        self.conn: _Conn | None = None
        self.backoff = 0.01
        self.last_error = ""


class SocketsTransport(Transport):
    """The ``sockets`` provider. ``SocketsTransport(conf, node_id, address)``; see the contract."""

    provider = "sockets"

    def __init__(self, conf: Any, node_id: int, address: Address, *,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES):
        self.conf = conf
        self.node_id = int(node_id)
        self.max_message_size = max_message_size
        self.max_queued_bytes = max_queued_bytes
        self.tx_depth = int(conf.get("RDMA/tx_depth"))
        self.rx_depth = int(conf.get("RDMA/rx_depth"))
        self.timeout_s = conf.get("DERECHO/sst_poll_cq_timeout_ms") / 1000.0
        self.busy_wait_s = conf.get("DERECHO/p2p_loop_busy_wait_before_sleep_ms") / 1000.0
        self.key = load_cluster_key(conf)
        self.incarnation = new_incarnation()
        host, port = address if address else ("", 0)
        domain = conf.get("RDMA/domain")
        host = _resolve_domain(domain) if domain else (host or conf.get("DERECHO/local_ip"))
        self._address: Address = (host, int(port))
        self._lock = threading.RLock()
        self._progress_lock = threading.Lock()
        self._ep = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self._ep.register(self._wake_fd, _R)
        self._listener: socket.socket | None = None
        self._listen_fd = -1
        self._next_timer = 0.0
        self._conns: dict[int, _Conn] = {}          # fd -> every live connection
        self._peers: dict[int, _Conn] = {}          # node id -> established connection
        self._accepting: dict[int, _Conn] = {}      # node id -> incoming connection past its HELLO
        self._dials: dict[int, _Dial] = {}          # node id -> outgoing attempt not yet established
        self._dirty: set[_Conn] = set()
        self._events: list[Event] = []
        self._in_select = False
        self._busy_until = 0.0
        self._closed = False
        self._pool: list[bytearray] = []
        self._gen = 0  # poll rounds: the first small message to an idle peer in a round is written at once
        self._bulk = False  # a large message is arriving: sleep in epoll rather than spin (bigger reads)
        self._flood_logged = False
        self._writers = 0  # connections whose socket is full (waiting for EPOLLOUT): then never spin

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> Address:
        return self._address

    def listen(self) -> Address:
        with self._lock:
            self._check_open()
            if self._listener is None:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(self._address)
                s.listen(128)
                s.setblocking(False)
                self._listener = s
                self._address = s.getsockname()[:2]
                self._listen_fd = s.fileno()
                self._ep.register(self._listen_fd, _R)
            return self._address

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for conn in list(self._peers.values()):
                self._say_bye(conn)
            for conn in list(self._conns.values()):
                self._drop(conn)
            if self._listener is not None:
                self._unregister(self._listen_fd)
                self._listener.close()
            self._dials.clear()
            self._events.clear()
            self._wake()
        # the poller may still be in select: close the selector once it left
        with self._progress_lock:
            self._ep.close()
            for s in (self._wake_r, self._wake_w):
                s.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError("transport is closed")

    # ------------------------------------------------------------------ connections
    def connect(self, node_id: int, address: Address) -> None:
        with self._lock:
            self._check_open()
            if node_id == self.node_id:
                raise ValueError(f"node {node_id} is this node; it cannot connect to itself")
            if node_id in self._peers or node_id in self._dials or node_id in self._accepting:
                return
            dial = _Dial(node_id, (address[0], int(address[1])), time.monotonic() + self.timeout_s)
            self._dials[node_id] = dial
            self._start_dial(dial)
        if not self._in_select:
            return
        self._wake()

    def _start_dial(self, dial: _Dial) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            err = s.connect_ex(dial.address)
        except (OSError, ValueError) as exc:  # gaierror, or a host that is no host name (UnicodeError)
            s.close()
            self._dial_failed(dial, None, f"address {dial.address[0]!r} does not resolve: {exc}", retry=False)
            return
        conn = _Conn(s, True, dial.node_id, dial.address)
        conn.deadline = dial.deadline
        dial.conn = conn
        self._conns[conn.fd] = conn
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._set_mask(conn, _W)
        else:
            self._dial_failed(dial, conn, f"connect: {errno.errorcode.get(err, err)}", retry=True)

    def _dial_failed(self, dial: _Dial, conn: _Conn | None, why: str, *, retry: bool) -> None:
        if conn is not None:
            self._drop(conn)
        dial.conn = None
        dial.last_error = why
        now = time.monotonic()
        if retry and now + dial.backoff < dial.deadline:
            dial.retry_at = now + dial.backoff
            self._arm(dial.retry_at)
            dial.backoff = min(dial.backoff * 2, 0.25)
            return
        del self._dials[dial.node_id]
        self._events.append(PeerFailed(dial.node_id, f"could not connect to node {dial.node_id} at "
                                                     f"{dial.address[0]}:{dial.address[1]}: {why}"))

    def disconnect(self, node_id: int) -> None:
        with self._lock:
            conn = self._peers.get(node_id)
            dial = self._dials.pop(node_id, None)
            if dial is not None and dial.conn is not None:
                self._drop(dial.conn)
            if conn is None:
                return
            self._say_bye(conn)
            self._fail(conn, "disconnected by this node", clean=True)

    def peers(self) -> set[int]:
        with self._lock:
            return set(self._peers)

    def queued(self, node_id: int) -> int:
        with self._lock:
            conn = self._peers.get(node_id)
            return conn.msgs if conn is not None else 0

    # ------------------------------------------------------------------ sending
    def try_send(self, node_id: int, buffers: Sequence[Any]) -> bool:
        parts = []
        size = 0
        for b in buffers:
            if type(b) is not bytes and type(b) is not bytearray:
                b = memoryview(b).cast("B")
            n = len(b)
            if n:
                parts.append(b)
                size += n
        if size > self.max_message_size:
            raise ValueError(f"message of {size} bytes exceeds max_message_size {self.max_message_size}")
        with self._lock:
            conn = self._peers.get(node_id)
            if conn is None:
                self._check_open()
                raise NotConnectedError(f"node {node_id} is not connected", node_id=node_id)
            q = conn.queued_total - conn.sent_total
            if len(conn.msg_ends) >= self.tx_depth or (q and q + size > self.max_queued_bytes):
                return False
            head = FRAME.pack(size, K_DATA)
            if not q and conn.gen != self._gen and size <= EAGER_BYTES and conn.state == "open":
                # Fast path: nothing queued and nothing sent to this peer since the last poll round:
                # write now (low latency); later messages of the same round are corked and batched.
                conn.gen = self._gen
                try:
                    n = conn.sock.sendmsg([head, *parts])
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    self._fail(conn, f"send failed: {exc.strerror or exc}")
                    return True  # the peer is reported failed; its queue is gone
                total = FRAME.size + size
                conn.sent_total += n
                conn.queued_total += total
                if n == total:
                    return True
                conn.msg_ends.append(conn.queued_total)
                conn.last_progress = now = time.monotonic()
                if now + self.timeout_s < self._next_timer:
                    self._next_timer = now + self.timeout_s + 0.001
                rest = memoryview(b"".join([head, *parts]))[n:]
                conn.iov.append(rest)
                self._set_mask(conn, _R | _W)
                return True
            if not q:
                conn.last_progress = now = time.monotonic()
                if now + self.timeout_s < self._next_timer:
                    self._next_timer = now + self.timeout_s + 0.001
            iov = conn.iov
            iov.append(head)
            iov.extend(parts)
            conn.queued_total += FRAME.size + size
            conn.msg_ends.append(conn.queued_total)
            if conn.mask & _W:
                pass  # the socket is full; poll writes when it drains
            elif self._in_select or q + size >= FLUSH_BYTES:
                self._flush(conn)
            else:
                self._dirty.add(conn)
            return True

    def send(self, node_id: int, buffers: Sequence[Any], *, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.try_send(node_id, buffers):
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SendQueueFull(f"send queue to node {node_id} still full after {timeout} s", node_id=node_id)
            slice_s = 0.05 if deadline is None else min(0.05, deadline - now)
            if self._progress_lock.acquire(blocking=False):
                try:  # nobody polls: drive everything, reading only while there is room for events
                    self._step(slice_s, read=len(self._events) < self.rx_depth, spin=False)
                finally:
                    self._progress_lock.release()
            else:  # the engine polls: push this peer's bytes, wait for room in its socket
                with self._lock:
                    conn = self._peers.get(node_id)
                    if conn is None:
                        raise NotConnectedError(f"node {node_id} failed while sending", node_id=node_id)
                    self._flush(conn)
                    fd = conn.fd
                p = select.poll()
                p.register(fd, select.POLLOUT)
                p.poll(slice_s * 1000)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        if self._closed:
            raise TransportClosedError("transport is closed")
        if not timeout and timeout is not None:  # non-blocking: one step
            with self._progress_lock:
                self._woken = False
                if not self._events:
                    self._step(0.0)
                if not self._events:
                    return []
                with self._lock:
                    ev = self._events
                    self._events = []
                    return ev
        monotonic = time.monotonic
        deadline = None if timeout is None else monotonic() + timeout
        with self._progress_lock:
            self._woken = False
            while True:
                if self._events:
                    with self._lock:
                        return self._take_events()
                if deadline is None:
                    wait = None
                else:
                    wait = deadline - monotonic()
                    if wait < 0:
                        wait = 0.0
                self._step(wait)
                if self._events:
                    with self._lock:
                        return self._take_events()
                if self._woken or self._closed or wait == 0.0:
                    self._woken = False
                    return []

    _woken = False

    def _take_events(self) -> list[Event]:
        ev = self._events
        self._events = []
        return ev

    def _step(self, wait: float | None, read: bool = True, spin: bool = True) -> None:
        """One round: flush corked queues, timers when due, one epoll wait, handle what is ready."""
        spin_until = 0.0
        with self._lock:
            if self._closed:
                return
            self._gen += 1
            dirty = self._dirty
            while dirty:
                self._flush(dirty.pop())
            if wait != 0.0 or time.monotonic() >= self._next_timer:
                now = time.monotonic()
                if now >= self._next_timer:
                    self._next_timer = self._timers(now)
                cap = self._next_timer - now
                if cap > MAX_WAIT:
                    cap = MAX_WAIT
                elif cap < 0.0:
                    cap = 0.0
                if wait is None or wait > cap:
                    wait = cap
                if self._events:
                    wait = 0.0
                elif spin and now < self._busy_until and wait > 0.0 and not self._bulk and not self._writers:
                    # busy-poll (p2p_loop_busy_wait_before_sleep_ms after activity): a tight loop, no locks
                    spin_until = self._busy_until if self._busy_until < now + wait else now + wait
                    wait = 0.0
            self._in_select = True
        try:
            ready = self._ep.poll(wait)
            if not ready and spin_until:
                ep_poll = self._ep.poll
                monotonic = time.monotonic
                while not ready and not dirty and monotonic() < spin_until:
                    ready = ep_poll(0)
        except OSError:
            ready = []
        finally:
            self._in_select = False
        if not ready:
            return
        with self._lock:
            if self._closed:
                return
            if self.busy_wait_s:
                self._busy_until = time.monotonic() + self.busy_wait_s
            conns = self._conns
            for fd, mask in ready:
                conn = conns.get(fd)
                if conn is not None:
                    self._io(conn, mask, read)
                elif fd == self._wake_fd:
                    self._drain_wake()
                elif fd == self._listen_fd:
                    self._accept()

    def wake(self) -> None:
        if not self._closed:
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = True

    # ------------------------------------------------------------------ timers
    def _arm(self, when: float) -> None:
        if when < self._next_timer:
            self._next_timer = when

    def _timers(self, now: float) -> float:
        """Deadlines: dial retries, handshakes, stalled queues. Returns when to look again."""
        due = now + MAX_WAIT
        for dial in list(self._dials.values()):
            if dial.conn is None:
                if now >= dial.retry_at:
                    self._start_dial(dial)
                else:
                    due = min(due, dial.retry_at)
        for conn in list(self._conns.values()):
            if conn.state in ("connecting", "handshake"):
                if now >= conn.deadline:
                    self._handshake_failed(conn, HandshakeError(
                        f"no handshake within {self.timeout_s * 1000:.0f} ms"), log_level=logging.WARNING)
                else:
                    due = min(due, conn.deadline)
            elif conn.state == "open" and conn.lowat > 1:
                # safety net: never rely on SO_RCVLOWAT alone (memory pressure may keep the kernel
                # from buffering that much); drop it now and then, the next EAGAIN raises it again
                self._set_lowat(conn, 1)
            if conn.state == "open" and conn.iov:
                if now - conn.last_progress > self.timeout_s:
                    log.warning("node %d: %s: no send progress for %.0f ms, reporting it failed",
                                self.node_id, conn.label(), self.timeout_s * 1000)
                    self._fail(conn, f"send made no progress for {self.timeout_s * 1000:.0f} ms")
                else:
                    due = min(due, conn.last_progress + self.timeout_s + 0.001)
        return due

    # ------------------------------------------------------------------ accept / handshake
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                s, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("node %d: accept failed: %s", self.node_id, exc)
                return
            if self._handshaking >= MAX_HANDSHAKING:
                # a flood of connections that do not finish their handshake: refuse more until they time out
                if not self._flood_logged:
                    log.warning("node %d: %d connections are in their handshake; refusing new ones for now",
                                self.node_id, self._handshaking)
                    self._flood_logged = True
                s.close()
                continue
            self._flood_logged = False
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(s, False, None, None)
            conn.deadline = time.monotonic() + self.timeout_s
            conn.hs = Handshake("acceptor", self.node_id, self.incarnation, key=self.key,
                                address=self._address, accept=lambda h, c=conn: self._accept_hello(c, h))
            self._conns[conn.fd] = conn
            self._set_mask(conn, _R)

    def _accept_hello(self, conn: _Conn, h: Hello) -> tuple[int, str] | None:
        """Duplicate-connection rules, decided by the acceptor on a HELLO (see docs/transports.md)."""
        # A HELLO is not authenticated yet (the key is proven by the CONFIRM that follows): it may refuse
        # this connection, but what it would replace (a member's connection, an accept in progress, our
        # own dial) is only given up in _established, once this connection has proven the key. Otherwise
        # one HELLO from a process without the key could evict a member.
        peer = h.node_id
        conn.node_id = peer
        old = self._peers.get(peer)
        if old is not None and old.incarnation == h.incarnation:
            return REFUSE_DUPLICATE, f"node {self.node_id} already has a connection with node {peer}"
        other = self._accepting.get(peer)
        if other is not None and other is not conn and other.incarnation == h.incarnation:
            return REFUSE_DUPLICATE, f"node {self.node_id} is already accepting node {peer}"
        dial = self._dials.get(peer)
        if dial is not None and peer > self.node_id:  # the smaller id's connection wins
            return REFUSE_DUPLICATE, f"simultaneous connect: node {self.node_id}'s own connection wins"
        conn.incarnation = h.incarnation
        self._accepting[peer] = conn
        return None

    def _handshake_io(self, conn: _Conn, data: bytes) -> None:
        assert conn.hs is not None
        try:
            out = conn.hs.receive(data)
        except HandshakeError as exc:
            reply = getattr(exc, "reply", b"")
            if reply:
                try:
                    conn.sock.send(reply)
                except OSError:
                    pass
            self._handshake_failed(conn, exc)
            return
        if out:
            conn.hs_out += out
            self._write_hs(conn)
        if conn.hs.done and conn.state == "handshake":
            self._established(conn)

    def _handshake_failed(self, conn: _Conn, exc: Exception, log_level: int | None = None) -> None:
        dial = self._dials.get(conn.node_id) if conn.initiator else None
        if dial is not None and dial.conn is not conn:
            dial = None
        if isinstance(exc, DuplicateConnectionError):
            log.debug("node %d: %s: %s", self.node_id, conn.label(), exc)
            if dial is not None:
                self._dials.pop(dial.node_id, None)
            self._drop(conn)
            return
        if isinstance(exc, SelfConnectionError) and dial is not None:
            log.info("node %d: connection to %s reached this node itself; retrying", self.node_id, conn.label())
            self._dial_failed(dial, conn, str(exc), retry=True)
            return
        level = log_level or (logging.ERROR if isinstance(exc, (VersionMismatchError,)) or
                              type(exc).__name__ == "AuthenticationError" else logging.WARNING)
        log.log(level, "node %d: handshake with %s failed, connection closed: %s", self.node_id, conn.label(), exc)
        if conn.node_id is not None and self._accepting.get(conn.node_id) is conn:
            del self._accepting[conn.node_id]
        if dial is not None:
            self._dial_failed(dial, conn, f"handshake failed: {exc}", retry=False)
        else:
            self._drop(conn)

    def _write_hs(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.hs_out)
            del conn.hs_out[:n]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._handshake_failed(conn, HandshakeError(f"send failed: {exc}"))
            return
        if conn.fd in self._conns:
            self._set_mask(conn, _R | (_W if conn.hs_out else 0))

    def _established(self, conn: _Conn) -> None:
        assert conn.hs is not None and conn.hs.peer is not None
        h = conn.hs.peer
        peer = h.node_id
        conn.node_id = peer
        conn.incarnation = h.incarnation
        conn.peer_addr = h.address or conn.remote
        if self._accepting.get(peer) is conn:
            del self._accepting[peer]
        if conn.initiator:
            self._dials.pop(peer, None)
        else:
            # an authenticated accepted connection wins over our own dial to the same (smaller-id) peer
            dial = self._dials.pop(peer, None)
            if dial is not None and dial.conn is not None and dial.conn is not conn:
                self._drop(dial.conn)
        old = self._peers.get(peer)
        if old is not None and old is not conn:
            reason = ("peer restarted (new incarnation connected)" if old.incarnation != h.incarnation
                      else "replaced by a new connection")
            self._fail(old, reason)
        conn.state = "open"
        try:  # bounds the blocking sendmsg of _flush_bulk; no effect while the socket is non-blocking
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, BULK_SLICE_US))
        except OSError:
            pass
        conn.rbuf = bytearray(RECV_BUF)
        conn.rmv = memoryview(conn.rbuf)
        if conn.hs_out:  # the CONFIRM not written yet goes first
            conn.iov.append(bytes(conn.hs_out))
            conn.queued_total += len(conn.hs_out)
            conn.hs_out.clear()
            conn.last_progress = time.monotonic()
        leftover = conn.hs.leftover
        conn.hs = None
        self._peers[peer] = conn
        self._events.append(PeerConnected(peer, conn.peer_addr, conn.incarnation))
        log.debug("node %d: connected to %s", self.node_id, conn.label())
        if leftover:
            n = len(leftover)
            conn.rmv[:n] = leftover
            conn.rend = n
            self._parse(conn)
        if conn.state == "open":
            self._flush(conn)

    # ------------------------------------------------------------------ I/O
    def _io(self, conn: _Conn, mask: int, read: bool) -> None:
        if conn.state == "open":
            if mask & _W:
                if conn.queued_total - conn.sent_total >= FLUSH_BYTES:
                    self._flush_bulk(conn)
                else:
                    self._flush(conn)
            if mask & _RERR and read and conn.state == "open":
                self._read(conn)
            return
        if conn.state == "connecting":
            if mask & _WERR:
                self._connected(conn)
            return
        if conn.state == "handshake":
            if mask & _WERR and conn.hs_out:
                self._write_hs(conn)
            if mask & _RERR and conn.state == "handshake":
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._handshake_failed(conn, HandshakeError(f"connection error during handshake: {exc}"))
                    return
                if not data:
                    self._handshake_failed(conn, HandshakeError("connection closed during handshake"),
                                           log_level=logging.INFO)
                    return
                self._handshake_io(conn, data)
            return

    def _connected(self, conn: _Conn) -> None:
        dial = self._dials.get(conn.node_id)  # type: ignore[arg-type]
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if dial is None or dial.conn is not conn:
            self._drop(conn)
            return
        if err:
            self._dial_failed(dial, conn, errno.errorcode.get(err, str(err)), retry=True)
            return
        try:
            local, remote = conn.sock.getsockname(), conn.sock.getpeername()
        except OSError as exc:
            self._dial_failed(dial, conn, str(exc), retry=True)
            return
        conn.remote = remote
        if local == remote:
            log.info("node %d: connect to node %d at %s:%d reached this socket itself "
                     "(TCP simultaneous open); retrying", self.node_id, dial.node_id, *remote[:2])
            self._dial_failed(dial, conn, "connected to itself (TCP simultaneous open)", retry=True)
            return
        conn.state = "handshake"
        conn.hs = Handshake("initiator", self.node_id, self.incarnation, key=self.key,
                            expected_peer=dial.node_id, address=self._address)
        conn.hs_out += conn.hs.start()
        self._write_hs(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write as much of the peer's queue as the socket takes, in vectored batches."""
        if conn.state != "open":
            return
        iov = conn.iov
        sendmsg = conn.sock.sendmsg
        while iov:
            if len(iov) == 1:
                batch = [iov[0]]
                want = len(batch[0])
            elif len(iov) <= 64 and conn.queued_total - conn.sent_total <= BATCH_BYTES:
                batch = list(iov)
                want = conn.queued_total - conn.sent_total
            else:
                batch = []
                want = 0
                for b in itertools.islice(iov, 0, IOV_MAX):
                    batch.append(b)
                    want += len(b)
                    if want >= BATCH_BYTES:
                        break
            try:
                n = sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(conn, f"send failed: {exc.strerror or exc}")
                return
            conn.sent_total += n
            conn.last_progress = time.monotonic()
            full = n < want
            popleft = iov.popleft
            while n:
                ln = len(iov[0])
                if ln <= n:
                    n -= ln
                    popleft()
                else:
                    iov[0] = memoryview(iov[0])[n:]
                    n = 0
            ends = conn.msg_ends
            while ends and ends[0] <= conn.sent_total:
                ends.popleft()
            if full:
                break  # partial write: the socket is full
        self._set_mask(conn, _R | (_W if iov else 0))

    def _read(self, conn: _Conn) -> None:
        sock = conn.sock
        budget = BIG_READ_CAP
        self._bulk = False
        while budget > 0:
            try:
                if conn.big is not None:
                    n = sock.recv_into(conn.big_mv[conn.big_got:])  # type: ignore[index]
                else:
                    if conn.rend == len(conn.rbuf):  # type: ignore[arg-type]
                        self._compact(conn)
                    if conn.last_big and conn.rend == 0:
                        # large messages stream in: read the next header alone, so the payload
                        # goes straight into its own buffer instead of through rbuf (one copy less)
                        n = sock.recv_into(conn.rmv[:FRAME.size])  # type: ignore[index]
                    else:
                        n = sock.recv_into(conn.rmv[conn.rend:])  # type: ignore[index]
            except (BlockingIOError, InterruptedError):
                if conn.big is not None:
                    self._bulk = True
                    # wake up only once a good piece of the message is there (SO_RCVLOWAT):
                    # fewer, larger reads, as a blocking recv would do
                    want = min(len(conn.big) - conn.big_got, RCVLOWAT)
                    if want != conn.lowat:
                        self._set_lowat(conn, want)
                return
            except OSError as exc:
                self._fail(conn, f"connection error: {exc.strerror or exc}")
                return
            if n == 0:
                pending = conn.big is not None or conn.rend > conn.rstart
                why = "connection closed by peer in the middle of a frame (truncated)" if pending else \
                    "connection closed by peer"
                if pending:
                    log.warning("node %d: %s: %s", self.node_id, conn.label(), why)
                self._fail(conn, why)
                return
            budget -= n
            if conn.big is not None:
                conn.big_got += n
                if conn.big_got == len(conn.big):
                    self._events.append(MessageReceived(conn.node_id, conn.big_mv))  # type: ignore[arg-type]
                    conn.big = conn.big_mv = None
                    conn.big_got = 0
                    if conn.lowat != 1:
                        self._set_lowat(conn, 1)
                    self._bulk = True  # more large messages probably follow: do not spin for them
                    return  # hand it over before the next large buffer is needed (lets buffers recycle)
                continue
            conn.rend += n
            if not self._parse(conn):
                return
            if n < 16384 and conn.big is None:
                return  # the socket is probably drained; the selector tells us when there is more

    def _flush_bulk(self, conn: _Conn) -> None:
        """Flush a big queue with one *blocking* sendmsg bounded by SO_SNDTIMEO (BULK_SLICE).

        A non-blocking socket wakes us for every few tens of KiB the peer drains;
        in Python each wake-up costs more than copying them. Blocking for at most
        BULK_SLICE lets the kernel refill the socket as the peer drains it, as
        ``sendall`` does.
        """
        sock = conn.sock
        try:
            sock.setblocking(True)
        except OSError:
            self._flush(conn)
            return
        try:
            self._flush(conn)
        finally:
            if conn.state == "open":
                try:
                    sock.setblocking(False)
                except OSError:
                    pass

    def _set_lowat(self, conn: _Conn, n: int) -> None:
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            conn.lowat = n
        except OSError:
            conn.lowat = 1

    def _compact(self, conn: _Conn) -> None:
        rest = conn.rend - conn.rstart
        if conn.rstart:
            conn.rmv[:rest] = conn.rmv[conn.rstart:conn.rend]  # type: ignore[index]
        conn.rstart, conn.rend = 0, rest

    def _parse(self, conn: _Conn) -> bool:
        """Cut whole frames out of the receive buffer. False if the connection was closed."""
        rbuf, rmv = conn.rbuf, conn.rmv
        assert rbuf is not None and rmv is not None
        pos, end = conn.rstart, conn.rend
        events = self._events
        node = conn.node_id
        hdr = FRAME.size
        while end - pos >= hdr:
            length, kind = FRAME.unpack_from(rbuf, pos)
            if kind != K_DATA:
                if kind == K_BYE and length == 0:
                    conn.rstart = conn.rend = 0
                    self._fail(conn, "peer closed the connection", clean=True)
                    return False
                return self._frame_error(conn, f"unknown frame kind {kind} (length {length})")
            if length > self.max_message_size:
                return self._frame_error(conn, f"absurd frame length {length} (max_message_size "
                                               f"{self.max_message_size})")
            avail = end - pos - hdr
            if avail >= length:
                events.append(MessageReceived(node, rbuf[pos + hdr:pos + hdr + length]))  # type: ignore[arg-type]
                pos += hdr + length
                conn.last_big = length >= LARGE
                continue
            if length >= LARGE or hdr + length > len(rbuf):
                conn.last_big = True
                big = self._big_buffer(length)
                big[:avail] = rmv[pos + hdr:end]
                conn.big, conn.big_mv, conn.big_got = big, memoryview(big), avail
                pos = end
            break
        if pos == end:
            conn.rstart = conn.rend = 0
        else:
            conn.rstart = pos
            if pos > len(rbuf) // 2:
                self._compact(conn)
        return True

    def _big_buffer(self, n: int) -> bytearray:
        """A buffer for one large message: a recycled one nobody references any more, else a new one.

        The receiver owns what it gets (it may keep it); a buffer is reused only
        once the application dropped every reference to it (CPython refcount).
        """
        if n < POOL_MIN:
            return bytearray(n)
        pool = self._pool
        for buf in pool:
            if len(buf) == n and sys.getrefcount(buf) == 3:  # the pool, ``buf``, getrefcount's argument
                return buf
        # anonymous mmap: zero pages from the kernel, no memset of the whole buffer in user space
        buf = mmap.mmap(-1, n, flags=_MAP_FLAGS)
        pool.append(buf)
        while sum(len(b) for b in pool) > POOL_MAX_BYTES:
            pool.pop(0)
        return buf

    def _frame_error(self, conn: _Conn, why: str) -> bool:
        log.warning("node %d: %s sent garbage, closing that connection: %s", self.node_id, conn.label(), why)
        exc = FrameError(why, node_id=conn.node_id)
        self._fail(conn, f"protocol error: {exc}")
        return False

    # ------------------------------------------------------------------ teardown
    def _say_bye(self, conn: _Conn) -> None:
        if conn.state != "open":
            return
        try:
            # best effort, after what is already queued; whatever does not fit is dropped
            self._flush(conn)
            if not conn.iov:
                conn.sock.send(FRAME.pack(0, K_BYE))
        except OSError:
            pass

    def _fail(self, conn: _Conn, why: str, clean: bool = False) -> None:
        was_open = conn.state == "open"
        node = conn.node_id
        self._drop(conn)
        if was_open and node is not None and self._peers.get(node) is conn:
            del self._peers[node]
            self._events.append(PeerFailed(node, why, clean))
            log.log(logging.INFO if clean else logging.WARNING, "node %d: peer %d %s: %s",
                    self.node_id, node, "disconnected" if clean else "failed", why)

    def _drop(self, conn: _Conn) -> None:
        if conn.state == "closed":
            return
        conn.state = "closed"
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if conn.mask:
            self._unregister(conn.fd)
            if conn.mask & _W:
                self._writers -= 1
            conn.mask = 0
        self._dirty.discard(conn)
        if conn.node_id is not None and self._accepting.get(conn.node_id) is conn:
            del self._accepting[conn.node_id]
        try:
            conn.sock.close()
        except OSError:
            pass
        conn.iov.clear()
        conn.msg_ends.clear()
        conn.sent_total = conn.queued_total

    @property
    def _handshaking(self) -> int:
        return sum(1 for c in self._conns.values() if not c.initiator and c.state == "handshake")

    def _set_mask(self, conn: _Conn, mask: int) -> None:
        if mask == conn.mask:
            return
        self._writers += bool(mask & _W) - bool(conn.mask & _W)
        if conn.mask == 0:
            self._ep.register(conn.fd, mask)
        else:
            self._ep.modify(conn.fd, mask)
        conn.mask = mask

    def _unregister(self, fd: int) -> None:
        try:
            self._ep.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def __repr__(self) -> str:
        return f"<SocketsTransport node {self.node_id} at {self._address[0]}:{self._address[1]}>"
