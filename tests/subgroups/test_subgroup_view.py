"""View, SubView, Mode, make_next_view (spec §3.1, §3.6) and SubgroupInfo.allocate's bookkeeping (§2.5)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import derecho_core
from derecho_core import (
    IpAndPorts,
    Mode,
    SubgroupInfo,
    SubgroupProvisioningError,
    SubView,
    View,
    make_next_view,
)


def test_public_names():
    for name in ["View", "SubView", "Mode", "make_next_view", "SubgroupInfo", "IpAndPorts"]:
        assert name in derecho_core.__all__ and getattr(derecho_core, name) is not None


def test_mode():
    assert Mode.RAW is Mode.UNORDERED
    assert Mode.parse("Raw") is Mode.parse("unordered") is Mode.parse(1) is Mode.UNORDERED
    assert Mode.parse(" Ordered ") is Mode.ORDERED
    with pytest.raises(ValueError, match="unknown delivery mode"):
        Mode.parse("total")


def test_subview_defaults_and_queries():
    sv = SubView([4, 2, 9])
    assert (sv.mode, sv.is_sender, sv.profile, sv.my_rank) == (Mode.ORDERED, [True] * 3, "DEFAULT", -1)
    sv = SubView([4, 2, 9], "Raw", [False, True, True], "large")
    assert sv.profile == "LARGE" and sv.mode is Mode.UNORDERED
    assert sv.rank_of(9) == 2 and sv.rank_of(5) == -1
    assert [sv.sender_rank_of(i) for i in range(3)] == [-1, 0, 1]
    assert sv.num_senders() == 2 and sv.senders == [2, 9]
    assert SubView([1, 2], is_sender=[]).is_sender == [True, True]  # Derecho: empty = everyone sends
    with pytest.raises(ValueError, match="2 members but 1 sender flags"):
        SubView([1, 2], is_sender=[True])
    with pytest.raises(ValueError, match="node 1 appears twice"):
        SubView([1, 2, 1])


def test_view_fields_and_checks():
    v = View(3, [5, 1, 7], [False, True, False], 2, member_ips_and_ports=[("10.0.0.5", 1, 2, 3, 4, 5), "10.0.0.1",
                                                                        None], my_id=7)
    assert (v.num_members, v.num_failed, v.my_rank, v.rank_of(1), v.find_rank_of_leader()) == (3, 1, 2, 1, 0)
    assert v.member_ips_and_ports[0] == IpAndPorts("10.0.0.5", 1, 2, 3, 4, 5)
    assert v.member_ips_and_ports[1] == IpAndPorts("10.0.0.1") and v.is_adequately_provisioned
    with pytest.raises(ValueError, match="next_unassigned_rank must be in"):
        View(0, [1, 2], next_unassigned_rank=3)
    with pytest.raises(ValueError, match="2 members but 1 failed flags"):
        View(0, [1, 2], [False])
    with pytest.raises(ValueError, match="appears twice"):
        View(0, [1, 1])
    with pytest.raises(SubgroupProvisioningError, match="node 4 is not a member of view 0"):
        View(0, [1, 2]).make_subview([1, 4])


# --------------------------------------------------------- make_next_view
def test_make_next_view_members_order_and_fields():
    prev = View(4, [10, 11, 12, 13, 14], [False, False, True, False, False], 3,
                member_ips_and_ports=[f"10.0.0.{i}" for i in range(5)], my_id=13, subgroup_type_order=["A"])
    nxt = make_next_view(prev, [14, 11], {20: ("10.0.1.20", 1, 2, 3, 4, 5), 15: "10.0.1.15"})
    assert nxt.vid == 5
    assert nxt.members == [10, 12, 13, 20, 15]  # survivors in old order, then joiners in proposal order
    assert nxt.failed == [False, True, False, False, False]
    assert nxt.member_ips_and_ports[2] == IpAndPorts("10.0.0.3") and nxt.member_ips_and_ports[3].gms_port == 1
    assert (nxt.joined, nxt.departed) == ([20, 15], [14, 11])
    assert nxt.next_unassigned_rank == 2  # only 11 (rank 1) was below 3; 14 (rank 4) was idle
    assert nxt.my_rank == 2 and nxt.subgroup_type_order == ["A"]
    assert nxt.subgroup_shard_views == []  # no allocation yet
    assert make_next_view(prev, [13], []).my_id is None


def test_make_next_view_errors():
    prev = View(0, [1, 2, 3])
    with pytest.raises(ValueError, match="leaver 9 is not a member"):
        make_next_view(prev, [9], [])
    with pytest.raises(ValueError, match="joiner 2 is already a member"):
        make_next_view(prev, [], [2])
    with pytest.raises(ValueError, match="joiners: node 5 appears twice"):
        make_next_view(prev, [], [5, 5])
    with pytest.raises(ValueError, match="2 joiners but 1 joiner addresses"):
        make_next_view(prev, [], [5, 6], ["10.0.0.5"])


# --------------------------------------------------------------- allocate
def two_type_allocator(types, prev_view, curr_view):
    m = curr_view.members
    if len(m) < 4:
        raise SubgroupProvisioningError("need 4")
    curr_view.next_unassigned_rank = 4
    return {types[0]: [[curr_view.make_subview(m[0:2], is_sender=[True, False])]],
            types[1]: [[SubView(m[2:3]), SubView(m[3:4], profile="x")], [SubView(m[0:1])]]}


def test_allocate_ids_my_subgroups_joined_departed():
    info = SubgroupInfo(two_type_allocator)
    v0 = View(0, [0, 1, 2, 3, 4], member_ips_and_ports=[f"h{i}" for i in range(5)], my_id=0)
    result = info.allocate(["A", "B"], None, v0)
    assert list(result) == ["A", "B"]
    assert v0.subgroup_ids_by_type_id == [[0], [1, 2]] and v0.subgroup_ids_by_type == {"A": [0], "B": [1, 2]}
    assert v0.my_subgroups == {0: 0, 2: 0}
    assert v0.subgroup_shard_views[1][1].member_ips_and_ports == [IpAndPorts("h3")]  # filled in from the view
    assert v0.subgroup_shard_views[0][0].my_rank == 0 and v0.subgroup_shard_views[1][0].my_rank == -1
    assert v0.subgroup_shard_views[0][0].joined == [0, 1]  # first view: every member joined (C++ leaves it empty)
    v1 = make_next_view(v0, [1], [7])
    info.allocate(["A", "B"], v0, v1)
    a = v1.subgroup_shard_views[0][0]
    assert (a.members, a.joined, a.departed) == ([0, 2], [2], [1])


def test_allocate_inadequate_leaves_view_untouched():
    info = SubgroupInfo(two_type_allocator)
    v = View(0, [0, 1, 2], next_unassigned_rank=1)
    assert info.allocate(["A", "B"], None, v) == {}
    assert not v.is_adequately_provisioned and v.next_unassigned_rank == 1 and v.subgroup_shard_views == []
    with pytest.raises(SubgroupProvisioningError, match="need 4"):
        info.allocate(["A", "B"], None, v, raise_on_inadequate=True)


def test_allocate_refuses_malformed_allocations():
    def missing(types, prev, view):
        return {types[0]: [[SubView(view.members)]]}

    def not_subview(types, prev, view):
        view.next_unassigned_rank = 2
        return {t: [[list(view.members)]] for t in types}

    def outsider(types, prev, view):
        return {t: [[SubView([99])]] for t in types}

    with pytest.raises(ValueError, match="no subgroups for type.*B"):
        SubgroupInfo(missing).allocate(["A", "B"], None, View(0, [1, 2]))
    v = View(0, [1, 2])
    with pytest.raises(TypeError, match=r"A\[0\]\[0\] is not a SubView"):
        SubgroupInfo(not_subview).allocate(["A"], None, v)
    assert v.next_unassigned_rank == 0  # restored on any error
    v = View(0, [1, 2])
    SubgroupInfo(outsider).allocate(["A"], None, v)
    assert not v.is_adequately_provisioned  # a node outside the view: like Derecho's make_subview
    with pytest.raises(TypeError, match="needs a callable"):
        SubgroupInfo("default")


# ---------------------------------------------------------- serialization
def allocated_view() -> View:
    v = View(2, [0, 1, 2, 3, 4], [False, True, False, False, False], 0,
             member_ips_and_ports=[IpAndPorts(f"10.0.0.{i}", 23580, 28366, 37683, 31675, 32645) for i in range(5)],
             joined=[4], departed=[9], my_id=3)
    SubgroupInfo(two_type_allocator).allocate(["A", "B"], None, v)
    return v


def test_round_trip_keeps_every_serialized_field():
    v = allocated_view()
    data = v.to_bytes()
    w = View.from_bytes(data, my_id=3, subgroup_type_order=["A", "B"])
    assert w == v and w.to_bytes() == data
    assert (w.vid, w.members, w.failed, w.joined, w.departed, w.next_unassigned_rank) == (
        2, [0, 1, 2, 3, 4], [False, True, False, False, False], [4], [9], 4)
    assert w.member_ips_and_ports[4] == IpAndPorts("10.0.0.4", 23580, 28366, 37683, 31675, 32645)
    assert w.subgroup_shard_views[0][0].is_sender == [True, False]
    assert w.subgroup_shard_views[1][1].profile == "X"
    assert w.my_subgroups == {1: 1} and w.subgroup_ids_by_type == {"A": [0], "B": [1, 2]}
    # the receiver's own id decides my_subgroups; the type order is the receiver's to give
    assert View.from_bytes(data, my_id=0).my_subgroups == {0: 0, 2: 0}
    with pytest.raises(ValueError, match="allocates 2 subgroup types but this node has 3"):
        View.from_bytes(data, subgroup_type_order=["A", "B", "C"])


@pytest.mark.parametrize("data, message", [
    (b"", "not a serialized View"),
    (b"\xc1garbage", "not a serialized View"),
    (msgpack.packb({"vid": 1}), "expected a 10-element list"),
    (msgpack.packb([99, 0, [], [], [], [], [], 0, [], []]), "format version 99"),
    (msgpack.packb([1, 0, [1], [None], [False], [], [], 0, [[0]], [[[0, [5], [True], [None], [], [], "D"]]]]),
     "a shard holds a node that is not a member"),
    (msgpack.packb([1, 0, [1], [None], [False], [], [], 0, [[1]], [[]]]), "subgroup ids do not match"),
    (msgpack.packb([1, 0, [1], [None], [False], [], [], 5, [], []]), "next_unassigned_rank must be in"),
    (msgpack.packb([1, 0, ["x"], [None], [False], [], [], 0, [], []]), "node ids are non-negative integers"),
])
def test_garbage_is_a_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        View.from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_random_and_truncated_bytes_only_raise_value_error(noise, cut):
    for data in (noise, allocated_view().to_bytes()[:cut]):
        try:
            View.from_bytes(data)
        except ValueError:
            pass


def test_wrong_shapes_deep_inside_are_value_errors():
    bad_addr = msgpack.packb([1, 0, [1], [["10.0.0.1", None]], [False], [], [], 0, [], []])
    with pytest.raises(ValueError, match="not a serialized View"):
        View.from_bytes(bad_addr)
    bad_mode = msgpack.packb([1, 0, [1], [None], [False], [], [], 0, [[0]], [[[7, [1], [True], [None], [], [], "D"]]]])
    with pytest.raises(ValueError):
        View.from_bytes(bad_mode)
