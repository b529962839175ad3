"""Authentication (issue "Reliability and security", part 4): every unauthenticated action is refused and logged.

A group of three member processes on 127.0.0.1 (``vault_member.py``: one ``Vault`` shard of every member)
runs with a cluster key (``DERECHO/cluster_key_file``) and a separate client key
(``DERECHO/client_key_file``). Without the right key, or with a wrong one:

(a) a join is refused, and the contact logs it;
(b) a transport connection to a member's ``sst_port`` is refused at its handshake: SST rows, multicast
    data and RPC frames sent behind the failed handshake are never read;
(c) an RPC (a p2p request frame) over such a connection is never executed, while the same frame behind
    a handshake with the key is (the positive control that proves the frames are right);
(d) an external client is refused, including one that holds the cluster key when a client key is set;
    a client with the client key works;
(e) a state-transfer connection is refused.

Each refusal must show up as one WARNING (or ERROR) line on the member's stderr naming the peer's
address and what was refused. Also: ``DERECHO/serializer = pickle`` logs a WARNING at start.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from derecho_core import Conf, handshake as hs
from derecho_core.external_client import ExternalClientRefusedError, ExternalGroupClient
from derecho_core.rpc import wire as rpc_wire
from derecho_core.rpc.methods import p2p, rpc_name
from derecho_core.testing.processes import LocalGroup, Member, free_ports

HERE = Path(__file__).resolve().parent
PROGRAM = [str(HERE / "vault_member.py")]
N = 3
CLIENT_ID = 50
FRAME = struct.Struct("<IB")  # the sockets transport's frame header: payload length, kind (0 = data)
PICKLE_WARNING = ("DERECHO/serializer = pickle: RPC arguments, replies and object state are unpickled, which runs "
                  "code chosen by any peer holding the cluster key; use it only when every peer is trusted")


class Vault:
    """The client's copy of the replicated type (only the method names matter)."""

    @p2p
    def get(self, key: str) -> Any:
        raise NotImplementedError

    @p2p
    def touch(self, marker: str) -> bool:
        raise NotImplementedError


class KeyedGroup:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cluster_key = workdir / "cluster.key"
        self.cluster_key.write_text("the members' secret\n")
        self.client_key = workdir / "client.key"
        self.client_key.write_text("the clients' secret\n")
        self.wrong_key = workdir / "wrong.key"
        self.wrong_key.write_text("somebody else's secret\n")
        self.lg = LocalGroup(workdir, settings={"DERECHO/cluster_key_file": str(self.cluster_key),
                                                "DERECHO/client_key_file": str(self.client_key)},
                             program=[*PROGRAM, "--members", str(N)])
        self.outsiders: list[Member] = []

    def start(self) -> None:
        for i in range(N):
            self.lg.start(i)
            time.sleep(0.2)
        for i in range(N):
            self.lg.members[i].event("ready", timeout=60)

    def member(self, node_id: int) -> Member:
        return self.lg.members[node_id]

    def port(self, node_id: int, name: str) -> int:
        return self.lg.ports_of(node_id)[name]

    def outsider(self, node_id: int, *settings: str) -> Member:
        """A process that tries to join with the group's configuration file, ``settings`` on top (own ports)."""
        ports = dict(zip(LocalGroup.PORT_KEYS, free_ports(5)))
        m = Member(node_id, ports, self.lg.conf_file, ["--members", "1", *settings], program=PROGRAM)
        self.outsiders.append(m)
        return m

    def client_conf(self, **settings: Any) -> Conf:
        overrides: dict[str, Any] = {"DERECHO/local_id": CLIENT_ID, "DERECHO/contact_ip": "127.0.0.1",
                                     "DERECHO/external_port": self.port(0, "external_port")}
        overrides.update(settings)
        return Conf.load(overrides=overrides, environ={})

    def close(self) -> None:
        for m in self.outsiders:
            m.kill()
        self.lg.close()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGroup]:
    g = KeyedGroup(tmp_path_factory.mktemp("auth"))
    try:
        g.start()
        yield g
    finally:
        g.close()


def wait_log(member: Member, pattern: str, timeout: float = 10.0, after: int = 0) -> str:
    """The first stderr line of ``member`` (from line ``after`` on) matching ``pattern``, at WARNING or ERROR."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in list(member.stderr)[after:]:
            if rx.search(line):
                assert re.search(r" (WARNING|ERROR) ", line), f"not logged as a warning: {line!r}"
                return line
        if time.monotonic() > deadline:
            tail = "".join(member.stderr[-15:])
            raise AssertionError(f"node {member.node_id} logged no line matching {pattern!r}; stderr tail:\n{tail}")
        time.sleep(0.05)


def touched(member: Member) -> list[str]:
    return [e["marker"] for e in list(member.events) if e.get("event") == "touched"]


def assert_views_unchanged(group: KeyedGroup) -> None:
    for i in range(N):
        views = group.member(i).views()
        assert sorted(views[-1]["members"]) == list(range(N)), f"node {i}'s views changed: {views[-3:]}"
        assert all(set(v["members"]) <= set(range(N)) for v in views), f"an outsider got into a view: {views}"


# ----------------------------------------------------------------------------- raw transport connections


def data_frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), 0) + payload


def forged_frames(marker: str) -> bytes:
    """An SST row, a multicast DATA message and a p2p RPC request to ``Vault.touch(marker)``."""
    sst = b"M" + msgpack.packb(["sst", 2, {"heartbeat": 1}], use_bin_type=True)
    mc = b"C" + msgpack.packb([2, 0, "d", 0, [[time.time_ns(), True, b"forged"]]], use_bin_type=True)
    args = rpc_wire.Serializer("msgpack").dumps([[marker]])
    rpc = rpc_wire.encode_request(0, rpc_name("touch"), 7, args)
    return data_frame(sst) + data_frame(mc) + data_frame(rpc)


def receive(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """What the member sent until it closed the connection (or ``timeout``), and whether it closed."""
    sock.settimeout(0.2)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return buf, True
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


def records_of(buf: bytes) -> list[hs.Record]:
    records = []
    while buf:
        got = hs.decode_record(buf)
        if got is None:
            break
        rec, used = got
        records.append(rec)
        buf = buf[used:]
    return records


def read_records(sock: socket.socket, timeout: float = 5.0) -> tuple[list[hs.Record], bool]:
    """Handshake records the member sent until it closed the connection (or ``timeout``); and whether it closed."""
    buf, closed = receive(sock, timeout)
    return records_of(buf), closed


def connect(group: KeyedGroup, node_id: int, port_name: str) -> tuple[socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", group.port(node_id, port_name)), timeout=5)
    return s, f"127.0.0.1:{s.getsockname()[1]}"


OUTSIDER = 42  # a node id no member uses


@pytest.mark.timeout(120)
def test_transport_handshake_without_the_key_is_refused(group: KeyedGroup) -> None:
    """(b) A HELLO without a key gets a REFUSE (authentication), and the member logs who and why."""
    sock, me = connect(group, 1, "sst_port")
    with sock:
        h = hs.Handshake("initiator", OUTSIDER, hs.new_incarnation(), key=None)
        sock.sendall(h.start() + forged_frames("no-key"))
        records, closed = read_records(sock)
    assert closed and [r.kind_name for r in records] == ["REFUSE"]
    code, _, reason = hs.parse_refuse(records[0])
    assert code == hs.REFUSE_AUTH and "no cluster key" in reason
    wait_log(group.member(1), rf"node 1: handshake with (node {OUTSIDER}|unknown peer) \({re.escape(me)}\) failed, "
                              rf"connection closed: node {OUTSIDER} has no cluster key; this node requires one")


@pytest.mark.timeout(120)
def test_transport_handshake_with_a_wrong_key_is_refused(group: KeyedGroup) -> None:
    """(b)+(c) A wrong key fails the challenge; SST, multicast and RPC frames behind the CONFIRM are never read."""
    sock, me = connect(group, 1, "sst_port")
    with sock:
        h = hs.Handshake("initiator", OUTSIDER, hs.new_incarnation(), key=group.wrong_key.read_bytes().strip())
        sock.sendall(h.start())
        raw, _ = receive(sock, timeout=1.0)
        assert [r.kind_name for r in records_of(raw)] == ["WELCOME"]  # the member proves its key first
        with pytest.raises(hs.AuthenticationError, match="failed the cluster-key challenge"):
            h.receive(raw)  # and this end sees that it is not the key it holds
        # answer anyway, with a CONFIRM made with the wrong key, and the frames right behind it
        sock.sendall(hs.encode_confirm(bytes(hs.MAC_LEN)) + forged_frames("wrong-key"))
        records, closed = read_records(sock)
    assert closed and [r.kind_name for r in records] == ["REFUSE"]
    wait_log(group.member(1), rf"node 1: handshake with (node {OUTSIDER}|unknown peer) \({re.escape(me)}\) failed, "
                              rf"connection closed: node {OUTSIDER} failed the cluster-key challenge \(different key\)")


@pytest.mark.timeout(120)
def test_transport_frames_instead_of_the_challenge_are_refused(group: KeyedGroup) -> None:
    """(b)+(c) A peer that claims a key and then skips the CONFIRM: its frames are garbage to the handshake."""
    sock, me = connect(group, 2, "sst_port")
    with sock:
        hello = hs.encode_hello(hs.Hello(OUTSIDER, hs.new_incarnation(), bytes(32), has_key=True))
        sock.sendall(hello)
        records, _ = read_records(sock, timeout=1.0)
        assert [r.kind_name for r in records] == ["WELCOME"]
        sock.sendall(forged_frames("no-confirm"))
        records, closed = read_records(sock)
    assert closed
    wait_log(group.member(2), rf"node 2: handshake with (node {OUTSIDER}|unknown peer) \({re.escape(me)}\) failed, "
                              r"connection closed: not a derecho handshake \(bad magic")


@pytest.mark.timeout(120)
def test_rpc_over_an_unauthenticated_connection_is_never_executed(group: KeyedGroup) -> None:
    """(c) The same RPC frame runs behind a keyed handshake (control) and never behind the failed ones."""
    sock, _ = connect(group, 0, "sst_port")
    with sock:
        h = hs.Handshake("initiator", OUTSIDER, hs.new_incarnation(), key=group.cluster_key.read_bytes().strip(),
                         expected_peer=0)
        out = h.start()
        sock.settimeout(5)
        while not h.done:
            sock.sendall(out)
            data = sock.recv(65536)
            assert data, "the member closed a connection that had the key"
            out = h.receive(data)
        sock.sendall(out + forged_frames("control"))
        group.member(0).wait_for(lambda evs: any(e.get("marker") == "control" for e in evs), timeout=10)
    # the refused attempts of the tests above (and one more here, on every member) never ran
    for node in range(N):
        s, _ = connect(group, node, "sst_port")
        with s:
            s.sendall(hs.Handshake("initiator", OUTSIDER, hs.new_incarnation(), key=None).start()
                      + forged_frames("no-key"))
            read_records(s)
    time.sleep(1.0)
    for node in range(N):
        assert [m for m in touched(group.member(node)) if m != "control"] == [], touched(group.member(node))
    assert touched(group.member(0)) == ["control"]
    assert_views_unchanged(group)


# ----------------------------------------------------------------------------- joins


@pytest.mark.timeout(120)
def test_join_without_the_key_is_refused_and_logged(group: KeyedGroup) -> None:
    """(a) Joiners with no key, or a wrong one: the contact refuses each join with a WARNING; no view has them."""
    keyless = group.outsider(7, "--DERECHO/cluster_key_file=")
    wrong = group.outsider(8, f"--DERECHO/cluster_key_file={group.wrong_key}")
    try:
        wait_log(group.member(0), r"GMS port: refused a join from 127\.0\.0\.1:\d+ \(claims node id 7\): bad or "
                                  r"missing cluster key \(the message carries no MAC", timeout=20)
        wait_log(group.member(0), r"GMS port: refused a join from 127\.0\.0\.1:\d+ \(claims node id 8\): bad or "
                                  r"missing cluster key \(its MAC does not match", timeout=20)
        time.sleep(0.5)
        assert_views_unchanged(group)
        assert keyless.views() == [] and wrong.views() == []
    finally:
        keyless.kill()
        wrong.kill()


# ----------------------------------------------------------------------------- external clients


@pytest.mark.timeout(120)
def test_external_client_needs_the_client_key(group: KeyedGroup) -> None:
    """(d) No key, a wrong key, or the cluster key: refused and logged. The client key: served."""
    cases = [
        ("no key", {}, r"node 0 requires the client key, but client 50's frames carry no MAC"),
        ("the cluster key", {"DERECHO/cluster_key_file": str(group.cluster_key)},
         r"client 50's HELLO failed the client-key check of node 0"),
        ("a wrong client key", {"DERECHO/client_key_file": str(group.wrong_key)},
         r"client 50's HELLO failed the client-key check of node 0"),
    ]
    for what, settings, pattern in cases:
        before = len(group.member(0).stderr)
        with pytest.raises(ExternalClientRefusedError, match="client_key_file") as info:
            ExternalGroupClient([Vault], group.client_conf(**settings), timeout=5)
        assert info.value.code == "AUTH", what
        wait_log(group.member(0), r"external port of node 0: refused a connection from 127\.0\.0\.1:\d+: "
                                  r"bad or missing client key: " + pattern, after=before)
    assert touched(group.member(0)) in ([], ["control"])
    with ExternalGroupClient([Vault], group.client_conf(**{"DERECHO/client_key_file": str(group.client_key)}),
                             timeout=5) as client:
        caller = client.get_subgroup_caller(Vault)
        assert caller.p2p_send(1, "touch", "client").get(10)[1].result(10) is True
    # the member prints its event after replying: wait for the line rather than race it
    event = group.member(1).wait_for(
        lambda evs: next((e for e in evs if e.get("event") == "touched" and e.get("marker") == "client"), None), 10)
    assert event["caller"] == CLIENT_ID


# ----------------------------------------------------------------------------- state transfer


@pytest.mark.timeout(120)
def test_state_transfer_connection_without_the_key_is_refused(group: KeyedGroup) -> None:
    """(e) A state-transfer HELLO without a MAC, or with a wrong one: refused, logged, nothing held."""
    from derecho_core import state_transfer as st

    for key, why in ((None, "the peer sent a frame without a MAC: it has no cluster key but this node has one"),
                     (group.wrong_key.read_bytes().strip(), "a HELLO frame failed the cluster-key check")):
        sock, me = connect(group, 1, "state_transfer_port")
        with sock:
            chan = st._Channel(sock, key, st._LEADER)
            chan.send_map(st.K_HELLO, {"v": st.PROTOCOL_VERSION, "vid": 2, "sg": 0, "node": OUTSIDER,
                                       "nonce": bytes(st.NONCE_LEN)})
            with pytest.raises(st._Refused, match="refused"):
                chan.recv(st.K_READY)
        wait_log(group.member(1), rf"state-transfer port: connection from {re.escape(me)} refused: {re.escape(why)}")
    assert_views_unchanged(group)


# ----------------------------------------------------------------------------- pickle


@pytest.mark.timeout(120)
def test_pickle_serializer_logs_a_warning_at_start(group: KeyedGroup, tmp_path: Path) -> None:
    lg = LocalGroup(tmp_path, settings={"DERECHO/serializer": "pickle"}, program=[*PROGRAM, "--members", "1"])
    try:
        m = lg.start(0)
        m.event("ready", timeout=60)
        line = wait_log(m, re.escape(PICKLE_WARNING))
        assert " WARNING " in line
    finally:
        lg.close()
    # the keyed group uses msgpack: no such warning
    assert not any("serializer = pickle" in line for line in group.member(0).stderr)


# ----------------------------------------------------------------------------- impersonation


@pytest.mark.timeout(120)
def test_unauthenticated_hello_claiming_a_members_id_does_not_disturb_the_group(tmp_path: Path) -> None:
    g = KeyedGroup(tmp_path)
    try:
        g.start()
        sock, me = connect(g, 0, "sst_port")
        with sock:
            h = hs.Handshake("initiator", 1, hs.new_incarnation(), key=g.wrong_key.read_bytes().strip())
            sock.sendall(h.start())
            read_records(sock, timeout=1.0)
            sock.sendall(hs.encode_confirm(bytes(hs.MAC_LEN)))
            read_records(sock)
        wait_log(g.member(0), rf"handshake with node 1 \({re.escape(me)}\) failed", timeout=10)
        time.sleep(3.0)  # well past suspicion_timeout_ms (600 ms here)
        assert not any("peer 1 failed" in line for line in g.member(0).stderr), "".join(g.member(0).stderr[-10:])
        assert_views_unchanged(g)
    finally:
        g.close()
