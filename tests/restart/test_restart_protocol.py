"""The pure parts of total restart and of the shard frontiers: quorum windows, the restart view, progress."""

from __future__ import annotations

from typing import Any

import pytest

from derecho_core import SubgroupProvisioningError, SubView, View
from derecho_core.protocol import wire
from derecho_core.protocol.progress import LocalProgress, ProgressTracker, ShardProgress
from derecho_core.protocol.restart import Candidate, RestartCoordinator, RestartInfo
from derecho_core.subgroup_info import SubgroupInfo
from derecho_core.view import IpAndPorts


class T:
    pass


def allocator(types: Any, prev: View | None, curr: View) -> dict[Any, list[list[SubView]]]:
    if len(curr.members) < 2:
        raise SubgroupProvisioningError("needs 2")
    return {T: [[curr.make_subview(curr.members)]]}


INFO = SubgroupInfo(allocator)


def allocate(prev: View | None, view: View) -> Any:
    return INFO.allocate([T], prev, view, raise_on_inadequate=True)


def addr(n: int) -> IpAndPorts:
    return IpAndPorts("127.0.0.1", 1000 + n, 2000 + n, 3000 + n, 4000 + n, 5000 + n)


def saved_view(vid: int, members: list[int]) -> View:
    view = View(vid, members, member_ips_and_ports=[addr(m) for m in members], subgroup_type_order=[T])
    allocate(None, view)
    return view


def candidate(n: int, view: View | None, persisted: int = -1, group: str = "g1") -> Candidate:
    info = None if view is None else RestartInfo(group, view, {"0/0": persisted})
    return Candidate(n, addr(n), n + 100, info)


def test_waits_for_a_majority_then_the_window_then_restarts_in_the_next_vid() -> None:
    last = saved_view(7, [0, 1, 2, 3, 4])
    c = RestartCoordinator(candidate(0, last, 10), timeout_ms=1000, now=0, allocate=allocate, type_order=[T])
    assert c.decide(10) is None and "1 of the 5 members" in c.last_reason
    c.add(candidate(1, last, 30))
    assert c.decide(20) is None and "the restart needs 3" in c.last_reason
    assert c.decide(1500) is None and c.window_end == 2500  # no quorum when the window ended: a new window
    c.add(candidate(3, last, 20))
    assert c.decide(1600) is None and "waiting for the rest" in c.last_reason  # quorum, window still open
    view = c.decide(2500)
    assert view is not None and view.vid == 8 and view.members == [0, 1, 3]
    shard = view.subgroup_shard_views[0][0]
    assert shard.joined == [0, 3]  # node 1 has the longest log and ships everyone else the tail


def test_restarts_at_once_when_every_member_is_back_and_newcomers_join() -> None:
    last = saved_view(3, [0, 1, 2])
    c = RestartCoordinator(candidate(0, last, 5), timeout_ms=10_000, now=0, allocate=allocate, type_order=[T])
    c.add(candidate(9, None))  # a brand-new node: a newcomer (Derecho issue #252)
    c.add(candidate(1, last, 5))
    assert c.decide(1) is None
    c.add(candidate(2, last, 4))
    view = c.decide(2)
    assert view is not None and view.members == [0, 1, 2, 9] and view.vid == 4
    assert view.subgroup_shard_views[0][0].joined == [1, 2, 9]  # ties go to the lowest rank


def test_the_newest_saved_view_wins_and_another_groups_logs_are_refused() -> None:
    old, new = saved_view(2, [0, 1, 2]), saved_view(5, [0, 1, 3])
    c = RestartCoordinator(candidate(0, old, 1), timeout_ms=100, now=0, allocate=allocate, type_order=[T])
    assert c.add(candidate(3, new, 9)) is None
    assert "another" not in (c.add(candidate(1, new, 9)) or "")
    assert c.newest.vid == 5
    refused = c.add(candidate(4, new, 9, group="other"))
    assert refused is not None and "belong to group other" in refused
    view = c.decide(200)
    assert view is not None and view.vid == 6 and view.members == [0, 1, 3]


def test_an_inadequate_restart_view_blocks_the_restart() -> None:
    def two_shards(types: Any, prev: View | None, curr: View) -> dict[Any, list[list[SubView]]]:
        m = curr.members
        if len(m) < 4:
            raise SubgroupProvisioningError("needs 4")
        return {T: [[curr.make_subview(m[:2]), curr.make_subview(m[2:])]]}

    info = SubgroupInfo(two_shards)
    last = View(1, [0, 1, 2, 3, 4], member_ips_and_ports=[addr(m) for m in range(5)], subgroup_type_order=[T])
    info.allocate([T], None, last)
    c = RestartCoordinator(candidate(0, last), 100, 0, lambda p, v: info.allocate([T], p, v, raise_on_inadequate=True),
                           [T])
    c.add(candidate(1, last))
    c.add(candidate(4, last))
    assert c.decide(500) is None  # a majority and a member of each shard, but [0, 1, 4] is too small a view
    assert "inadequately provisioned" in c.last_reason


def test_restart_info_decoding_refuses_garbage() -> None:
    last = saved_view(1, [0, 1])
    info = RestartInfo("g", last, {"0/0": 4})
    assert RestartInfo.decode(info.encode(), [T]).persisted == {"0/0": 4}
    for bad in (None, {}, {"group": 1, "view": b"", "persisted": {}}, {**info.encode(), "view": b"xx"},
                {**info.encode(), "persisted": {"00": 1}}, {**info.encode(), "persisted": {"0/0": "x"}}):
        with pytest.raises(wire.WireError):
            RestartInfo.decode(bad, [T])


def test_a_shard_with_no_member_back_blocks_the_restart() -> None:
    def two_shards(types: Any, prev: View | None, curr: View) -> dict[Any, list[list[SubView]]]:
        m = curr.members
        if len(m) < 3:
            raise SubgroupProvisioningError("needs 3")
        return {T: [[curr.make_subview(m[:3]), curr.make_subview(m[3:])]]}

    info = SubgroupInfo(two_shards)
    last = View(1, [0, 1, 2, 3, 4], member_ips_and_ports=[addr(m) for m in range(5)], subgroup_type_order=[T])
    info.allocate([T], None, last)
    c = RestartCoordinator(candidate(0, last), 100, 0, lambda p, v: info.allocate([T], p, v, raise_on_inadequate=True),
                           [T])
    c.add(candidate(1, last))
    c.add(candidate(2, last))  # a majority, but nobody of the shard [3, 4]
    assert c.decide(500) is None and "no member of subgroup 0 shard 1" in c.last_reason
    c.add(candidate(4, last))
    assert c.decide(550) is None and c.decide(700) is not None  # quorum now; the renewed window ends at 600


def progress_view(vid: int, members: list[int]) -> View:
    return saved_view(vid, members)


def test_global_frontiers_are_the_minimum_of_live_members_and_only_grow() -> None:
    p = ProgressTracker(0)
    p.install(progress_view(1, [0, 1, 2]))
    sends, changed = p.local(LocalProgress(0, 10, 1000))
    assert sorted(n for n, _ in sends) == [1, 2] and changed == []  # others have not reported
    msg = wire.encode(1, 0, 8, 900)
    assert p.on_message(1, msg) == []
    assert p.on_message(2, wire.encode(1, 0, 12, 1100)) == [ShardProgress(0, 8, 900)]
    assert p.set_failed({1}) == [ShardProgress(0, 10, 1000)]  # a failed member no longer holds it back
    p.install(progress_view(2, [0, 2, 3]))  # a joiner that has not reported holds the frontier, never lowers it
    assert p.on_message(2, wire.encode(2, 0, 20, 2000)) == []
    assert p.on_message(3, wire.encode(2, 0, 15, 1500)) == []  # the minimum is still this node's own (10, 1000)
    _, changed = p.local(LocalProgress(0, 30, 3000))
    assert changed == [ShardProgress(0, 15, 1500)]
    with pytest.raises(wire.WireError):
        p.on_message(2, b"\x93\x01\x02")
