"""Behaviour specific to the sockets provider (the shared suite is in test_conformance.py)."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest

from derecho_core.testing.transport import HOST, free_port, make_conf, payload
from derecho_core.transport import MessageReceived, PeerConnected
from derecho_transport_sockets import SocketsTransport
from derecho_transport_sockets.transport import _W, POOL_MIN, _Conn

pytestmark = pytest.mark.timeout(30)


def pump(ts, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    got = {t.node_id: [] for t in ts}
    while time.monotonic() < deadline:
        for t in ts:
            got[t.node_id] += t.poll(0.005)
        if until(got):
            return got
    raise AssertionError(f"timed out; events: {got}")


class SelfDialing(SocketsTransport):
    """Its first dial binds the socket to the target port itself: a TCP simultaneous open to itself."""

    trapped = False

    def _start_dial(self, dial):
        if self.trapped:
            return super()._start_dial(dial)
        self.trapped = True
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(dial.address)
        s.setblocking(False)
        s.connect_ex(dial.address)
        conn = _Conn(s, True, dial.node_id, dial.address)
        conn.deadline = dial.deadline
        dial.conn = conn
        self._conns[conn.fd] = conn
        self._set_mask(conn, _W)


def test_tcp_simultaneous_open_to_itself_is_detected_and_retried(caplog):
    caplog.set_level(logging.INFO, logger="derecho")
    conf = make_conf({"DERECHO/sst_poll_cq_timeout_ms": 3000})
    port = free_port()
    a = SelfDialing(conf, 1, (HOST, 0))
    a.listen()
    a.connect(2, (HOST, port))
    deadline = time.monotonic() + 3
    while not any("itself" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        a.poll(0.01)
    assert any("itself" in r.getMessage() for r in caplog.records)
    b = SocketsTransport(conf, 2, (HOST, port))  # the real peer shows up on that port
    b.listen()
    try:
        got = pump([a, b], lambda g: any(isinstance(e, PeerConnected) for e in g[1])
                   and any(isinstance(e, PeerConnected) for e in g[2]))
        assert [e.node_id for e in got[1] if isinstance(e, PeerConnected)] == [2]
    finally:
        a.close()
        b.close()


def test_received_buffers_are_owned_by_the_receiver_and_recycled_only_when_dropped():
    conf = make_conf({})
    a, b = SocketsTransport(conf, 1, (HOST, 0)), SocketsTransport(conf, 2, (HOST, 0))
    a.listen()
    b.listen()
    try:
        a.connect(2, b.address)
        pump([a, b], lambda g: any(isinstance(e, PeerConnected) for e in g[2]))
        size = max(POOL_MIN, 1 << 20)

        def one(seq):
            a.send(2, [payload(1, 0, seq, size)], timeout=5)
            got = pump([a, b], lambda g: any(isinstance(e, MessageReceived) for e in g[2]))
            return [e for e in got[2] if isinstance(e, MessageReceived)][0].data

        kept = one(0)
        for seq in range(1, 6):  # received while message 0 is still referenced
            other = one(seq)
            assert bytes(other) == payload(1, 0, seq, size)
            del other
        assert bytes(kept) == payload(1, 0, 0, size), "a buffer still referenced was reused"
        assert len(b._pool) <= 3, "dropped buffers were not recycled"
    finally:
        a.close()
        b.close()


def test_many_small_messages_are_batched_and_ordered():
    conf = make_conf({"RDMA/tx_depth": 5000})
    a, b = SocketsTransport(conf, 1, (HOST, 0)), SocketsTransport(conf, 2, (HOST, 0))
    a.listen()
    b.listen()
    try:
        a.connect(2, b.address)
        pump([a, b], lambda g: any(isinstance(e, PeerConnected) for e in g[2]))
        for seq in range(3000):
            assert a.try_send(2, [payload(1, 0, seq, 16 + seq % 50)])
        assert a.queued(2) >= 2999  # the first may go at once, the rest are corked until the next poll
        got = pump([a, b], lambda g: sum(isinstance(e, MessageReceived) for e in g[2]) >= 3000)
        seqs = [int.from_bytes(bytes(e.data)[8:16], "little") for e in got[2] if isinstance(e, MessageReceived)]
        assert seqs == list(range(3000))
        assert a.queued(2) == 0
    finally:
        a.close()
        b.close()


def test_bad_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="neither an IP address nor a network interface"):
        SocketsTransport(make_conf({"RDMA/domain": "no-such-interface-xyz"}), 1, (HOST, 0))


def test_mixed_small_and_large_messages_in_bursts():
    import random

    conf = make_conf({"RDMA/tx_depth": 1000})
    a, b = SocketsTransport(conf, 1, (HOST, 0)), SocketsTransport(conf, 2, (HOST, 0))
    a.listen()
    b.listen()
    try:
        a.connect(2, b.address)
        pump([a, b], lambda g: any(isinstance(e, PeerConnected) for e in g[2]))
        rnd = random.Random(7)
        sizes = [rnd.choice([16, 100, 65535, 65536, 70000, 200000, 300000, 1 << 20]) for _ in range(300)]
        for seq, size in enumerate(sizes):
            a.send(2, [payload(1, 0, seq, size)], timeout=10)
        got = pump([a, b], lambda g: sum(isinstance(e, MessageReceived) for e in g[2]) >= len(sizes), 30)
        msgs = [bytes(e.data) for e in got[2] if isinstance(e, MessageReceived)]
        assert [len(m) for m in msgs] == sizes
        assert all(m == payload(1, 0, seq, len(m)) for seq, m in enumerate(msgs))
    finally:
        a.close()
        b.close()


def test_handshake_flood_is_capped(monkeypatch):
    import derecho_transport_sockets.transport as mod
    from derecho_core.testing.transport import closed_by_peer

    monkeypatch.setattr(mod, "MAX_HANDSHAKING", 2)
    conf = make_conf({"DERECHO/sst_poll_cq_timeout_ms": 5000})
    t = SocketsTransport(conf, 1, (HOST, 0))
    t.listen()
    socks = []
    try:
        for _ in range(2):
            socks.append(socket.create_connection(t.address))
            for _ in range(5):
                t.poll(0.01)
        extra = socket.create_connection(t.address)
        socks.append(extra)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and t._handshaking < 2:
            t.poll(0.01)
        for _ in range(10):
            t.poll(0.01)
        assert closed_by_peer(extra, 1.0), "the connection over the cap was not refused at once"
        assert not closed_by_peer(socks[0], 0.1)  # the first ones wait for their handshake deadline
    finally:
        for s in socks:
            s.close()
        t.close()


def test_peer_closing_in_the_middle_of_a_large_message_is_reported():
    """While a large message arrives SO_RCVLOWAT is raised; an EOF must still wake the node."""
    from derecho_core.testing.transport import raw_handshake
    from derecho_core.transport import PeerFailed

    conf = make_conf({})
    t = SocketsTransport(conf, 1, (HOST, 0))
    t.listen()
    try:
        import threading

        box = []
        th = threading.Thread(target=lambda: box.append(raw_handshake(t.address, 9, 1)[0]))
        th.start()
        pump([t], lambda g: any(isinstance(e, PeerConnected) for e in g[1]))
        th.join(5)
        s = box[0]
        s.sendall(struct.pack("<IB", 4 << 20, 0) + bytes(300_000))
        for _ in range(20):
            t.poll(0.01)
        assert t._peers[9].big is not None and t._peers[9].lowat > 1
        s.close()
        got = pump([t], lambda g: any(isinstance(e, PeerFailed) for e in g[1]), timeout=5)
        ev = [e for e in got[1] if isinstance(e, PeerFailed)][0]
        assert "truncated" in ev.reason
    finally:
        t.close()
