"""Derecho's allocator oracle, src/applications/tests/unit_tests/subgroup_function_tester.cpp, rewritten as tests.

The C++ tester prints its allocations; the expected values here are derived
by hand from spec §2.4 (with the fixes of docs/allocators.md) and written
out in full: members, senders, modes, profiles and next_unassigned_rank.
The tester fails nodes by *rank*; make_next_view takes node ids, so each step
names the ids those ranks held.

Scenarios (the tester's TEST numbers in brackets):
  1 fixed sizes, first view, with a cross product        [1]
  2 failures inside subgroups                            [2]
  3 failures before and at the next_unassigned_rank      [3]   (the '<=' quirk of spec §3.6)
  4 inadequate view                                      [4]
  5 re-provisioning by joiners after the inadequate view [5]
  6 flexible sizes, first view                           [6]
  7 flexible: failures refilled from idle nodes          [7]
  8 flexible: shards shrink towards their minimum        [8]
  9 flexible: re-expansion when nodes join               [9]
 plus JSON layout with overlapping reserved ids and a designated sender [10-14].
"""

from __future__ import annotations

import pytest
from derecho_allocators import (
    CrossProductPolicy,
    DefaultSubgroupAllocator,
    SubgroupAllocationPolicy,
    custom_shards_policy,
    fixed_even_shards,
    flexible_even_shards,
    identical_subgroups_policy,
    one_subgroup_policy,
)
from subgroup_helpers import addr, all_shards, assert_ordered_default_all_senders, first_view, layout, r, senders

from derecho_core import Mode, SubgroupInfo, SubgroupProvisioningError, make_next_view


class T1: ...
class T2: ...
class T3: ...
class T4: ...
class T5: ...
class T6: ...


ORD3 = [Mode.ORDERED] * 3
DEF3 = ["default"] * 3  # the tester writes lower case; profiles are upper-cased


def cross(source: list[list[int]], targets: list[list[int]]) -> list[list[list[int]]]:
    """Expected cross product: subgroup i*t+j = [source member i] + target shard j (one shard each)."""
    return [[[s] + t] for s in [m for shard in source for m in shard] for t in targets]


# --------------------------------------------------------------- fixed sizes
FIXED_TYPES = [T1, T2, T3, T4, T5, T6]


@pytest.fixture(scope="module")
def fixed():
    info = SubgroupInfo(DefaultSubgroupAllocator({
        T1: one_subgroup_policy(fixed_even_shards(5, 3)),
        T2: one_subgroup_policy(fixed_even_shards(1, 5)),
        T3: one_subgroup_policy(custom_shards_policy([2, 5, 3], [2, 5, 3], ORD3, DEF3)),
        T4: identical_subgroups_policy(2, fixed_even_shards(3, 4)),
        T5: SubgroupAllocationPolicy(3, False, (fixed_even_shards(3, 3),
                                                custom_shards_policy([4, 3, 4], [4, 3, 4], ORD3, DEF3),
                                                fixed_even_shards(2, 2))),
        T6: CrossProductPolicy((T3, 0), (T1, 0)),
    }))
    views = {}
    v1 = first_view(range(100), FIXED_TYPES)
    info.allocate(FIXED_TYPES, None, v1)
    views[1] = v1
    v2 = make_next_view(v1, [1, 3, 17, 38, 40], [])  # ranks {1,3,17,38,40} = those ids
    info.allocate(FIXED_TYPES, v1, v2)
    views[2] = v2
    # ranks {13, 20, 59, 78, 89} of view 2; rank 78 is exactly next_unassigned_rank
    leavers3 = [v2.members[rank] for rank in (13, 20, 59, 78, 89)]
    v3 = make_next_view(v2, leavers3, [])
    info.allocate(FIXED_TYPES, v2, v3)
    views[3] = v3
    leavers4 = [v3.members[rank] for rank in range(39, 89)]  # the tester's iota(50) from 39
    v4 = make_next_view(v3, leavers4, [])
    v4_nur_before = v4.next_unassigned_rank
    result4 = info.allocate(FIXED_TYPES, v3, v4)
    views[4] = (v4, v4_nur_before, result4)
    # An inadequate view is never installed: the next one is built from view 3 again.
    v5 = make_next_view(v3, leavers4, {n: addr(n) for n in range(100, 140)})
    info.allocate(FIXED_TYPES, v3, v5)
    views[5] = (v5, leavers3, leavers4)
    return views


def test_1_fixed_first_view(fixed):
    v = fixed[1]
    assert v.is_adequately_provisioned
    assert layout(v, T1) == [[r(0, 2), r(3, 5), r(6, 8), r(9, 11), r(12, 14)]]
    assert layout(v, T2) == [[r(15, 19)]]
    assert layout(v, T3) == [[r(20, 21), r(22, 26), r(27, 29)]]
    assert layout(v, T4) == [[r(30, 33), r(34, 37), r(38, 41)], [r(42, 45), r(46, 49), r(50, 53)]]
    assert layout(v, T5) == [[r(54, 56), r(57, 59), r(60, 62)], [r(63, 66), r(67, 69), r(70, 73)],
                             [r(74, 75), r(76, 77)]]
    assert v.next_unassigned_rank == 78  # nodes 78..99 idle
    assert_ordered_default_all_senders(v, FIXED_TYPES[:5])
    # subgroup ids in (type order, index) order; the cross product comes last
    assert v.subgroup_ids_by_type_id == [[0], [1], [2], [3, 4], [5, 6, 7], list(range(8, 58))]
    cp = layout(v, T6)
    assert cp == cross(layout(v, T3)[0], layout(v, T1)[0])
    assert len(cp) == 10 * 5 and cp[0] == [[20, 0, 1, 2]] and cp[49] == [[29, 12, 13, 14]]
    for sg in v.subgroup_ids_by_type[T6]:
        (sv,) = v.subgroup_shard_views[sg]
        assert sv.mode is Mode.ORDERED and sv.is_sender == [True, False, False, False]
    # SubViews carry their members' addresses; this node (0) is in T1 shard 0 and 5 cross products
    assert v.subgroup_shard_views[0][0].member_ips_and_ports == [addr(0), addr(1), addr(2)]
    assert v.my_subgroups == {0: 0, **{sg: 0 for sg in range(8, 58, 5)}}


def test_2_failures_inside_subgroups(fixed):
    v1, v2 = fixed[1], fixed[2]
    assert v2.next_unassigned_rank == 78  # 73 after the five failures, + 5 refills
    assert layout(v2, T1) == [[[0, 2, 78], [4, 5, 79], r(6, 8), r(9, 11), r(12, 14)]]
    assert layout(v2, T2) == [[[15, 16, 18, 19, 80]]]
    assert layout(v2, T3) == layout(v1, T3)
    assert layout(v2, T4) == [[r(30, 33), r(34, 37), [39, 41, 81, 82]], [r(42, 45), r(46, 49), r(50, 53)]]
    assert layout(v2, T5) == layout(v1, T5)
    assert layout(v2, T6) == cross(layout(v2, T3)[0], layout(v2, T1)[0])
    assert_ordered_default_all_senders(v2, FIXED_TYPES[:5])
    t1 = v2.shard_views(T1)
    assert (t1[0].joined, t1[0].departed) == ([78], [1])
    assert (t1[2].joined, t1[2].departed) == ([], [])
    t4 = v2.shard_views(T4, 0)[2]
    assert (t4.joined, t4.departed) == ([81, 82], [38, 40])
    assert v2.shard_views(T6, 0)[0].joined == [78] and v2.shard_views(T6, 0)[0].departed == [1]


def test_3_failures_before_and_at_the_pointer(fixed):
    v2, v3 = fixed[2], fixed[3]
    leavers = [15, 23, 64, 83, 94]
    assert v3.departed == leavers
    # ranks 13, 20, 59 are below next_unassigned_rank 78, rank 78 (idle node 83) is not: 78 - 3.
    # Derecho's '<=' would give 74 and hand node 82 (T4) out again, to T2.
    assert make_next_view(v2, leavers, []).next_unassigned_rank == 75
    assert layout(v3, T1) == layout(v2, T1)
    assert layout(v3, T2) == [[[16, 18, 19, 80, 84]]]
    assert layout(v3, T3) == [[r(20, 21), [22, 24, 25, 26, 85], r(27, 29)]]
    assert layout(v3, T4) == layout(v2, T4)
    assert layout(v3, T5) == [[r(54, 56), r(57, 59), r(60, 62)], [[63, 65, 66, 86], r(67, 69), r(70, 73)],
                              [r(74, 75), r(76, 77)]]
    assert v3.next_unassigned_rank == 78
    assert layout(v3, T6) == cross(layout(v3, T3)[0], layout(v3, T1)[0])
    assert len(layout(v3, T6)) == 50
    assert_ordered_default_all_senders(v3, FIXED_TYPES[:5])


def test_4_inadequate_view(fixed):
    v4, nur_before, result = fixed[4]
    assert v4.num_members == 40  # 78 needed
    assert result == {}
    assert not v4.is_adequately_provisioned
    assert v4.next_unassigned_rank == nur_before == 39
    assert v4.subgroup_shard_views == [] and v4.subgroup_ids_by_type_id == [] and v4.my_subgroups == {}


def test_4_inadequate_view_raises_when_asked(fixed):
    v3 = fixed[3]
    info_view = make_next_view(v3, [v3.members[rank] for rank in range(39, 89)], [])
    allocator = _fixed_allocator()
    with pytest.raises(SubgroupProvisioningError, match="view 3 has 40 members but the layout needs at least 78"):
        SubgroupInfo(allocator).allocate(FIXED_TYPES, v3, info_view, raise_on_inadequate=True)
    assert info_view.next_unassigned_rank == 39 and not info_view.is_adequately_provisioned


def _fixed_allocator() -> DefaultSubgroupAllocator:
    return DefaultSubgroupAllocator({
        T1: one_subgroup_policy(fixed_even_shards(5, 3)),
        T2: one_subgroup_policy(fixed_even_shards(1, 5)),
        T3: one_subgroup_policy(custom_shards_policy([2, 5, 3], [2, 5, 3], ORD3, DEF3)),
        T4: identical_subgroups_policy(2, fixed_even_shards(3, 4)),
        T5: SubgroupAllocationPolicy(3, False, (fixed_even_shards(3, 3),
                                                custom_shards_policy([4, 3, 4], [4, 3, 4], ORD3, DEF3),
                                                fixed_even_shards(2, 2))),
        T6: CrossProductPolicy((T3, 0), (T1, 0)),
    })


def test_5_joiners_reprovision(fixed):
    v5, _, leavers4 = fixed[5]
    survivors = [0, 2, *r(4, 14), 16, *r(18, 22), *r(24, 37), 39, *r(41, 45)]
    assert v5.members == survivors + [99] + r(100, 139)
    # 39 leavers below rank 78; the 11 at ranks 78..88 were idle
    assert v5.is_adequately_provisioned
    assert layout(v5, T1) == [[[0, 2, 99], [4, 5, 100], r(6, 8), r(9, 11), r(12, 14)]]
    assert layout(v5, T2) == [[[16, 18, 19, 101, 102]]]
    assert layout(v5, T3) == [[r(20, 21), [22, 24, 25, 26, 103], r(27, 29)]]
    assert layout(v5, T4) == [[r(30, 33), r(34, 37), [39, 41, 104, 105]], [r(42, 45), r(106, 109), r(110, 113)]]
    assert layout(v5, T5) == [[r(114, 116), r(117, 119), r(120, 122)], [r(123, 126), r(127, 129), r(130, 133)],
                              [r(134, 135), r(136, 137)]]
    assert v5.next_unassigned_rank == 78  # nodes 138, 139 idle
    assert layout(v5, T6) == cross(layout(v5, T3)[0], layout(v5, T1)[0])
    assert_ordered_default_all_senders(v5, FIXED_TYPES[:5])
    assert v5.shard_views(T4, 1)[1].departed == r(46, 49) and v5.shard_views(T4, 1)[1].joined == r(106, 109)
    assert v5.subgroup_shard_views[0][0].member_ips_and_ports[2] == addr(99)


# ------------------------------------------------------------ flexible sizes
FLEX_TYPES = [T1, T2, T3, T4]


@pytest.fixture(scope="module")
def flexible():
    info = SubgroupInfo(DefaultSubgroupAllocator({
        T1: one_subgroup_policy(flexible_even_shards(5, 2, 3)),
        T2: one_subgroup_policy(custom_shards_policy([2, 5, 3], [3, 6, 5], ORD3, DEF3)),
        T3: identical_subgroups_policy(2, flexible_even_shards(3, 4, 5)),
        T4: SubgroupAllocationPolicy(3, False, (flexible_even_shards(3, 2, 4),
                                                custom_shards_policy([4, 3, 4], [5, 4, 5], ORD3, DEF3),
                                                flexible_even_shards(2, 2, 4))),
    }))
    v6 = first_view(range(100), FLEX_TYPES)
    info.allocate(FLEX_TYPES, None, v6)
    v7 = make_next_view(v6, [3, 6, 31, 45, 57], [])
    info.allocate(FLEX_TYPES, v6, v7)
    v8 = make_next_view(v7, [v7.members[rank] for rank in (7, 8, 17, 18, 40, 41, 51, 61, 62)], [])
    info.allocate(FLEX_TYPES, v7, v8)
    v9 = make_next_view(v8, [], r(100, 139))
    info.allocate(FLEX_TYPES, v8, v9)
    return {6: v6, 7: v7, 8: v8, 9: v9}


def test_6_flexible_first_view(flexible):
    v = flexible[6]
    # minimums 65; a first pass adds one node to each of the 22 shards (87), a second fills T2 shard 2
    # and the shards of T4's subgroups 0 and 2 (93), then every shard is at its maximum.
    assert layout(v, T1) == [[r(0, 2), r(3, 5), r(6, 8), r(9, 11), r(12, 14)]]
    assert layout(v, T2) == [[r(15, 17), r(18, 23), r(24, 28)]]
    assert layout(v, T3) == [[r(29, 33), r(34, 38), r(39, 43)], [r(44, 48), r(49, 53), r(54, 58)]]
    assert layout(v, T4) == [[r(59, 62), r(63, 66), r(67, 70)], [r(71, 75), r(76, 79), r(80, 84)],
                             [r(85, 88), r(89, 92)]]
    assert v.next_unassigned_rank == 93
    assert_ordered_default_all_senders(v, FLEX_TYPES)


def test_7_flexible_failures_refilled(flexible):
    v = flexible[7]
    assert v.next_unassigned_rank == 93  # 88 + 5 refills from the idle nodes 93..97
    assert layout(v, T1) == [[r(0, 2), [4, 5, 93], [7, 8, 94], r(9, 11), r(12, 14)]]
    assert layout(v, T2) == layout(flexible[6], T2)
    assert layout(v, T3) == [[[29, 30, 32, 33, 95], r(34, 38), r(39, 43)],
                             [[44, 46, 47, 48, 96], r(49, 53), [54, 55, 56, 58, 97]]]
    assert layout(v, T4) == layout(flexible[6], T4)
    assert_ordered_default_all_senders(v, FLEX_TYPES)


def test_8_flexible_shards_shrink(flexible):
    v = flexible[8]
    assert v.departed == [9, 10, 19, 20, 43, 44, 55, 66, 67]
    # 86 members, exactly what minimums and survivors need: only T1 shard 3 (below its minimum 2)
    # and T2 shard 1 (below 5) get the two idle nodes; the others keep their survivors only.
    assert layout(v, T1) == [[r(0, 2), [4, 5, 93], [7, 8, 94], [11, 98], r(12, 14)]]
    assert layout(v, T2) == [[r(15, 17), [18, 21, 22, 23, 99], r(24, 28)]]
    assert layout(v, T3) == [[[29, 30, 32, 33, 95], r(34, 38), r(39, 42)],
                             [[46, 47, 48, 96], r(49, 53), [54, 56, 58, 97]]]
    assert layout(v, T4) == [[r(59, 62), r(63, 65), r(68, 70)], [r(71, 75), r(76, 79), r(80, 84)],
                             [r(85, 88), r(89, 92)]]
    assert v.next_unassigned_rank == 86 == v.num_members
    assert_ordered_default_all_senders(v, FLEX_TYPES)


def test_9_flexible_reexpansion(flexible):
    v = flexible[9]
    assert layout(v, T1) == [[r(0, 2), [4, 5, 93], [7, 8, 94], [11, 98, 100], r(12, 14)]]
    assert layout(v, T2) == [[r(15, 17), [18, 21, 22, 23, 99, 101], r(24, 28)]]
    assert layout(v, T3) == [[[29, 30, 32, 33, 95], r(34, 38), [39, 40, 41, 42, 102]],
                             [[46, 47, 48, 96, 103], r(49, 53), [54, 56, 58, 97, 104]]]
    assert layout(v, T4) == [[r(59, 62), [63, 64, 65, 105], [68, 69, 70, 106]], [r(71, 75), r(76, 79), r(80, 84)],
                             [r(85, 88), r(89, 92)]]
    assert v.next_unassigned_rank == 93  # joiners 107..139 idle
    assert v.shard_views(T1)[3].joined == [100] and v.shard_views(T1)[3].departed == []
    assert_ordered_default_all_senders(v, FLEX_TYPES)


# ----------------------------------------------------------------- JSON layout
JSON_LAYOUT = """[
    {"type_alias": "TestType1",
     "layout": [{"min_nodes_by_shard": ["2"], "max_nodes_by_shard": ["3"],
                 "reserved_node_ids_by_shard": [["*1", "2", "3"]],
                 "delivery_modes_by_shard": ["Ordered"], "profiles_by_shard": ["Default"]}]},
    {"type_alias": "TestType2",
     "layout": [{"min_nodes_by_shard": ["2"], "max_nodes_by_shard": ["3"],
                 "reserved_node_ids_by_shard": [["2", "3", "4"]],
                 "delivery_modes_by_shard": ["Ordered"], "profiles_by_shard": ["Default"]}]}
]"""
JSON_TYPES = [T1, T2]


@pytest.fixture(scope="module")
def json_views():
    info = SubgroupInfo(DefaultSubgroupAllocator.from_json(JSON_TYPES, JSON_LAYOUT))
    v10 = first_view(range(3), JSON_TYPES)
    info.allocate(JSON_TYPES, None, v10)
    v11 = make_next_view(v10, [], [3, 4])
    info.allocate(JSON_TYPES, v10, v11)
    v12 = make_next_view(v11, [0, 2], [])
    info.allocate(JSON_TYPES, v11, v12)
    v13 = make_next_view(v12, [], [5, 6])
    info.allocate(JSON_TYPES, v12, v13)
    v14 = make_next_view(v13, [3, 5], {2: addr(2)})  # ranks 1 and 3; node 2 rejoins
    info.allocate(JSON_TYPES, v13, v14)
    return {10: v10, 11: v11, 12: v12, 13: v13, 14: v14}


def _json_check(v, t1, s1, t2, nur):
    assert v.is_adequately_provisioned
    assert layout(v, T1) == [[t1]] and senders(v, T1) == [[s1]]
    assert layout(v, T2) == [[t2]] and senders(v, T2) == [[t2]]  # no '*' marks: everyone sends
    assert v.next_unassigned_rank == nur
    for sv in all_shards(v):
        assert sv.mode is Mode.ORDERED and sv.profile == "DEFAULT"


def test_10_json_first_view_reserved_and_sender(json_views):
    # node 2 is reserved by both types (overlap); node 1 is T1's designated sender
    _json_check(json_views[10], [1, 2], [1], [2, 0], 3)


def test_11_json_reserved_nodes_join(json_views):
    # T2 grows to 4 > max 3: reserved ids may push a shard past its maximum
    _json_check(json_views[11], [1, 2, 3], [1], [2, 0, 3, 4], 5)
    assert json_views[11].shard_views(T2)[0].joined == [3, 4]


def test_12_json_shared_reserved_node_fails(json_views):
    _json_check(json_views[12], [1, 3], [1], [3, 4], 3)
    assert json_views[12].shard_views(T2)[0].departed == [2, 0]


def test_13_json_unreserved_nodes_join(json_views):
    # joiners fill both shards to their maximum; in T1 (which has a designated sender) they only receive
    _json_check(json_views[13], [1, 3, 5], [1], [3, 4, 6], 5)


def test_14_json_failures_and_reserved_node_rejoins(json_views):
    v = json_views[14]
    assert v.members == [1, 4, 6, 2]
    _json_check(v, [1, 2], [1], [4, 6, 2], 4)
    assert v.member_ips_and_ports[3] == addr(2)
