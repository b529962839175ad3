"""RPC semantics on small groups run as threads of this process (fast; real sockets on 127.0.0.1).

Covered: replies and exceptions, calls from inside handlers, size limits,
versions, persistence callbacks and frontiers, temporal queries bounded by
the stability frontier, and calls to a subgroup from a non-member.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from derecho_core import (
    Conf,
    DeadlockError,
    Group,
    NodeRemovedFromGroupError,
    PayloadTooLargeError,
    Persistent,
    PersistentRegistry,
    RemoteExceptionOccurred,
    SubgroupInfo,
    SubView,
    UserMessageCallbacks,
    VersionNotStableError,
    View,
    ordered,
    p2p,
)
from derecho_core.testing.processes import free_ports

GROUPS: dict[int, Group] = {}


class Account:
    def __init__(self, registry: PersistentRegistry) -> None:
        self.balance: Persistent[int] = Persistent(int, registry, "balance")
        self.seen_versions: list[int] = []
        self.node = -1

    @ordered
    def deposit(self, amount: int) -> int:
        self.balance.value = self.balance.value + amount
        self.seen_versions.append(GROUPS[self.node].get_subgroup(Account).get_current_version())
        return self.balance.value

    @ordered
    def fail(self) -> None:
        raise ValueError("insufficient funds")

    @ordered
    def echo(self, data: bytes) -> bytes:
        return data

    @ordered
    def chain(self) -> str:
        handle = GROUPS[self.node].get_subgroup(Account)
        later = handle.ordered_send("deposit", 1)  # queued, not deadlocked (Derecho issue #70)
        try:
            later.get(timeout=5)
        except DeadlockError as exc:
            return f"refused: {exc}"
        return "waited"

    @ordered
    def fan_out(self, n: int) -> int:
        # more calls than MAX_QUEUED_SENDS from one handler: the window waits for this very handler, so
        # waiting for room here would never end
        handle = GROUPS[self.node].get_subgroup(Account)
        for _ in range(n):
            handle.ordered_send("echo", b"")
        return n

    @p2p
    def read(self) -> int:
        return self.balance.value

    @p2p
    def big(self, n: int) -> bytes:
        return b"x" * n


class Directory:
    @ordered
    def noop(self) -> None:
        pass

    @p2p
    def who(self) -> str:
        return "directory"


def layout(types: Any, prev: View | None, curr: View) -> dict[Any, list[list[SubView]]]:
    from derecho_core import SubgroupProvisioningError

    if sorted(curr.members) != [0, 1, 2]:
        raise SubgroupProvisioningError("needs nodes 0, 1 and 2")
    return {Account: [[curr.make_subview([0, 1])]], Directory: [[curr.make_subview([2])]]}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Group]]:
    base: Path = tmp_path_factory.mktemp("rpc")
    ports = [free_ports(5) for _ in range(3)]
    events: dict[str, list[tuple[int, int]]] = {"local": [], "global": []}

    def conf(i: int) -> Conf:
        p = ports[i]
        return Conf.load(overrides={
            "DERECHO/local_id": i, "DERECHO/local_ip": "127.0.0.1", "DERECHO/gms_port": p[0],
            "DERECHO/state_transfer_port": p[1], "DERECHO/sst_port": p[2], "DERECHO/rdmc_port": p[3],
            "DERECHO/external_port": p[4], "DERECHO/contact_ip": "127.0.0.1", "DERECHO/contact_port": ports[0][0],
            "DERECHO/heartbeat_ms": 50, "PERS/file_path": str(base / f"n{i}"),
            "SUBGROUP/DEFAULT/max_payload_size": 4096, "SUBGROUP/DEFAULT/max_reply_payload_size": 2048,
            "DERECHO/max_p2p_request_payload_size": 1024, "DERECHO/max_p2p_reply_payload_size": 1024,
            "LOGGER/default_log_level": "warning"})

    def factory(i: int) -> Any:
        def make(reg: PersistentRegistry, sg: int) -> Account:
            acc = Account(reg)
            acc.node = i
            return acc
        return make

    def start(i: int) -> None:
        cbs = UserMessageCallbacks(
            local_persistence_callback=lambda sg, v: events["local"].append((i, v)),
            global_persistence_callback=lambda sg, v: events["global"].append((i, v)))
        GROUPS[i] = Group([Account, Directory], SubgroupInfo(layout), factories={Account: factory(i)},
                          conf=conf(i), callbacks=cbs, join_timeout=30)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(40)
    assert set(GROUPS) == {0, 1, 2}
    GROUPS[0].events = events  # type: ignore[attr-defined]
    yield GROUPS
    for i in (2, 1, 0):
        GROUPS[i].leave()
    GROUPS.clear()


@pytest.mark.timeout(60)
def test_every_member_replies_and_versions_are_those_of_the_delivery(trio: dict[int, Group]) -> None:
    h = trio[0].get_subgroup(Account)
    r = h.ordered_send(Account.deposit, 10)
    assert set(r.get(10)) == {0, 1}
    values = r.values(10)
    assert values[0] == values[1]
    for i in (0, 1):
        acc = trio[i].get_subgroup(Account).get_ref()
        assert r.version in acc.seen_versions  # get_current_version inside the handler
        assert acc.balance.get(r.version) == values[0]
    assert r.version >> 32 == trio[0].get_view().vid


@pytest.mark.timeout(60)
def test_handler_exceptions_come_back_with_type_and_message(trio: dict[int, Group]) -> None:
    r = trio[1].get_subgroup(Account).ordered_send("fail")
    for node, fut in r.get(10).items():
        with pytest.raises(RemoteExceptionOccurred) as info:
            fut.result(10)
        assert info.value.node_id == node and info.value.remote_type == "ValueError"
        assert info.value.remote_message == "insufficient funds"


@pytest.mark.timeout(60)
def test_ordered_send_inside_a_handler_is_queued_and_waiting_on_it_is_refused(trio: dict[int, Group]) -> None:
    h = trio[0].get_subgroup(Account)
    before = h.p2p_send(0, "read").values(10)[0]
    answers = h.ordered_send("chain").values(20)
    assert all(a.startswith("refused:") and "would deadlock" in a for a in answers.values())
    deadline = time.monotonic() + 10
    while h.p2p_send(0, "read").values(10)[0] != before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # both members' queued deposits were delivered afterwards
    assert h.p2p_send(0, "read").values(10)[0] == before + 2


@pytest.mark.timeout(120)
def test_a_handler_may_queue_more_calls_than_the_send_queue_holds(trio: dict[int, Group]) -> None:
    from derecho_core.engine import MAX_QUEUED_SENDS

    h = trio[0].get_subgroup(Account)
    n = MAX_QUEUED_SENDS + 200
    assert h.ordered_send("fan_out", n).values(60) == {0: n, 1: n}
    assert h.ordered_send("echo", b"after").values(60) == {0: b"after", 1: b"after"}  # everything drained


@pytest.mark.timeout(60)
def test_size_limits_name_their_configuration_keys(trio: dict[int, Group]) -> None:
    h = trio[0].get_subgroup(Account)
    with pytest.raises(PayloadTooLargeError, match="SUBGROUP/<PROFILE>/max_payload_size"):
        h.ordered_send("echo", b"x" * 5000)
    with pytest.raises(PayloadTooLargeError, match="DERECHO/max_p2p_request_payload_size"):
        h.p2p_send(1, "big", "x" * 2000)
    fut = h.ordered_send("echo", b"y" * 3000).get(10)[1]
    with pytest.raises(RemoteExceptionOccurred, match="SUBGROUP/DEFAULT/max_reply_payload_size"):
        fut.result(10)
    with pytest.raises(RemoteExceptionOccurred, match="DERECHO/max_p2p_reply_payload_size"):
        h.p2p_send(1, "big", 5000).get(10)[1].result(10)


@pytest.mark.timeout(60)
def test_persistence_futures_callbacks_and_the_global_frontier(trio: dict[int, Group]) -> None:
    h = trio[1].get_subgroup(Account)
    r = h.ordered_send("deposit", 5)
    r.await_local_persistence(10)
    r.await_global_persistence(10)
    assert h.get_global_persistence_frontier() >= r.version
    assert h.wait_for_global_persistence_frontier(r.version, 10) is True
    assert h.wait_for_global_persistence_frontier(r.version + (1 << 40)) is False  # not delivered yet
    events = trio[0].events  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(v >= r.version for i, v in events["global"] if i == 0):
        time.sleep(0.02)
    assert any(v >= r.version for i, v in events["local"] if i == 1)
    assert any(v >= r.version for i, v in events["global"] if i == 0)
    with pytest.raises(Exception, match="ordered_send"):
        h.p2p_send(0, "read").await_global_persistence(1)


@pytest.mark.timeout(60)
def test_temporal_queries_are_bounded_by_the_stability_frontier(trio: dict[int, Group]) -> None:
    h = trio[0].get_subgroup(Account)
    marks = []
    for amount in (100, 200, 300):
        r = h.ordered_send("deposit", amount)
        value = r.values(10)[0]
        time.sleep(0.02)
        marks.append((time.time_ns() // 1000, value))
    deadline = time.monotonic() + 10
    while h.get_stability_frontier_us() <= marks[-1][0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h.get_stability_frontier_us() > marks[-1][0]
    for i in (0, 1):
        acc = trio[i].get_subgroup(Account).get_ref()
        for when, value in marks:
            assert acc.balance.get_by_time(when) == value
        with pytest.raises(VersionNotStableError):
            acc.balance.get_by_time(time.time_ns() // 1000 + 60_000_000)


@pytest.mark.timeout(60)
def test_a_non_member_calls_a_subgroup_by_p2p(trio: dict[int, Group]) -> None:
    caller = trio[0].get_nonmember_subgroup(Directory)
    assert caller.p2p_send(2, "who").values(10) == {2: "directory"}
    with pytest.raises(NodeRemovedFromGroupError, match="not a member of subgroup"):
        caller.p2p_send(1, "who")
    with pytest.raises(Exception, match="use get_subgroup"):
        trio[2].get_nonmember_subgroup(Directory)


@pytest.mark.timeout(60)
def test_query_results_are_awaitable(trio: dict[int, Group]) -> None:
    import asyncio

    async def main() -> dict[int, Any]:
        futures = await trio[0].get_subgroup(Account).ordered_send("deposit", 0)
        return {n: f.result(10) for n, f in futures.items()}

    assert set(asyncio.run(main())) == {0, 1}


@pytest.mark.timeout(60)
def test_status_describes_the_view_subgroups_and_progress(trio: dict[int, Group]) -> None:
    import json

    r = trio[0].get_subgroup(Account).ordered_send("deposit", 1)
    r.await_global_persistence(10)
    status = json.loads(json.dumps(trio[0].status()))  # JSON-able
    assert status["node"] == 0 and status["vid"] == trio[0].get_view().vid
    assert sorted(m["id"] for m in status["members"]) == [0, 1, 2]
    account = next(s for s in status["subgroups"] if s["type"] == "Account")
    assert account["shards"][0]["members"] == [0, 1] and account["shards"][0]["mode"] == "ORDERED"
    mine = status["my_shards"][str(account["subgroup_id"])]
    assert mine["global_persisted"] >= r.version and mine["persistent_fields"] == ["balance"]
    assert status["recent_views"][-1]["vid"] == status["vid"]
