"""The thin libfabric wrapper: providers, errors with fi_strerror text, close order, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from derecho_transport_verbs import fabric

from derecho_transport_verbs._testhelpers import free_port, make_conf, requires_libfabric, requires_tcp

pytestmark = [requires_libfabric]


@pytest.mark.timeout(10)
def test_providers_listed():
    names = fabric.provider_names()
    assert "tcp" in names
    infos = [p for p in fabric.list_providers(node="127.0.0.1") if p.name == "tcp"]
    assert infos and all(p.domain for p in infos)


@pytest.mark.timeout(10)
def test_unknown_provider_is_a_clear_error():
    with pytest.raises(fabric.FabricError) as ei:
        fabric.Endpoint("no_such_provider", None)
    assert ei.value.errno == fabric._lib.FI_ENODATA
    assert "No data available" in str(ei.value) and "fi_info -l" in str(ei.value)


@pytest.mark.timeout(10)
def test_verbs_needs_rdma_hardware():
    if "verbs" in fabric.provider_names():
        pytest.skip("this machine has an RDMA NIC")
    from derecho_core.errors import DerechoError
    from derecho_transport_verbs.transport import VerbsTransport

    with pytest.raises(DerechoError, match="verbs provider needs an RDMA NIC"):
        VerbsTransport(make_conf(**{"RDMA/provider": "verbs", "RDMA/domain": ""}), 1, ("127.0.0.1", 0),
                       provider="verbs")


@requires_tcp
@pytest.mark.timeout(10)
def test_endpoint_mr_and_close_order():
    ep = fabric.Endpoint("tcp", "lo")
    assert ep.info.name == "tcp" and ep.info.domain == "lo"
    assert ep.name and len(ep.name) >= 16
    buf = bytearray(4096)
    mr1 = ep.register(buf)
    mr2 = ep.register(bytearray(10))
    assert mr1.key != mr2.key and mr1.length == 4096
    mr2.close()
    ep.close()  # closes mr1 first, then ep, cq, av, domain, fabric
    assert mr1.closed
    ep.close()  # idempotent


PEER = textwrap.dedent("""
    import socket, struct, sys, time
    from derecho_transport_verbs import fabric as fab
    port = int(sys.argv[1])
    ep = fab.Endpoint("tcp", "lo")
    ffi = fab._ffi
    buf = bytearray(1 << 16)
    mr = ep.register(buf)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(struct.pack("<HQQQ", len(ep.name), mr.key, mr.remote_base, len(buf)) + ep.name)
    n = struct.unpack("<H", s.recv(2))[0]
    peer = ep.insert(s.recv(n))
    rb = bytearray(256); crb = ffi.from_buffer(rb)
    ep.post_recv(crb, 256, None, 1)
    out = []
    deadline = time.time() + 8
    while time.time() < deadline:
        out.clear(); ep.poll_cq(out)
        if any(c.context == 1 for c in out):
            break
    # echo the message back, then wait until told the RMA write landed
    sb = bytearray(rb[:5]); csb = ffi.from_buffer(sb)
    while not ep.post_send(csb, 5, None, peer, 2):
        ep.poll_cq(out)
    s.settimeout(0.001)
    while time.time() < deadline:  # keep polling: tcp moves RMA data only inside fi_cq_read
        ep.poll_cq(out)
        try:
            if s.recv(1):
                break
        except socket.timeout:
            pass
    s.sendall(bytes(buf[100:110]))
    time.sleep(0.2)
    ep.close()
""")


@requires_tcp
@pytest.mark.timeout(20)
def test_two_processes_send_recv_and_rma(tmp_path):
    import socket
    import struct

    script = tmp_path / "peer.py"
    script.write_text(PEER)
    port = free_port()
    ls = socket.socket()
    ls.bind(("127.0.0.1", port))
    ls.listen(1)
    proc = subprocess.Popen([sys.executable, str(script), str(port)], env=dict(os.environ))
    try:
        ls.settimeout(10)
        s, _ = ls.accept()
        s.settimeout(10)
        hdr = s.recv(struct.calcsize("<HQQQ"))
        n, key, base, length = struct.unpack("<HQQQ", hdr)
        name = s.recv(n)
        ep = fabric.Endpoint("tcp", "lo")
        try:
            s.sendall(struct.pack("<H", len(ep.name)) + ep.name)
            peer = ep.insert(name)
            ffi = fabric._ffi
            rb = bytearray(64)
            ep.post_recv(ffi.from_buffer(rb), 64, None, 7)
            msg = bytearray(b"hello")
            cmsg = ffi.from_buffer(msg)
            out = []
            import time
            deadline = time.time() + 8
            while not ep.post_send(cmsg, 5, None, peer, 3):  # -FI_EAGAIN until the connection is up
                ep.poll_cq(out)
                assert time.time() < deadline
            while not any(c.context == 7 for c in out):
                ep.poll_cq(out)
                assert time.time() < deadline
            assert bytes(rb[:5]) == b"hello"
            data = bytearray(b"0123456789")
            cdata = ffi.from_buffer(data)
            assert 100 + len(data) <= length  # the bounds check the transport makes before every post
            while not ep.post_write(cdata, 10, None, peer, base + 100, key, 9, delivery_complete=True):
                ep.poll_cq(out)
            while not any(c.context == 9 for c in out):
                ep.poll_cq(out)
                assert time.time() < deadline
            assert not [c for c in out if c.error]
            s.sendall(b"x")
            assert s.recv(10) == b"0123456789"
        finally:
            ep.close()
    finally:
        proc.wait(timeout=10)
        ls.close()
    assert proc.returncode == 0
