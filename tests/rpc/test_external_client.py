"""External clients (spec §6.8) against a real group of three member processes.

The members run the program in ``MEMBER`` (written to a temporary file): one
subgroup of ``Store`` with one shard of 2..3 members, so the group survives
losing one. Node 0 puts ``k = v`` by ordered_send before the members report
ready. The group uses a cluster key, so every external frame is authenticated.
Issue acceptance: an external client calls each shard member by p2p_send;
after the member it used is killed, the client refreshes the view and its
retry succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from derecho_core import Conf, NodeRemovedFromGroupError, ordered, p2p, rpc_name
from derecho_core.testing.processes import free_ports

pytest.importorskip("derecho_allocators")

from derecho_core.external_client import ExternalClientRefusedError, ExternalGroupClient  # noqa: E402
from derecho_core.rpc.manager import PayloadTooLargeError  # noqa: E402
from derecho_core.rpc.methods import UnknownMethodError  # noqa: E402

MEMBER = r'''
import json, signal, sys, threading, time
from derecho_core import Conf, Group, SubgroupInfo, ordered, p2p
from derecho_allocators import DefaultSubgroupAllocator, flexible_even_shards, one_subgroup_policy

GROUP = None


class Store:
    def __init__(self):
        self.data = {}

    @ordered
    def put(self, key, value):
        self.data[key] = value
        return True

    @p2p
    def get(self, key):
        return self.data.get(key)

    @p2p
    def whoami(self):
        return GROUP.get_my_id()

    @p2p
    def slow_get(self, key, seconds):
        time.sleep(seconds)
        return self.data.get(key)

    @p2p
    def notify_me(self, message):
        callback = GROUP.get_client_callback(Store)
        caller = GROUP.get_rpc_caller_id()
        assert callback.has_external_client(caller)
        callback.notify(caller, message)
        return True


def main():
    global GROUP
    conf, args = Conf.parse_args(sys.argv[1:])
    n = int(args[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    layout = SubgroupInfo(DefaultSubgroupAllocator({Store: one_subgroup_policy(flexible_even_shards(1, 2, 3))}))
    GROUP = Group([Store], layout, conf=conf, join_timeout=60)
    while len(GROUP.get_members()) < n:
        time.sleep(0.02)
    GROUP.barrier_sync(timeout=60)
    if GROUP.get_my_id() == 0:
        GROUP.get_subgroup(Store).ordered_send("put", "k", "v").values(30)
    GROUP.barrier_sync(timeout=60)
    print(json.dumps({"event": "ready", "node": GROUP.get_my_id(), "members": GROUP.get_members()}), flush=True)
    stop.wait()
    GROUP.leave()


main()
'''


class Store:
    """The client's copy of the replicated type: only the method names matter (they give the tags)."""

    @ordered
    def put(self, key: str, value: Any) -> bool:
        raise NotImplementedError

    @p2p
    def get(self, key: str) -> Any:
        raise NotImplementedError

    @p2p
    def whoami(self) -> int:
        raise NotImplementedError

    @p2p
    def slow_get(self, key: str, seconds: float) -> Any:
        raise NotImplementedError

    @p2p
    def notify_me(self, message: Any) -> bool:
        raise NotImplementedError


PORT_KEYS = ("gms_port", "state_transfer_port", "sst_port", "rdmc_port", "external_port")
CLIENT_ID = 50


class MemberProc:
    def __init__(self, script: Path, node_id: int, ports: dict[str, int], conf_file: Path, n: int) -> None:
        self.node_id = node_id
        self.ports = ports
        args = [sys.executable, str(script), f"--DERECHO/local_id={node_id}", "--DERECHO/local_ip=127.0.0.1"]
        args += [f"--DERECHO/{k}={v}" for k, v in ports.items()]
        args += ["--", str(n)]
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "DERECHO_CONF_FILE": str(conf_file)},
                                     start_new_session=True)
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if sink is self.lines and json.loads(line).get("event") == "ready":
                self.ready.set()

    @property
    def external_port(self) -> int:
        return self.ports["external_port"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


class Cluster:
    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.workdir = workdir
        self.key_file = workdir / "cluster.key"
        self.key_file.write_text("external-client-test-key\n")
        self.ports = [dict(zip(PORT_KEYS, free_ports(5))) for _ in range(n)]
        self.settings = {"DERECHO/contact_ip": "127.0.0.1", "DERECHO/contact_port": self.ports[0]["gms_port"],
                         "DERECHO/heartbeat_ms": 50, "DERECHO/suspicion_timeout_ms": 600,
                         "DERECHO/cluster_key_file": str(self.key_file), "LOGGER/default_log_level": "warning",
                         "RDMA/provider": "sockets"}
        sections: dict[str, list[str]] = {}
        for key, value in self.settings.items():
            section, name = key.rsplit("/", 1)
            sections.setdefault(section, []).append(f"{name} = {value}")
        conf_file = workdir / "derecho.cfg"
        conf_file.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items()))
        script = workdir / "member.py"
        script.write_text(MEMBER)
        self.members = {i: MemberProc(script, i, self.ports[i], conf_file, n) for i in range(n)}

    def wait_ready(self, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        for m in self.members.values():
            if not m.ready.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"node {m.node_id} not ready: {''.join(m.stderr[-20:])}")

    def client_conf(self, client_id: int = CLIENT_ID, key: bool = True) -> Conf:
        overrides: dict[str, Any] = {k: v for k, v in self.settings.items() if k.startswith("DERECHO/")}
        overrides["DERECHO/local_id"] = client_id
        overrides["DERECHO/external_port"] = self.ports[0]["external_port"]
        if not key:
            overrides["DERECHO/cluster_key_file"] = ""
        return Conf.load(overrides=overrides, environ={})

    def client(self, client_id: int = CLIENT_ID, key: bool = True, contact: int = 0) -> ExternalGroupClient:
        return ExternalGroupClient([Store], self.client_conf(client_id, key),
                                   contact=("127.0.0.1", self.ports[contact]["external_port"]), timeout=5)

    def close(self) -> None:
        for m in self.members.values():
            m.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("external"))
    try:
        c.wait_ready()
        yield c
    finally:
        c.close()


def result(client: ExternalGroupClient, node: int, method: Any, *args: Any) -> Any:
    caller = client.get_subgroup_caller(Store)
    return caller.p2p_send(node, method, *args).get(10)[node].result(10)


@pytest.mark.timeout(60)
def test_client_sees_the_view_and_the_shard(cluster: Cluster) -> None:
    with cluster.client() as client:
        view = client.get_view()
        assert sorted(view.members) == [0, 1, 2] and client.get_members() == view.members
        assert [sorted(s) for s in client.get_subgroup_members(Store)] == [[0, 1, 2]]
        assert client.get_number_of_shards(Store) == 1 and client.get_num_subgroups(Store) == 1
        assert client.get_my_id() == CLIENT_ID
        status = client.status()
        # Group.status() lists members as {"id": ...} maps; without it the member sends plain ids
        ids = [m["id"] if isinstance(m, dict) else m for m in status["members"]]
        assert status["vid"] == view.vid and sorted(ids) == [0, 1, 2]
        assert client.status(2)["vid"] == view.vid


@pytest.mark.timeout(60)
def test_p2p_send_to_each_member_reads_what_was_put_by_ordered_send(cluster: Cluster) -> None:
    with cluster.client() as client:
        for node in client.get_subgroup_members(Store)[0]:
            assert result(client, node, "get", "k") == "v"
            assert result(client, node, Store.whoami) == node          # the method itself
            assert result(client, node, rpc_name("get"), "nope") is None  # its tag
        caller = client.get_subgroup_caller(Store)
        with pytest.raises(UnknownMethodError, match="not a p2p RPC target"):
            caller.p2p_send(1, "put", "k", "w")
        with pytest.raises(PayloadTooLargeError, match="max_p2p_request_payload_size"):
            caller.p2p_send(1, "get", "x" * 20_000)
        # many calls in flight at once: more than p2p_window_size (16) outstanding are queued by the client
        pending = [caller.p2p_send(2, "get", "k") for _ in range(50)]
        assert all(r.get(10)[2].result(10) == "v" for r in pending)


@pytest.mark.timeout(60)
def test_member_notifies_the_client(cluster: Cluster) -> None:
    got: list[Any] = []
    arrived = threading.Event()

    def handler(message: Any) -> None:
        got.append(message)
        arrived.set()

    with cluster.client() as client:
        caller = client.get_subgroup_caller(Store)
        caller.register_notification_handler(handler)
        assert result(client, 1, "notify_me", {"hello": [1, 2]}) is True
        assert arrived.wait(10), "no notification arrived"
        assert got == [{"hello": [1, 2]}]
        arrived.clear()
        assert result(client, 2, "notify_me", b"\x00raw bytes") is True
        assert arrived.wait(10)
        assert got[-1] == b"\x00raw bytes"
        caller.unregister_notification()
        assert result(client, 1, "notify_me", "dropped") is True
        time.sleep(0.3)
        assert len(got) == 2


@pytest.mark.timeout(60)
def test_client_with_a_member_id_or_a_connected_clients_id_is_refused(cluster: Cluster) -> None:
    with pytest.raises(ExternalClientRefusedError, match="member of the group") as info:
        cluster.client(client_id=1)
    assert info.value.code == "ID_IN_USE" and "local_id" in str(info.value)
    with cluster.client(client_id=60):
        with pytest.raises(ExternalClientRefusedError, match="another external client") as info:
            cluster.client(client_id=60)
        assert info.value.code == "ID_IN_USE"


@pytest.mark.timeout(60)
def test_client_without_the_cluster_key_is_refused(cluster: Cluster) -> None:
    with pytest.raises(ExternalClientRefusedError, match="cluster_key_file") as info:
        cluster.client(key=False)
    assert info.value.code == "AUTH"


def _garbage(port: int, data: bytes) -> bytes:
    """Send ``data`` to the external port; what came back before the member closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
        except OSError:
            return b""


@pytest.mark.timeout(60)
def test_garbage_on_the_external_port_does_not_hurt_the_member(cluster: Cluster) -> None:
    member = cluster.members[1]
    port = member.external_port
    header = struct.Struct("<4sBBBxI")
    hello = msgpack.packb([77, b"n" * 32])
    _garbage(port, os.urandom(5000))
    _garbage(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _garbage(port, header.pack(b"DEXT", 1, 1, 0, 1 << 30))                    # announces a 1 GiB frame
    _garbage(port, header.pack(b"DEXT", 1, 1, 0, 5) + b"\xc1\xc1\xc1\xc1\xc1")  # not msgpack
    _garbage(port, header.pack(b"DEXT", 1, 1, 0, 3) + msgpack.packb("hi"))    # not a list
    _garbage(port, header.pack(b"DEXT", 1, 6, 0, len(hello)) + hello)        # a request before HELLO
    bad_mac = hello + b"m" * 32
    refusal = _garbage(port, header.pack(b"DEXT", 1, 1, 1, len(bad_mac)) + bad_mac)  # wrong MAC
    assert b"AUTH" in refusal
    version = _garbage(port, header.pack(b"DEXT", 99, 1, 0, len(hello)) + hello)
    assert b"VERSION" in version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # half a frame, then gone
        s.sendall(header.pack(b"DEXT", 1, 1, 0, 100)[:7])
    assert member.proc.poll() is None
    with cluster.client() as client:
        assert result(client, 1, "get", "k") == "v"
    deadline = time.monotonic() + 5
    while not any("WARNING derecho.external" in line and "garbage" in line for line in member.stderr):
        assert time.monotonic() < deadline, "".join(member.stderr[-20:])
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_member_killed_client_refreshes_view_and_retries(cluster: Cluster) -> None:
    """Issue acceptance. Runs last in this file: it kills node 0 (the contact and leader)."""
    with cluster.client() as client:
        shard = client.get_subgroup_members(Store)[0]
        for node in shard:
            assert result(client, node, "get", "k") == "v"
        caller = client.get_subgroup_caller(Store)
        victim = 0
        slow = caller.p2p_send(victim, "slow_get", "k", 5.0)
        time.sleep(0.2)
        cluster.members[victim].kill()
        with pytest.raises(NodeRemovedFromGroupError):
            slow.get(5)[victim].result(5)
        with pytest.raises(NodeRemovedFromGroupError, match="update_view"):
            caller.p2p_send(victim, "get", "k")
        deadline = time.monotonic() + 20
        while victim in client.update_view().members:
            assert time.monotonic() < deadline, "the group never removed the killed member"
            time.sleep(0.2)
        survivors = client.get_subgroup_members(Store)[0]
        assert sorted(survivors) == [1, 2]
        for node in survivors:
            assert result(client, node, "get", "k") == "v"
        with pytest.raises(NodeRemovedFromGroupError, match="not a member"):
            caller.p2p_send(victim, "get", "k")
    # a new client whose contact is dead finds the group through... nothing: it names a live contact
    with cluster.client(contact=2) as client:
        assert sorted(client.get_members()) == [1, 2]
        assert result(client, 1, "get", "k") == "v"


class _StubGroup:
    """Just what ExternalServer touches before any request: its conf and the engine's view."""

    def __init__(self) -> None:
        self.conf = Conf.load(overrides={"DERECHO/local_id": 7}, environ={})
        self._engine = type("E", (), {"view": None})()


def _hello(port: int, client_id: int) -> tuple[socket.socket, int, list[Any]]:
    from derecho_core.external_server import HEADER, K_HELLO, FrameCodec

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    codec = FrameCodec(None, client_side=True)
    codec.nonce_c = os.urandom(32)
    s.sendall(codec.encode(K_HELLO, [client_id, codec.nonce_c]))
    header = s.recv(HEADER.size, socket.MSG_WAITALL)
    _magic, _version, kind, _flags, length = HEADER.unpack(header)
    return s, kind, msgpack.unpackb(s.recv(length, socket.MSG_WAITALL))


@pytest.mark.timeout(30)
def test_server_bounds_its_connections_and_the_wait_for_hello() -> None:
    from derecho_core.external_server import K_REFUSE, K_WELCOME, ExternalServer

    server = ExternalServer(_StubGroup(), "127.0.0.1", 0, None, max_clients=2, hello_timeout=0.5)  # type: ignore[arg-type]
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        first, kind, body = _hello(server.port, 100)
        assert kind == K_WELCOME and body[0] == 7 and server.has_external_client(100)
        assert server.reply_sink(100) is not None and server.reply_sink(101) is None
        third, kind, body = _hello(server.port, 101)  # the silent connection holds the second slot
        assert kind == K_REFUSE and body[0] == "TOO_MANY_CLIENTS" and "2 external-client" in body[1]
        assert silent.recv(10) == b""  # closed after hello_timeout
        fourth, kind, _ = _hello(server.port, 101)
        assert kind == K_WELCOME and server.connected_clients() == [100, 101]
        first.close()
        deadline = time.monotonic() + 5
        while server.has_external_client(100):  # a client that disconnects is forgotten
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for s in (silent, third, fourth):
            s.close()
    finally:
        server.close()


@pytest.mark.timeout(30)
def test_client_facing_something_else_on_the_port_fails_clearly() -> None:
    from derecho_core import DerechoError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    conf = Conf.load(overrides={"DERECHO/local_id": CLIENT_ID}, environ={})
    try:
        with pytest.raises(DerechoError, match="no member of the group answered.*not an external-client frame"):
            ExternalGroupClient([Store], conf, contact=listener.getsockname(), timeout=2)
    finally:
        listener.close()
