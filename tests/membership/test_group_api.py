"""The Group membership API with several nodes in one process (Conf objects passed explicitly)."""

from __future__ import annotations

import threading

import pytest

from derecho_core import Conf, Group, GroupStoppedError, SubgroupInfo
from derecho_core.testing.processes import free_ports

derecho_allocators = pytest.importorskip("derecho_allocators")


class Store:
    pass


def confs(n: int) -> list[Conf]:
    ports = [free_ports(5) for _ in range(n)]
    base = {"DERECHO/contact_ip": "127.0.0.1", "DERECHO/contact_port": ports[0][0],
            "DERECHO/heartbeat_ms": 50, "DERECHO/suspicion_timeout_ms": 1000,
            "LOGGER/log_to_terminal": False}
    return [Conf.load(overrides={**base, "DERECHO/local_id": i, "DERECHO/gms_port": p[0],
                                 "DERECHO/state_transfer_port": p[1], "DERECHO/sst_port": p[2],
                                 "DERECHO/rdmc_port": p[3], "DERECHO/external_port": p[4]}, environ={})
            for i, p in enumerate(ports)]


def layout() -> SubgroupInfo:
    from derecho_allocators import DefaultSubgroupAllocator, fixed_even_shards, one_subgroup_policy

    return SubgroupInfo(DefaultSubgroupAllocator({Store: one_subgroup_policy(fixed_even_shards(1, 3))}))


@pytest.mark.timeout(120)
def test_three_groups_in_one_process():
    cs = confs(3)
    seen: list[tuple[int, int, list[int], int]] = []
    lock = threading.Lock()
    groups: list[Group] = []

    def upcall_for(i: int):
        def upcall(view) -> None:
            g = groups[i] if i < len(groups) else None
            # getters work inside an upcall (no lock is held)
            members = g.get_members() if g is not None else view.members
            with lock:
                seen.append((i, view.vid, members, view.num_members))
        return upcall

    results: dict[int, Group] = {}

    def start(i: int) -> None:
        results[i] = Group([Store], layout(), conf=cs[i], view_upcalls=[upcall_for(i)], join_timeout=60)

    # the first view needs three members: the contact waits for both joiners
    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    groups.extend(results[i] for i in range(3))
    try:
        for g in groups:
            assert sorted(g.get_members()) == [0, 1, 2]
            assert g.get_subgroup_members(Store) == [g.get_members()]
            assert g.get_my_shard(Store) == 0
            assert g.get_num_subgroups(Store) == 1 and g.get_number_of_shards(Store) == 1
            assert g.get_my_rank() == g.get_members().index(g.get_my_id())
        # barrier: everyone must arrive before anyone leaves it
        arrived: list[int] = []

        def barrier(g: Group) -> None:
            g.barrier_sync(timeout=30)
            arrived.append(g.get_my_id())

        bt = [threading.Thread(target=barrier, args=(g,)) for g in groups[:2]]
        for t in bt:
            t.start()
        for t in bt:
            t.join(0.5)
        assert arrived == []  # the third has not reached the barrier yet
        groups[2].barrier_sync(timeout=30)
        for t in bt:
            t.join(30)
        assert sorted(arrived) == sorted(g.get_my_id() for g in groups[:2])
    finally:
        for g in reversed(groups):
            g.leave()
    assert {v for (i, v, _, _) in seen if i == 0} >= {0}


@pytest.mark.timeout(120)
def test_report_failure_and_inadequate_view():
    cs = confs(3)
    groups: dict[int, Group] = {}
    threads = [threading.Thread(target=lambda i=i: groups.__setitem__(i, Group(conf=cs[i], join_timeout=60)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        groups[0].report_failure(2)
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sorted(groups[0].get_members()) != [0, 1]:
            time.sleep(0.05)
        assert sorted(groups[0].get_members()) == [0, 1]
        # node 2 learns it was reported failed and stops
        while time.monotonic() < deadline and groups[2]._engine.stop_reason is None:
            time.sleep(0.05)
        with pytest.raises(GroupStoppedError, match="reported that node 2 failed"):
            groups[2].get_members()
    finally:
        for g in groups.values():
            g.leave()


@pytest.mark.timeout(60)
def test_joining_nowhere_times_out_clearly():
    c = confs(2)[1]  # its contact is not running
    with pytest.raises(TimeoutError, match="not admitted to a group"):
        Group(conf=c, join_timeout=1.5)
