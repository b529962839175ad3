"""The transport conformance suite: every transport plugin runs it against itself.

Use it from a plugin's tests::

    from derecho_core.testing.transport import TransportConformance

    class TestSocketsConformance(TransportConformance):
        provider = "sockets"            # the name registered with derecho_register_transports

pytest then runs every ``test_*`` method below against that provider. Peers
run in this process (:class:`Node`, a transport polled by a background
thread) or as subprocesses (:class:`PeerProcess`: ``python -m
derecho_core.testing.transport``) when a test must SIGKILL, SIGSTOP or restart
them. Everything stays on 127.0.0.1 on ports picked free at run time; every
test has its own time limit and kills its subprocesses.

Hooks a plugin may override (class attributes / methods):

* ``conf_overrides``: extra ``SECTION/key`` values for every node;
* ``frames_over_tcp``: False if messages do not travel as frames on the
  connection accepted at ``transport.address`` (then the post-handshake
  garbage tests are skipped; the pre-handshake ones still run);
* :meth:`TransportConformance.frame` to build a raw frame when the plugin does
  not use the default ``length u32 | kind u8`` framing;
* ``fail_bound_s``: how soon a SIGKILLed peer must be reported failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable

from ..conf import Conf
from ..transport import (
    MessageReceived,
    NotConnectedError,
    PeerConnected,
    PeerFailed,
    SendQueueFull,
    Transport,
    TransportClosedError,
    open_transport,
)

HOST = "127.0.0.1"
#: settings every suite node uses unless the plugin overrides them
BASE_OVERRIDES: dict[str, Any] = {
    "DERECHO/sst_poll_cq_timeout_ms": 1500,
    "DERECHO/p2p_loop_busy_wait_before_sleep_ms": 0,
    "RDMA/tx_depth": 64,
}
_ID = struct.Struct("<IIQ")  # sender id, stream, sequence number


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_conf(overrides: dict[str, Any] | None = None) -> Conf:
    merged = dict(BASE_OVERRIDES)
    merged.update(overrides or {})
    return Conf.load(overrides=merged, environ={})


def payload(sender: int, stream: int, seq: int, size: int) -> bytes:
    """A self-describing message of ``size`` bytes (at least 16): ids, then a pattern derived from them."""
    head = _ID.pack(sender, stream, seq)
    if size <= len(head):
        return head
    unit = struct.pack("<Q", (seq * 2654435761 + stream * 97 + sender) & 0xFFFFFFFFFFFFFFFF)
    body = (unit * ((size - len(head)) // 8 + 1))[: size - len(head)]
    return head + body


def check_payload(data: Any) -> tuple[int, int, int]:
    """Decode and verify a :func:`payload`; returns ``(sender, stream, seq)``."""
    b = bytes(data)
    sender, stream, seq = _ID.unpack_from(b)
    assert b == payload(sender, stream, seq, len(b)), f"corrupted message {sender}/{stream}/{seq} of {len(b)} bytes"
    return sender, stream, seq


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Node:
    """A transport in this process, polled by a background thread that collects its events."""

    def __init__(self, provider: str, node_id: int, conf: Conf, port: int = 0, pump: bool = True):
        self.node_id = node_id
        self.t: Transport = open_transport(conf, node_id, (HOST, port), provider)
        self.address = self.t.listen()
        self._events: list[Any] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        if pump:
            self._thread = threading.Thread(target=self._run, name=f"pump-{node_id}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                evs = self.t.poll(0.2)
            except TransportClosedError:
                return
            if evs:
                with self._cv:
                    self._events.extend(evs)
                    self._cv.notify_all()

    def wait_for(self, pred: Callable[[Any], bool], timeout: float, what: str = "event") -> Any:
        """Remove and return the first collected event matching ``pred``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, ev in enumerate(self._events):
                    if pred(ev):
                        return self._events.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"node {self.node_id}: no {what} within {timeout} s; "
                                         f"events: {self._events[:10]}")
                self._cv.wait(left)

    def connected(self, peer: int, timeout: float = 5.0) -> PeerConnected:
        return self.wait_for(lambda e: isinstance(e, PeerConnected) and e.node_id == peer, timeout,
                             f"PeerConnected({peer})")

    def failed(self, peer: int, timeout: float = 5.0) -> PeerFailed:
        return self.wait_for(lambda e: isinstance(e, PeerFailed) and e.node_id == peer, timeout,
                             f"PeerFailed({peer})")

    def messages(self, peer: int, n: int, timeout: float = 10.0) -> list[Any]:
        out = []
        deadline = time.monotonic() + timeout
        for _ in range(n):
            ev = self.wait_for(lambda e: isinstance(e, MessageReceived) and e.node_id == peer,
                               max(0.0, deadline - time.monotonic()), f"message {len(out) + 1}/{n} from {peer}")
            out.append(ev.data)
        return out

    def pending(self, kind: type) -> list[Any]:
        with self._cv:
            return [e for e in self._events if isinstance(e, kind)]

    def close(self) -> None:
        self._stop = True
        try:
            self.t.wake()
            self.t.close()
        except Exception:  # noqa: BLE001 - cleanup must go on
            pass
        if self._thread is not None:
            self._thread.join(5)


class PeerProcess:
    """A peer node in a subprocess (``python -m derecho_core.testing.transport``).

    Modes: ``echo`` (send every message back), ``sink`` (count), ``send``
    (send ``count`` :func:`payload` messages to ``send_to`` once connected).
    It prints one JSON line per event on stdout; it exits when its stdin closes.
    """

    def __init__(self, provider: str, node_id: int, *, port: int = 0, mode: str = "echo",
                 connect: Iterable[tuple[int, tuple[str, int]]] = (), overrides: dict[str, Any] | None = None,
                 wire_version: int | None = None, send_to: int | None = None, count: int = 0,
                 max_size: int = 2048, seed: int = 1):
        merged = dict(BASE_OVERRIDES)
        merged.update(overrides or {})
        cmd = [sys.executable, "-m", "derecho_core.testing.transport", "--provider", provider,
               "--node-id", str(node_id), "--port", str(port), "--mode", mode,
               "--conf", json.dumps(merged), "--count", str(count), "--max-size", str(max_size),
               "--seed", str(seed)]
        for peer, addr in connect:
            cmd += ["--connect", f"{peer}:{addr[0]}:{addr[1]}"]
        if wire_version is not None:
            cmd += ["--wire-version", str(wire_version)]
        if send_to is not None:
            cmd += ["--send-to", str(send_to)]
        self.node_id = node_id
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self._lines: queue.Queue[dict] = queue.Queue()
        self._backlog: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait("ready", 20.0)
        self.address = (HOST, ready["ready"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    self._lines.put(json.loads(line))
                except ValueError:
                    pass
        except ValueError:  # the test closed the pipe while this thread was reading: it is done
            pass

    def wait(self, key: str, timeout: float, pred: Callable[[dict], bool] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        for i, item in enumerate(self._backlog):
            if key in item and (pred is None or pred(item)):
                return self._backlog.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"peer {self.node_id}: no {key!r} within {timeout} s "
                                     f"(exit {self.proc.poll()}); stderr: {self.stderr_text()[-2000:]}")
            try:
                item = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if key in item and (pred is None or pred(item)):
                return item
            self._backlog.append(item)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self.stderr.close()


def raw_handshake(address: tuple[str, int], node_id: int, expected: int, key: bytes | None = None,
                  timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Connect a plain socket and complete the handshake as ``node_id``; returns it and leftover bytes."""
    from ..handshake import Handshake, new_incarnation

    s = socket.create_connection(address, timeout=timeout)
    hs = Handshake("initiator", node_id, new_incarnation(), key=key, expected_peer=expected)
    s.sendall(hs.start())
    while not hs.done:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed during handshake")
        out = hs.receive(data)
        if out:
            s.sendall(out)
    return s, hs.leftover


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True if the other end closes ``s`` within ``timeout`` (reading and discarding what comes)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        s.settimeout(left)
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


# ----------------------------------------------------------------------------- the suite

try:
    import pytest
except ImportError:  # pragma: no cover - the suite needs pytest, the peer program does not
    pytest = None  # type: ignore[assignment]


def _timeout(seconds: int):
    if pytest is None:  # pragma: no cover
        return lambda f: f
    return pytest.mark.timeout(seconds)


class TransportConformance:
    """Subclass as ``Test...`` with ``provider = "name"``; pytest runs every test against it."""

    provider: str = ""
    conf_overrides: dict[str, Any] = {}
    frames_over_tcp: bool = True
    fail_bound_s: float = 3.0

    # -- plumbing -----------------------------------------------------------------
    def setup_method(self, method: Any) -> None:
        self._owned: list[Any] = []

    def teardown_method(self, method: Any) -> None:
        for obj in reversed(self._owned):
            try:
                obj.stop() if isinstance(obj, PeerProcess) else obj.close()
            except Exception:  # noqa: BLE001
                pass

    def conf(self, **extra: Any) -> Conf:
        o = dict(self.conf_overrides)
        o.update({k.replace("__", "/"): v for k, v in extra.items()})
        return make_conf(o)

    def node(self, node_id: int, conf: Conf | None = None, **kw: Any) -> Node:
        n = Node(self.provider, node_id, conf or self.conf(), **kw)
        self._owned.append(n)
        return n

    def peer(self, node_id: int, **kw: Any) -> PeerProcess:
        overrides = dict(self.conf_overrides)
        overrides.update(kw.pop("overrides", {}) or {})
        p = PeerProcess(self.provider, node_id, overrides=overrides, **kw)
        self._owned.append(p)
        return p

    def pair(self, conf_a: Conf | None = None, conf_b: Conf | None = None) -> tuple[Node, Node]:
        a, b = self.node(1, conf_a), self.node(2, conf_b)
        a.t.connect(2, b.address)
        a.connected(2)
        b.connected(1)
        return a, b

    def frame(self, length: int, kind: int = 0, body: bytes = b"") -> bytes:
        """A raw frame in the default framing: ``length u32 | kind u8 | body``."""
        return struct.pack("<IB", length, kind) + body

    @staticmethod
    def transport_logs(caplog: Any) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name.startswith(("derecho.transport", "derecho.sst")) and r.levelno >= logging.INFO]

    # -- basics ---------------------------------------------------------------------
    @_timeout(30)
    def test_registered_and_contract(self) -> None:
        from .. import plugins

        factory = plugins.transport(self.provider)
        t = factory(self.conf(), 5, (HOST, 0))
        try:
            assert isinstance(t, Transport) or all(hasattr(t, m) for m in (
                "listen", "connect", "try_send", "send", "poll", "wake", "close", "disconnect", "peers", "queued"))
            host, port = t.listen()
            assert host == HOST and port > 0
            assert t.poll(0) == []
            with pytest.raises(NotConnectedError):
                t.try_send(9, [b"x"])
            with pytest.raises(ValueError):
                t.connect(5, (HOST, port))  # itself, by node id
            assert t.queued(9) == 0 and t.peers() == set()
        finally:
            t.close()
        t.close()  # idempotent
        with pytest.raises(TransportClosedError):
            t.poll(0)
        t.wake()  # no-op after close

    @_timeout(30)
    def test_wake_interrupts_poll(self) -> None:
        n = self.node(1, pump=False)
        got: list[Any] = []
        th = threading.Thread(target=lambda: got.append(n.t.poll(None)))
        th.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        n.t.wake()
        th.join(5)
        assert not th.is_alive() and got == [[]]
        assert time.monotonic() - t0 < 1.0

    @_timeout(30)
    def test_connect_exchange_and_disconnect(self) -> None:
        a, b = self.pair()
        assert a.t.peers() == {2} and b.t.peers() == {1}
        assert a.t.try_send(2, [b"ab", bytearray(b"cd"), memoryview(b"ef")])
        a.t.send(2, [], timeout=1)
        assert [bytes(m) for m in b.messages(1, 2)] == [b"abcdef", b""]
        b.t.send(1, [b"back"], timeout=1)
        assert [bytes(m) for m in a.messages(2, 1)] == [b"back"]
        a.t.max_message_size = 1000
        with pytest.raises(ValueError):
            a.t.try_send(2, [bytes(1001)])
        a.t.disconnect(2)
        assert a.failed(2).clean
        assert b.failed(1).clean
        with pytest.raises(NotConnectedError):
            a.t.try_send(2, [b"x"])

    @_timeout(30)
    def test_simultaneous_connect_yields_one_connection(self) -> None:
        for _ in range(3):
            a, b = self.node(1), self.node(2)
            a.t.connect(2, b.address)
            b.t.connect(1, a.address)
            a.connected(2)
            b.connected(1)
            a.t.send(2, [b"from a"], timeout=2)
            b.t.send(1, [b"from b"], timeout=2)
            assert bytes(b.messages(1, 1)[0]) == b"from a"
            assert bytes(a.messages(2, 1)[0]) == b"from b"
            time.sleep(0.3)
            assert not a.pending(PeerFailed) and not b.pending(PeerFailed)
            assert not a.pending(PeerConnected) and not b.pending(PeerConnected)
            a.close()
            b.close()

    @_timeout(30)
    def test_connect_to_own_address_is_detected(self, caplog: Any) -> None:
        a = self.node(1)
        a.t.connect(7, a.address)  # our own listening address under another id
        ev = a.failed(7, timeout=self.fail_bound_s + 3)
        assert "itself" in ev.reason or "own id" in ev.reason, ev.reason
        assert a.t.peers() == set()

    @_timeout(30)
    def test_unreachable_peer_reported_failed(self) -> None:
        a = self.node(1)
        t0 = time.monotonic()
        a.t.connect(3, (HOST, free_port()))
        a.failed(3, timeout=self.fail_bound_s + 3)
        assert time.monotonic() - t0 < self.fail_bound_s + 3

    # -- data -----------------------------------------------------------------------
    @_timeout(60)
    def test_message_sizes_0_to_64MB(self) -> None:
        a, b = self.pair()
        sizes = [0, 1, 16, 17, 4095, 65535, 65536, 65537, (1 << 20) + 3, 16 << 20, 64 << 20]
        for i, size in enumerate(sizes):
            if size < 16:
                msg = bytes([i]) * size
                a.t.send(2, [msg], timeout=10)
                assert bytes(b.messages(1, 1, timeout=20)[0]) == msg
                continue
            msg = payload(1, 0, i, size)
            half = size // 2
            a.t.send(2, [msg[:half], memoryview(msg)[half:]], timeout=10)
            got = b.messages(1, 1, timeout=30)[0]
            assert len(got) == size
            assert check_payload(got) == (1, 0, i)
            del got, msg

    @_timeout(60)
    def test_order_and_no_loss_under_concurrent_senders(self) -> None:
        rx = self.node(1)
        # three sender processes ...
        n_proc, per_proc = 3, 1500
        procs = [self.peer(10 + k, mode="send", connect=[(1, rx.address)], send_to=1, count=per_proc,
                           max_size=3000, seed=k) for k in range(3)]
        # ... and three threads sharing one transport in this process
        tx = self.node(2)
        tx.t.connect(1, rx.address)
        tx.connected(1)
        per_thread = 1500

        def sender(stream: int) -> None:
            for seq in range(per_thread):
                tx.t.send(1, [payload(2, stream, seq, 16 + (seq * 37 + stream) % 3000)], timeout=10)

        threads = [threading.Thread(target=sender, args=(s,)) for s in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(40)
        expect: dict[tuple[int, int], int] = {}
        total = n_proc * per_proc + 3 * per_thread
        deadline = time.monotonic() + 40
        for _ in range(total):
            ev = rx.wait_for(lambda e: isinstance(e, MessageReceived), deadline - time.monotonic(), "message")
            sender_id, stream, seq = check_payload(ev.data)
            assert ev.node_id == sender_id
            key = (sender_id, stream)
            assert seq == expect.get(key, 0), f"stream {key}: got {seq}, expected {expect.get(key, 0)}"
            expect[key] = seq + 1
        assert all(expect[(10 + k, 0)] == per_proc for k in range(n_proc))
        assert all(expect[(2, s)] == per_thread for s in range(3))
        for p in procs:
            p.wait("sent", 10)

    @_timeout(60)
    def test_eight_peers_at_once(self) -> None:
        hub = self.node(1)
        peers = [self.peer(100 + k, mode="echo") for k in range(8)]
        for p in peers:
            hub.t.connect(p.node_id, p.address)
        for p in peers:
            hub.connected(p.node_id, timeout=10)
        rounds = 30
        for seq in range(rounds):
            for p in peers:
                hub.t.send(p.node_id, [payload(1, p.node_id, seq, 16 + seq * 101 % 5000)], timeout=10)
        for p in peers:
            got = [check_payload(m) for m in hub.messages(p.node_id, rounds, timeout=20)]
            assert got == [(1, p.node_id, s) for s in range(rounds)]

    # -- failures ---------------------------------------------------------------------
    @_timeout(30)
    def test_sigkilled_peer_reported_failed_within_bound(self) -> None:
        hub = self.node(1)
        p = self.peer(2, mode="echo")
        hub.t.connect(2, p.address)
        hub.connected(2)
        hub.t.send(2, [b"ping"], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == b"ping"
        t0 = time.monotonic()
        p.kill()
        ev = hub.failed(2, timeout=self.fail_bound_s + 2)
        elapsed = time.monotonic() - t0
        assert not ev.clean
        assert elapsed < self.fail_bound_s, f"SIGKILLed peer reported after {elapsed:.2f} s"
        assert 2 not in hub.t.peers()

    @_timeout(30)
    def test_half_open_connections_do_not_block_the_node(self, caplog: Any) -> None:
        caplog.set_level(logging.INFO, logger="derecho")
        hub = self.node(1)
        silent = socket.create_connection(hub.address)          # connects, says nothing
        partial = socket.create_connection(hub.address)         # starts a HELLO, stops
        partial.sendall(b"DERECHO\x00\x01")
        other = self.node(2)
        other.t.connect(1, hub.address)
        hub.connected(2)
        other.t.send(1, [b"still served"], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == b"still served"
        bound = BASE_OVERRIDES["DERECHO/sst_poll_cq_timeout_ms"] / 1000 + 3
        assert closed_by_peer(silent, bound), "a connection without handshake was never closed"
        assert closed_by_peer(partial, bound), "a half-finished handshake was never closed"
        silent.close()
        partial.close()
        assert hub.t.peers() == {2}

    @_timeout(40)
    def test_stalled_peer_reported_failed(self) -> None:
        """A peer that is alive but stops reading (SIGSTOP): its send queue stalls, it is reported failed."""
        hub = self.node(1, self.conf(DERECHO__sst_poll_cq_timeout_ms=1000))
        p = self.peer(2, mode="echo")
        hub.t.connect(2, p.address)
        hub.connected(2)
        p.signal(signal.SIGSTOP)
        try:
            chunk = bytes(1 << 20)
            t0 = time.monotonic()
            failed = None
            while time.monotonic() - t0 < 15:
                try:
                    if not hub.t.try_send(2, [chunk]):
                        time.sleep(0.05)
                except NotConnectedError:
                    break
                failed = hub.pending(PeerFailed)
                if failed:
                    break
            ev = hub.failed(2, timeout=5)
            assert not ev.clean and "progress" in ev.reason, ev.reason
        finally:
            p.signal(signal.SIGCONT)

    @_timeout(40)
    def test_stopped_reader_pushes_back_with_bounded_memory(self) -> None:
        """Acceptance 2: a peer stops reading; the sender is pushed back; RSS growth stays under 64 MiB."""
        limit = 64 << 20
        hub = self.node(1, self.conf(DERECHO__sst_poll_cq_timeout_ms=60000, RDMA__tx_depth=8))
        p = self.peer(2, mode="sink")
        hub.t.connect(2, p.address)
        hub.connected(2)
        p.signal(signal.SIGSTOP)
        try:
            size = 1 << 20
            base = rss_bytes()
            accepted = refused = 0
            for i in range(256):  # 256 MiB offered
                msg = bytes([i & 0xFF]) * size  # fresh memory each time
                if hub.t.try_send(2, [msg]):
                    accepted += 1
                else:
                    refused += 1
                    time.sleep(0.002)
                del msg
            # a blocking send gives up at its deadline (the kernel may still take a little now and then)
            pushed_back = False
            for _ in range(20):
                try:
                    hub.t.send(2, [bytes(size)], timeout=0.3)
                except SendQueueFull:
                    pushed_back = True
                    break
            assert pushed_back, "send() never raised SendQueueFull against a stopped reader"
            growth = rss_bytes() - base
            assert refused > 0 and accepted < 128, (accepted, refused)
            assert hub.t.queued(2) <= 8
            assert growth < limit, f"RSS grew by {growth >> 20} MiB with a stopped reader (limit {limit >> 20})"
            assert 2 in hub.t.peers()
        finally:
            p.signal(signal.SIGCONT)
        p.wait("received", 30, lambda d: d["received"] >= 1)

    # -- garbage on the port ----------------------------------------------------------------
    def _hub_and_witness(self) -> tuple[Node, Node]:
        hub = self.node(1)
        w = self.node(2)
        w.t.connect(1, hub.address)
        hub.connected(2)
        w.connected(1)
        return hub, w

    def _still_serving(self, hub: Node, w: Node, tag: bytes) -> None:
        w.t.send(1, [tag], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == tag
        hub.t.send(2, [tag], timeout=2)
        assert bytes(w.messages(1, 1)[0]) == tag

    @_timeout(30)
    def test_garbage_before_handshake_closes_that_connection(self, caplog: Any) -> None:
        caplog.set_level(logging.INFO, logger="derecho")
        hub, w = self._hub_and_witness()
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096),
                     b"DERECHO\x00\x01\x01\x00\xff\xff\xff\xff"):  # right magic, absurd record length
            s = socket.create_connection(hub.address)
            s.sendall(junk)
            assert closed_by_peer(s, 3), f"connection sending {junk[:16]!r} was not closed"
            s.close()
        self._still_serving(hub, w, b"after garbage")
        logs = self.transport_logs(caplog)
        assert any("handshake" in m for m in logs), logs

    @_timeout(30)
    def test_garbage_after_handshake_closes_that_connection(self, caplog: Any) -> None:
        if not self.frames_over_tcp:
            pytest.skip("messages of this provider do not travel as frames on the handshake connection")
        caplog.set_level(logging.INFO, logger="derecho")
        hub, w = self._hub_and_witness()
        cases = {
            "absurd length": self.frame(0xFFFFFFF0),
            "unknown kind": self.frame(4, 0xEE, b"abcd"),
            "random bytes": b"\xff" * 64,
        }
        for k, (what, junk) in enumerate(cases.items()):
            s, _ = raw_handshake(hub.address, 50 + k, 1)
            hub.connected(50 + k)
            s.sendall(junk)
            assert closed_by_peer(s, 3), f"{what}: connection not closed"
            s.close()
            ev = hub.failed(50 + k)
            assert not ev.clean
        # a truncated frame, then the connection ends
        s, _ = raw_handshake(hub.address, 60, 1)
        hub.connected(60)
        s.sendall(self.frame(1000, 0, b"only ten b"))
        s.close()
        assert not hub.failed(60).clean
        self._still_serving(hub, w, b"after garbage")
        logs = self.transport_logs(caplog)
        assert any("absurd" in m or "garbage" in m for m in logs), logs
        assert any("truncated" in m for m in logs), logs

    # -- restart, versions, keys -------------------------------------------------------------
    @_timeout(40)
    def test_reconnection_after_peer_restart(self) -> None:
        hub = self.node(1)
        port = free_port()
        p = self.peer(2, mode="echo", port=port)
        hub.t.connect(2, p.address)
        first = hub.connected(2)
        hub.t.send(2, [b"one"], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == b"one"
        p.kill()
        hub.failed(2)
        # restarted on the same port; this node dials again
        p2 = self.peer(2, mode="echo", port=port)
        hub.t.connect(2, p2.address)
        second = hub.connected(2)
        assert second.incarnation != first.incarnation
        hub.t.send(2, [b"two"], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == b"two"
        # restarted again; this time the peer dials us
        p2.kill()
        hub.failed(2)
        p3 = self.peer(2, mode="echo", connect=[(1, hub.address)])
        third = hub.connected(2)
        assert third.incarnation not in (first.incarnation, second.incarnation)
        p3.wait("connected", 5)
        hub.t.send(2, [b"three"], timeout=2)
        assert bytes(hub.messages(2, 1)[0]) == b"three"

    @_timeout(40)
    def test_version_mismatch_refused_clearly_on_both_ends(self, caplog: Any) -> None:
        caplog.set_level(logging.INFO, logger="derecho")
        hub = self.node(1)
        # we dial a node that speaks another version
        old = self.peer(2, mode="echo", wire_version=99)
        hub.t.connect(2, old.address)
        ev = hub.failed(2)
        assert "version" in ev.reason and "99" in ev.reason, ev.reason
        deadline = time.monotonic() + 5
        while "version mismatch" not in old.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "version mismatch" in old.stderr_text()
        # a node that speaks another version dials us
        old2 = self.peer(3, mode="echo", wire_version=99, connect=[(1, hub.address)])
        got = old2.wait("failed", 10)
        assert "version" in got["reason"], got
        deadline = time.monotonic() + 5
        while not any("version mismatch" in m for m in self.transport_logs(caplog)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("version mismatch" in m and "99" in m for m in self.transport_logs(caplog))
        assert hub.t.peers() == set()

    @_timeout(40)
    def test_cluster_key_hmac(self, tmp_path: Any) -> None:
        k1, k2 = tmp_path / "k1", tmp_path / "k2"
        k1.write_text("secret one\n")
        k2.write_text("secret two\n")

        def attempt(ka: str, kb: str) -> tuple[Node, Node]:
            a = self.node(1, self.conf(DERECHO__cluster_key_file=ka))
            b = self.node(2, self.conf(DERECHO__cluster_key_file=kb))
            a.t.connect(2, b.address)
            return a, b

        a, b = attempt(str(k1), str(k1))  # same key: works
        a.connected(2)
        b.connected(1)
        a.t.send(2, [b"keyed"], timeout=2)
        assert bytes(b.messages(1, 1)[0]) == b"keyed"
        for ka, kb, word in ((str(k1), str(k2), "challenge"), (str(k1), "", "key"), ("", str(k1), "key")):
            a, b = attempt(ka, kb)
            ev = a.failed(2)
            assert word in ev.reason, ev.reason
            time.sleep(0.2)
            assert not b.pending(PeerConnected) and b.t.peers() == set()
            assert a.t.peers() == set()
        # a raw client without the key cannot complete the handshake
        b = self.node(3, self.conf(DERECHO__cluster_key_file=str(k1)))
        with pytest.raises(Exception):
            raw_handshake(b.address, 9, 3, key=None)
        with pytest.raises(Exception):
            raw_handshake(b.address, 9, 3, key=b"guess")
        s, _ = raw_handshake(b.address, 9, 3, key=b"secret one")
        b.connected(9)
        s.close()


# ----------------------------------------------------------------------------- peer program


def _peer_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m derecho_core.testing.transport",
                                 description="a transport peer for the conformance suite and benchmarks")
    ap.add_argument("--provider", required=True)
    ap.add_argument("--node-id", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", choices=("echo", "sink", "send"), default="echo")
    ap.add_argument("--conf", default="{}")
    ap.add_argument("--connect", action="append", default=[])
    ap.add_argument("--wire-version", type=int)
    ap.add_argument("--send-to", type=int)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--max-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.wire_version is not None:
        from .. import handshake

        handshake.PROTOCOL_VERSION = args.wire_version

    def out(**kw: Any) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    def watch_stdin() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    conf = make_conf(json.loads(args.conf))
    t = open_transport(conf, args.node_id, (HOST, args.port), args.provider)
    port = t.listen()[1]
    out(ready=port)
    for item in args.connect:
        nid, host, p = item.split(":")
        t.connect(int(nid), (host, int(p)))
    received = 0

    def send_all(dest: int) -> None:
        import random

        rnd = random.Random(args.seed)
        for seq in range(args.count):
            t.send(dest, [payload(args.node_id, 0, seq, rnd.randint(16, max(16, args.max_size)))], timeout=30)
        out(sent=args.count)

    while True:
        for ev in t.poll(0.5):
            if isinstance(ev, MessageReceived):
                received += 1
                if args.mode == "echo":
                    try:
                        t.send(ev.node_id, [ev.data], timeout=30)
                    except Exception as exc:  # noqa: BLE001
                        out(error=str(exc))
                elif args.mode == "sink" and (received & (received - 1)) == 0:
                    out(received=received)
            elif isinstance(ev, PeerConnected):
                out(connected=ev.node_id, incarnation=ev.incarnation)
                if args.mode == "send" and ev.node_id == args.send_to:
                    threading.Thread(target=send_all, args=(ev.node_id,), daemon=True).start()
            elif isinstance(ev, PeerFailed):
                out(failed=ev.node_id, reason=ev.reason, clean=ev.clean)


if __name__ == "__main__":
    sys.exit(_peer_main())
