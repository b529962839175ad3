"""The transport contract on libfabric's tcp provider (the plugin's own tests).

The shared conformance suite (derecho_core.testing.transport) runs from
test_conformance.py; these cover what is specific to libfabric (eager vs
rendezvous paths, RMA, provider mismatch) and the contract points directly.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from derecho_transport_verbs._testhelpers import free_port, make_conf, poll_until, requires_tcp

pytestmark = [requires_tcp]


def _msgs(events, kind):
    return [e for e in events if isinstance(e, kind)]


@pytest.mark.timeout(20)
def test_sizes_order_and_boundaries(pair):
    from derecho_core.transport import MessageReceived

    a, b = pair
    sizes = [0, 1, 63, 64, 1000, 16383 - 24, 16384, 100_000, 1 << 20, 0, 5, 4 << 20, 7]
    payloads = [os.urandom(min(n, 4096)) * (n // 4096) + os.urandom(n % 4096) for n in sizes]
    for p in payloads:  # mixed eager and rendezvous messages, several buffers each
        while not b.try_send(1, [p[: len(p) // 3], memoryview(p)[len(p) // 3:]]):
            b.poll(0)
    got = poll_until([a, b], lambda g: len(_msgs(g[a], MessageReceived)) >= len(payloads), timeout=15)
    recv = _msgs(got[a], MessageReceived)
    assert [len(m.data) for m in recv] == sizes
    assert all(bytes(m.data) == p for m, p in zip(recv, payloads))
    assert all(m.node_id == 2 for m in recv)


@pytest.mark.timeout(30)
def test_64mb_message(pair):
    from derecho_core.transport import MessageReceived

    a, b = pair
    big = bytes(range(256)) * (64 * 4096)
    b.send(1, [big], timeout=10)
    got = poll_until([a, b], lambda g: _msgs(g[a], MessageReceived), timeout=20)
    (m,) = _msgs(got[a], MessageReceived)
    assert len(m.data) == len(big) and m.data == big


@pytest.mark.timeout(20)
def test_both_directions_and_concurrent_senders(pair):
    import threading

    from derecho_core.transport import MessageReceived

    a, b = pair
    n = 300

    def sender(t, dest, tag):
        for i in range(n):
            t.send(dest, [tag, i.to_bytes(4, "little")], timeout=10)

    # two threads send on b while the test thread polls both
    th = [threading.Thread(target=sender, args=(b, 1, bytes([k]))) for k in range(2)]
    for t in th:
        t.start()
    early = []
    for i in range(n):
        a.send(2, [b"A", i.to_bytes(4, "little")], timeout=10)
        early.extend(a.poll(0))
    got = poll_until([a, b], lambda g: len(_msgs(early + g[a], MessageReceived)) >= 2 * n
                     and len(_msgs(g[b], MessageReceived)) >= n, timeout=15)
    got[a] = early + got[a]
    for t in th:
        t.join()
    at_a = [bytes(m.data) for m in _msgs(got[a], MessageReceived)]
    for k in range(2):  # per sender thread: every message, in order
        seq = [int.from_bytes(x[1:], "little") for x in at_a if x[0] == k]
        assert seq == list(range(n))
    assert [int.from_bytes(bytes(m.data)[1:], "little") for m in _msgs(got[b], MessageReceived)] == list(range(n))


@pytest.mark.timeout(20)
def test_backpressure_and_bounded_memory(pair):
    """A peer that stops polling: try_send says False at tx_depth, send times out, RSS stays bounded."""
    from derecho_core.transport import SendQueueFull

    a, b = pair
    msg = [bytes(256 << 10)]  # 256 KiB: rendezvous, the data stays with the sender until the peer reads
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if b.try_send(1, msg):
            accepted += 1
        else:
            b.poll(0)
            if not b.try_send(1, msg):
                break
            accepted += 1
    assert accepted <= b.tx_depth, accepted
    assert b.queued(1) == b.tx_depth
    with pytest.raises(SendQueueFull):
        b.send(1, msg, timeout=0.2)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 64 * 1024, f"RSS grew by {grown_kib} KiB"
    # the reader comes back: everything drains
    from derecho_core.transport import MessageReceived
    poll_until([a, b], lambda g: len(_msgs(g[a], MessageReceived)) >= accepted, timeout=10)
    assert b.queued(1) == 0 or b.try_send(1, msg)


@pytest.mark.timeout(20)
def test_disconnect_is_clean_on_both_sides(pair):
    from derecho_core.transport import NotConnectedError, PeerFailed

    a, b = pair
    b.disconnect(1)
    got = poll_until([a, b], lambda g: _msgs(g[a], PeerFailed) and _msgs(g[b], PeerFailed))
    assert _msgs(got[a], PeerFailed)[0].clean and _msgs(got[b], PeerFailed)[0].clean
    assert a.peers() == set() and b.peers() == set()
    with pytest.raises(NotConnectedError):
        b.try_send(1, [b"x"])
    # and they can connect again
    from derecho_core.transport import MessageReceived, PeerConnected
    a.connect(2, b.address)
    poll_until([a, b], lambda g: _msgs(g[a], PeerConnected) and _msgs(g[b], PeerConnected))
    b.send(1, [b"again"], timeout=5)
    got = poll_until([a, b], lambda g: _msgs(g[a], MessageReceived))
    assert bytes(_msgs(got[a], MessageReceived)[0].data) == b"again"


@pytest.mark.timeout(20)
def test_close_reports_clean_failure_and_refuses_use(pair):
    from derecho_core.transport import PeerFailed, TransportClosedError

    a, b = pair
    b.close()
    got = poll_until([a], lambda g: _msgs(g[a], PeerFailed))
    assert _msgs(got[a], PeerFailed)[0].clean
    with pytest.raises(TransportClosedError):
        b.poll(0)
    b.wake()  # no-op after close
    b.close()


@pytest.mark.timeout(20)
def test_wake_returns_poll_early(pair):
    import threading

    a, _ = pair
    threading.Timer(0.2, a.wake).start()
    t0 = time.monotonic()
    assert a.poll(5) == []
    assert time.monotonic() - t0 < 2


@pytest.mark.timeout(20)
def test_rma_write_bounds_and_completion(pair):
    from derecho_core.transport import RMAWriteCompleted

    a, b = pair
    assert a.rma is not None and b.rma is not None
    region = bytearray(4096)
    mr = a.rma.register(region)
    remote = b.rma.remote_region(1, mr.descriptor)
    with pytest.raises(ValueError, match="outside"):
        b.rma.write(remote, 4090, b"0123456789")
    with pytest.raises(ValueError):
        b.rma.write(remote, -1, b"x")
    assert b.rma.write(remote, 100, b"hello rma", token="t1")
    got = poll_until([a, b], lambda g: _msgs(g[b], RMAWriteCompleted))
    assert _msgs(got[b], RMAWriteCompleted)[0].token == "t1"
    assert bytes(region[100:109]) == b"hello rma"  # delivery complete: visible at the target
    a.rma.deregister(mr)


@pytest.mark.timeout(20)
def test_garbage_on_the_port_is_refused_and_the_node_keeps_serving(pair, caplog):
    from derecho_core.transport import MessageReceived

    a, b = pair
    caplog.set_level(logging.INFO, logger="derecho.transport.verbs")
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"DERECHO\x00\x01\x01\x00\xff\xff\xff\x7f", b"DERECHO\x00\x01"):
        s = socket.create_connection(a.address)
        s.sendall(junk)
        if junk.endswith(b"\x01"):
            s.close()  # truncated frame
        else:
            s.settimeout(5)
            deadline = time.monotonic() + 5
            closed = False
            while time.monotonic() < deadline and not closed:
                a.poll(0.001)
                try:
                    closed = s.recv(4096) == b"" or True
                except socket.timeout:
                    pass
                except OSError:
                    closed = True
            s.close()
        a.poll(0.01)
    b.send(1, [b"still here"], timeout=5)
    got = poll_until([a, b], lambda g: _msgs(g[a], MessageReceived))
    assert bytes(_msgs(got[a], MessageReceived)[0].data) == b"still here"
    assert any("handshake" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(20)
def test_cluster_key_mismatch_and_version_mismatch(tmp_path):
    from derecho_core import handshake as hs
    from derecho_core.transport import PeerConnected, PeerFailed
    from derecho_transport_verbs.transport import VerbsTransport

    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    k1.write_text("secret-one")
    k2.write_text("secret-two")
    a = VerbsTransport(make_conf(**{"DERECHO/cluster_key_file": str(k1)}), 1, ("127.0.0.1", 0))
    b = VerbsTransport(make_conf(**{"DERECHO/cluster_key_file": str(k2)}), 2, ("127.0.0.1", 0))
    c = VerbsTransport(make_conf(**{"DERECHO/cluster_key_file": str(k1)}), 3, ("127.0.0.1", 0))
    try:
        a.listen()
        b.connect(1, a.address)
        got = poll_until([a, b], lambda g: _msgs(g[b], PeerFailed))
        assert "cluster-key" in _msgs(got[b], PeerFailed)[0].reason
        assert not _msgs(got[a], PeerConnected)
        c.connect(1, a.address)  # the right key works
        poll_until([a, c], lambda g: _msgs(g[c], PeerConnected) and _msgs(g[a], PeerConnected))
        # a peer speaking another protocol version is refused with a clear message
        s = socket.create_connection(a.address)
        h = hs.Hello(9, 1, b"n" * 32, True, None, b"", hs.PROTOCOL_VERSION + 1)
        s.sendall(hs.encode_hello(h))
        s.settimeout(5)
        reply = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(reply) < hs.RECORD_HEADER.size:
            a.poll(0.001)
            try:
                reply += s.recv(4096)
            except socket.timeout:
                pass
        rec, _ = hs.decode_record(reply + b"\0" * 0) or (None, 0)
        assert rec is not None and rec.kind == hs.KIND_REFUSE
        assert "version" in hs.parse_refuse(rec)[2]
        s.close()
    finally:
        for t in (a, b, c):
            t.close()


@pytest.mark.timeout(20)
def test_simultaneous_connect_keeps_one_connection():
    from derecho_core.transport import MessageReceived, PeerConnected
    from derecho_transport_verbs.transport import VerbsTransport

    a = VerbsTransport(make_conf(), 1, ("127.0.0.1", 0))
    b = VerbsTransport(make_conf(), 2, ("127.0.0.1", 0))
    try:
        a.listen()
        b.listen()
        a.connect(2, b.address)
        b.connect(1, a.address)
        got = poll_until([a, b], lambda g: _msgs(g[a], PeerConnected) and _msgs(g[b], PeerConnected))
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            for t in (a, b):
                for e in t.poll(0.001):
                    got[t].append(e)
        assert len(_msgs(got[a], PeerConnected)) == 1 and len(_msgs(got[b], PeerConnected)) == 1
        a.send(2, [b"x"], timeout=5)
        b.send(1, [b"y"], timeout=5)
        got = poll_until([a, b], lambda g: _msgs(g[a], MessageReceived) and _msgs(g[b], MessageReceived))
    finally:
        b.close()
        a.close()


@pytest.mark.timeout(15)
def test_provider_mismatch_is_refused():
    from derecho_core.transport import PeerFailed
    from derecho_transport_verbs import fabric
    from derecho_transport_verbs.transport import VerbsTransport

    if "udp" not in fabric.provider_names():
        pytest.skip("libfabric's udp provider is not available")
    a = VerbsTransport(make_conf(), 1, ("127.0.0.1", 0))
    b = VerbsTransport(make_conf(**{"RDMA/provider": "udp"}), 2, ("127.0.0.1", 0), provider="udp")
    try:
        a.listen()
        b.connect(1, a.address)
        got = poll_until([a, b], lambda g: _msgs(g[b], PeerFailed))
        assert "provider" in _msgs(got[b], PeerFailed)[0].reason
    finally:
        b.close()
        a.close()


NODE = textwrap.dedent("""
    import sys, time
    from derecho_core.conf import Conf
    from derecho_core.transport import MessageReceived
    from derecho_transport_verbs.transport import VerbsTransport
    conf = Conf.load(overrides={"RDMA/domain": "lo", "DERECHO/p2p_loop_busy_wait_before_sleep_ms": 1})
    t = VerbsTransport(conf, int(sys.argv[1]), ("127.0.0.1", int(sys.argv[2])))
    t.listen()
    print("ready", flush=True)
    while True:
        for ev in t.poll(0.05):
            if isinstance(ev, MessageReceived):
                t.send(ev.node_id, [b"echo:", ev.data], timeout=5)
""")


@pytest.mark.timeout(30)
def test_sigkill_is_reported_and_restarted_peer_reconnects(tmp_path):
    from derecho_core.transport import MessageReceived, PeerConnected, PeerFailed
    from derecho_transport_verbs.transport import VerbsTransport

    script = tmp_path / "node.py"
    script.write_text(NODE)
    port = free_port()

    def start():
        p = subprocess.Popen([sys.executable, str(script), "5", str(port)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

    me = VerbsTransport(make_conf(), 1, ("127.0.0.1", 0))
    proc = start()
    try:
        me.connect(5, ("127.0.0.1", port))
        got = poll_until([me], lambda g: _msgs(g[me], PeerConnected))
        inc1 = _msgs(got[me], PeerConnected)[0].incarnation
        me.send(5, [b"ping"], timeout=5)
        got = poll_until([me], lambda g: _msgs(g[me], MessageReceived))
        assert bytes(_msgs(got[me], MessageReceived)[0].data) == b"echo:ping"
        proc.kill()
        t0 = time.monotonic()
        got = poll_until([me], lambda g: _msgs(g[me], PeerFailed), timeout=5)
        assert time.monotonic() - t0 < 3
        assert not _msgs(got[me], PeerFailed)[0].clean
        proc.wait(5)
        proc = start()  # restart on the same port: reconnect
        me.connect(5, ("127.0.0.1", port))
        got = poll_until([me], lambda g: _msgs(g[me], PeerConnected))
        assert _msgs(got[me], PeerConnected)[0].incarnation != inc1
        me.send(5, [b"again"], timeout=5)
        got = poll_until([me], lambda g: _msgs(g[me], MessageReceived))
        assert bytes(_msgs(got[me], MessageReceived)[0].data) == b"echo:again"
    finally:
        me.close()
        proc.kill()
        proc.wait(5)


@pytest.mark.timeout(10)
def test_registered_names():
    from derecho_core.plugins import PluginSystem
    from derecho_transport_verbs import plugin

    ps = PluginSystem(load_entry_points=False)
    ps.register_plugin(plugin, "verbs")
    names = ps.names("transport")
    assert {"tcp", "verbs"} <= set(names)
    assert "sockets" not in names  # libfabric's sockets provider is ofi_sockets: the name is the sockets plugin's


@pytest.mark.timeout(15)
def test_peer_without_libfabric_endpoint_is_refused_clearly():
    """Dialing a node that answers the handshake without a libfabric endpoint (another provider) fails clearly."""
    import threading

    from derecho_core import handshake as hs
    from derecho_core.transport import PeerFailed
    from derecho_transport_verbs.transport import VerbsTransport

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def acceptor():
        s, _ = ls.accept()
        h = hs.Handshake("acceptor", 7, hs.new_incarnation(), version=hs.PROTOCOL_VERSION)
        s.settimeout(5)
        try:
            while not h.done:
                data = s.recv(4096)
                if not data:
                    break
                out = h.receive(data)
                if out:
                    s.sendall(out)
            s.recv(4096)
        except OSError:
            pass
        s.close()

    th = threading.Thread(target=acceptor, daemon=True)
    th.start()
    me = VerbsTransport(make_conf(), 1, ("127.0.0.1", 0))
    try:
        me.connect(7, ls.getsockname())
        got = poll_until([me], lambda g: _msgs(g[me], PeerFailed))
        assert "not a libfabric transport" in _msgs(got[me], PeerFailed)[0].reason
        assert me.peers() == set()
    finally:
        me.close()
        ls.close()
        th.join(5)


@pytest.mark.timeout(20)
def test_shm_provider_messages_and_rma():
    """Another provider passed through: shm (FI_MR_VIRT_ADDR, send-after-send order only)."""
    from derecho_core.transport import MessageReceived, PeerConnected, RMAWriteCompleted
    from derecho_transport_verbs import fabric
    from derecho_transport_verbs.transport import VerbsTransport

    if "shm" not in fabric.provider_names():
        pytest.skip("libfabric's shm provider is not available")
    conf = make_conf(**{"RDMA/provider": "shm", "RDMA/domain": ""})
    a = VerbsTransport(conf, 1, ("127.0.0.1", 0), provider="shm")
    b = VerbsTransport(conf, 2, ("127.0.0.1", 0), provider="shm")
    try:
        a.listen()
        b.connect(1, a.address)
        poll_until([a, b], lambda g: _msgs(g[a], PeerConnected) and _msgs(g[b], PeerConnected))
        payloads = [b"", b"small", os.urandom(100_000), os.urandom(3 << 20), b"tail"]
        for p in payloads:
            b.send(1, [p[:7], p[7:]], timeout=10)
        got = poll_until([a, b], lambda g: len(_msgs(g[a], MessageReceived)) >= len(payloads))
        assert [bytes(m.data) for m in _msgs(got[a], MessageReceived)] == payloads
        region = bytearray(1024)
        mr = a.rma.register(region)
        remote = b.rma.remote_region(1, mr.descriptor)
        with pytest.raises(ValueError):
            b.rma.write(remote, 1000, bytes(100))  # shm itself would corrupt memory: checked here
        assert b.rma.write(remote, 10, b"shm-rma", token=1)
        poll_until([a, b], lambda g: _msgs(g[b], RMAWriteCompleted))
        assert bytes(region[10:17]) == b"shm-rma"
    finally:
        b.close()
        a.close()


@pytest.mark.timeout(30)
def test_receiver_grants_large_messages_within_its_window(pair):
    """A sender announcing many large messages cannot make the receiver allocate them all at once."""
    from derecho_core.transport import MessageReceived
    from derecho_transport_verbs import transport as vt

    a, b = pair
    if not b._large_write:
        pytest.skip("RMA-write protocol not in use")
    big = bytes(16 << 20)
    peak = 0
    got = []
    sent = 0
    deadline = time.monotonic() + 20
    while len(got) < 8 and time.monotonic() < deadline:
        if sent < 8 and b.try_send(1, [big]):  # 128 MiB in all; up to max_queued_bytes announced at once
            sent += 1
        got += _msgs(a.poll(0.001), MessageReceived)
        b.poll(0)
        conn = a._peers.get(2)
        if conn is not None:
            peak = max(peak, conn.granted)
    assert len(got) == 8 and all(len(m.data) == len(big) for m in got)
    assert 0 < peak <= vt.RX_WINDOW
