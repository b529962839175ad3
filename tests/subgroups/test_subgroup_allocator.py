"""DefaultSubgroupAllocator: spec §2.6 worked examples, each policy helper, reserved ids and senders, the quirk fixes."""

from __future__ import annotations

import derecho_allocators
import pytest
from derecho_allocators import (
    CrossProductPolicy,
    DefaultSubgroupAllocator,
    LayoutError,
    SubgroupAllocationPolicy,
    custom_shard_policy,
    custom_shards_policy,
    even_sharding_policy,
    fixed_even_shards,
    flexible_even_shards,
    identical_subgroups_policy,
    one_subgroup_entire_view,
    one_subgroup_entire_view_raw,
    one_subgroup_policy,
    raw_fixed_even_shards,
)
from subgroup_helpers import first_view, layout

from derecho_core import Conf, ConfigError, Mode, SubgroupInfo, View, make_next_view


class Foo: ...
class Bar: ...


def allocate(policies, members, prev=None, view=None):
    types = list(policies)
    view = view or first_view(members, types)
    SubgroupInfo(DefaultSubgroupAllocator(policies)).allocate(types, prev, view)
    return view


def test_exports_match_design():
    for name in ["DefaultSubgroupAllocator", "one_subgroup_policy", "identical_subgroups_policy",
                 "fixed_even_shards", "flexible_even_shards", "custom_shards_policy", "raw_fixed_even_shards",
                 "even_sharding_policy", "one_subgroup_entire_view", "CrossProductPolicy",
                 "ShardAllocationPolicy", "SubgroupAllocationPolicy", "custom_shard_policy",
                 "one_subgroup_entire_view_raw", "parse_json_layout"]:
        assert name in derecho_allocators.__all__ and hasattr(derecho_allocators, name)


# ------------------------------------------------------------ spec §2.6
def test_worked_example_fixed_then_failure():
    policies = {Foo: one_subgroup_policy(fixed_even_shards(1, 3)), Bar: one_subgroup_policy(fixed_even_shards(1, 3))}
    v0 = allocate(policies, range(7))
    assert layout(v0, Foo) == [[[0, 1, 2]]] and layout(v0, Bar) == [[[3, 4, 5]]]
    assert v0.next_unassigned_rank == 6  # node 6 idle
    v1 = make_next_view(v0, [1], [])
    assert v1.members == [0, 2, 3, 4, 5, 6] and v1.next_unassigned_rank == 5
    allocate(policies, None, v0, v1)
    assert layout(v1, Foo) == [[[0, 2, 6]]] and layout(v1, Bar) == [[[3, 4, 5]]]
    assert v1.next_unassigned_rank == 6
    assert all(sv.is_sender == [True] * 3 and sv.mode is Mode.ORDERED for sv in v1.subgroup_shard_views[0])


def test_worked_example_flexible_growth_earliest_shard_first():
    v = allocate({Foo: one_subgroup_policy(flexible_even_shards(2, 2, 3))}, range(5))
    assert layout(v, Foo) == [[[0, 1, 2], [3, 4]]]
    assert v.next_unassigned_rank == 5


def test_guide_example_default_allocator():
    v = allocate({Foo: one_subgroup_policy(even_sharding_policy(2, 3)),
                  Bar: identical_subgroups_policy(2, even_sharding_policy(1, 3))}, range(12))
    assert layout(v, Foo) == [[[0, 1, 2], [3, 4, 5]]]
    assert layout(v, Bar) == [[[6, 7, 8]], [[9, 10, 11]]]
    assert v.subgroup_ids_by_type == {Foo: [0], Bar: [1, 2]}


# --------------------------------------------------------------- policies
def test_policy_helpers_fields():
    assert even_sharding_policy(2, 3) == fixed_even_shards(2, 3)
    p = raw_fixed_even_shards(2, 2, "large")
    assert (p.num_shards, p.even_shards, p.min_nodes_per_shard, p.max_nodes_per_shard, p.shards_mode,
            p.shards_profile) == (2, True, 2, 2, Mode.UNORDERED, "LARGE")
    c = custom_shards_policy([1, 2], [2, 3], ["Raw", "Ordered"], ["a", "b"])
    assert (c.num_shards, c.even_shards, c.min_num_nodes_by_shard, c.max_num_nodes_by_shard, c.modes_by_shard,
            c.profiles_by_shard) == (2, False, (1, 2), (2, 3), (Mode.UNORDERED, Mode.ORDERED), ("A", "B"))
    assert one_subgroup_policy(p) == SubgroupAllocationPolicy(1, True, (p,))
    assert identical_subgroups_policy(3, p).shard_policy(2) is p


def test_raw_mode_and_profiles_reach_subviews_and_are_inherited():
    policies = {Foo: one_subgroup_policy(raw_fixed_even_shards(1, 2, "large")),
                Bar: one_subgroup_policy(custom_shards_policy([1, 1], [1, 1], [Mode.ORDERED, "Raw"], ["x", "y"]))}
    v0 = allocate(policies, range(5))
    foo, = v0.shard_views(Foo)
    assert (foo.members, foo.mode, foo.profile) == ([0, 1], Mode.UNORDERED, "LARGE")
    assert [(s.members, s.mode, s.profile) for s in v0.shard_views(Bar)] == [([2], Mode.ORDERED, "X"),
                                                                             ([3], Mode.UNORDERED, "Y")]
    # a later view copies mode and profile from the previous SubView, not from the policy
    v0.subgroup_shard_views[0][0].profile = "CHANGED"
    v1 = make_next_view(v0, [0], [])
    allocate(policies, None, v0, v1)
    assert v1.shard_views(Foo)[0].members == [1, 4] and v1.shard_views(Foo)[0].profile == "CHANGED"


def test_flexible_and_custom_from_profiles():
    conf = Conf.load(overrides={"SUBGROUP/VCS/num_shards": 2, "SUBGROUP/VCS/min_nodes": 1,
                                "SUBGROUP/VCS/max_nodes": 3, "SUBGROUP/SMALL/min_nodes": 1,
                                "SUBGROUP/SMALL/max_nodes": 2})
    assert flexible_even_shards("VCS", conf=conf) == flexible_even_shards(2, 1, 3, "VCS")
    p = custom_shard_policy([Mode.ORDERED, "Raw"], ["VCS", "small"], conf=conf)
    assert (p.min_num_nodes_by_shard, p.max_num_nodes_by_shard, p.profiles_by_shard) == ((1, 1), (3, 2),
                                                                                        ("VCS", "SMALL"))
    v = allocate({Foo: one_subgroup_policy(p)}, range(4))
    assert layout(v, Foo) == [[[0, 1], [2, 3]]]  # one node per shard per pass


def test_profile_policy_missing_key_is_a_config_error():
    conf = Conf.load(overrides={"SUBGROUP/VCS/num_shards": 2, "SUBGROUP/VCS/min_nodes": 1})
    with pytest.raises(ConfigError, match="SUBGROUP/VCS/max_nodes"):
        flexible_even_shards("VCS", conf=conf)
    with pytest.raises(ConfigError, match="SUBGROUP/OTHER/min_nodes"):
        custom_shard_policy(["Ordered"], ["other"], conf=conf)


@pytest.mark.parametrize("build, message", [
    (lambda: flexible_even_shards(2, 3, 2), "min_nodes_per_shard .3. is larger"),
    (lambda: custom_shards_policy([1, 2], [1]), "max_num_nodes_by_shard has 1 entries for 2 shards"),
    (lambda: custom_shards_policy([1], [1], ["Sideways"]), "unknown delivery mode"),
    (lambda: custom_shards_policy([1, 1, 1], [2, 2, 2], reserved_node_ids_by_shard=[{1}, {2}, {2, 3}]),
     r"shards 1 and 2 of one subgroup both reserve node\(s\) \[2\]"),
    (lambda: custom_shards_policy([1], [1], reserved_node_ids_by_shard=[{1}], reserved_sender_ids_by_shard=[{2}]),
     "designated senders .2. are not reserved"),
    (lambda: SubgroupAllocationPolicy(2, False, (fixed_even_shards(1, 1),)), "2 subgroups but 1 shard policies"),
    (lambda: DefaultSubgroupAllocator({Foo: fixed_even_shards(1, 1)}), "SubgroupAllocationPolicy or Cross"),
])
def test_bad_policies_fail_where_written(build, message):
    with pytest.raises(LayoutError, match=message):
        build()


def test_missing_type_policy_is_named():
    info = SubgroupInfo(DefaultSubgroupAllocator({Foo: one_subgroup_policy(fixed_even_shards(1, 1))}))
    with pytest.raises(LayoutError, match="no allocation policy for type.*Bar"):
        info.allocate([Foo, Bar], None, View(0, range(3)))


# ------------------------------------------------- reserved ids and senders
def test_reserved_ids_designated_senders_joins_and_failures():
    reserved = custom_shards_policy([2], [3], reserved_node_ids_by_shard=[{5, 7}], reserved_sender_ids_by_shard=[{7}])
    policies = {Foo: one_subgroup_policy(reserved), Bar: one_subgroup_policy(fixed_even_shards(1, 2))}
    v0 = allocate(policies, [0, 1, 5, 2, 3])  # designated sender 7 is not a member yet
    # Foo: reserved 5 first, then free members in rank order; growth gives Foo its third node
    assert layout(v0, Foo) == [[[5, 0, 1]]] and layout(v0, Bar) == [[[2, 3]]]
    assert v0.shard_views(Foo)[0].is_sender == [False, False, False]  # only 7 may send
    assert v0.next_unassigned_rank == 5
    v1 = make_next_view(v0, [], [7])
    allocate(policies, None, v0, v1)
    # 7 takes its reserved place and sends; Foo holds 4 > max 3 (survivors + reserved: accepted)
    assert layout(v1, Foo) == [[[5, 0, 1, 7]]] and v1.shard_views(Foo)[0].senders == [7]
    assert layout(v1, Bar) == [[[2, 3]]] and v1.next_unassigned_rank == 6
    v2 = make_next_view(v1, [0], [])
    allocate(policies, None, v1, v2)
    assert layout(v2, Foo) == [[[5, 1, 7]]] and v2.shard_views(Foo)[0].is_sender == [False, False, True]
    assert v2.shard_views(Foo)[0].sender_rank_of(2) == 0 and v2.shard_views(Foo)[0].sender_rank_of(0) == -1
    v3 = make_next_view(v2, [1], [8])
    allocate(policies, None, v2, v3)
    # survivors keep their flags; a node filled into a shard with designated senders only receives
    assert layout(v3, Foo) == [[[5, 7, 8]]] and v3.shard_views(Foo)[0].is_sender == [False, True, False]
    assert v3.next_unassigned_rank == 5


def test_identical_subgroups_share_reserved_ids():
    # every subgroup of an identical policy gets the reserved node (Derecho indexed the policy list by
    # subgroup number here and read past its end)
    p = custom_shards_policy([2], [2], reserved_node_ids_by_shard=[{9}])
    v = allocate({Foo: identical_subgroups_policy(3, p)}, [0, 1, 2, 9])
    assert layout(v, Foo) == [[[9, 0]], [[9, 1]], [[9, 2]]]


# ------------------------------------------------------------ quirk fixes
def test_reserved_node_at_high_rank_is_not_handed_out_twice():
    """QUIRK §2.4 C: Derecho fills from curr_view.members after re-ordering reserved ids first.

    Derecho: first view Foo=[3], Bar=[0], next_unassigned_rank 2 counted in its re-ordered list
    [3, 0, 1, 2]; after node 0 fails it takes idle node 1 for a survivor, re-adds 3 to Foo and
    fills Bar from members[2] = 3: Foo=[3, 3], Bar=[3].
    """
    policies = {Foo: one_subgroup_policy(custom_shards_policy([1], [1], reserved_node_ids_by_shard=[{3}])),
                Bar: one_subgroup_policy(fixed_even_shards(1, 1))}
    v0 = allocate(policies, [0, 1, 2, 3])
    assert layout(v0, Foo) == [[[3]]] and layout(v0, Bar) == [[[0]]]
    assert v0.next_unassigned_rank == 4  # every rank >= it is idle; 1 and 2 idle below it
    v1 = make_next_view(v0, [0], [])
    allocate(policies, None, v0, v1)
    assert layout(v1, Foo) == [[[3]]] and layout(v1, Bar) == [[[1]]]
    assert v1.next_unassigned_rank == 3


@pytest.mark.timeout(10)
def test_growth_stops_when_reserved_ids_push_a_shard_past_max():
    """Derecho's growth loop tests '== max': a shard above max keeps it spinning while nodes are spare."""
    policies = {Foo: one_subgroup_policy(custom_shards_policy([1], [2], reserved_node_ids_by_shard=[{0, 1, 2}])),
                Bar: one_subgroup_policy(fixed_even_shards(1, 1))}
    v = allocate(policies, range(5))
    assert layout(v, Foo) == [[[0, 1, 2]]] and layout(v, Bar) == [[[3]]]
    assert v.next_unassigned_rank == 4


def test_make_next_view_pointer_uses_strict_less_than():
    v0 = allocate({Foo: one_subgroup_policy(fixed_even_shards(1, 2))}, range(4))
    assert v0.next_unassigned_rank == 2
    # node 2 sits exactly at rank 2 = next_unassigned_rank and is idle: the pointer must not move
    v1 = make_next_view(v0, [2], [])
    assert v1.next_unassigned_rank == 2
    v1b = make_next_view(v0, [1], [])
    assert v1b.next_unassigned_rank == 1
    allocate({Foo: one_subgroup_policy(fixed_even_shards(1, 2))}, None, v0, v1b)
    assert layout(v1b, Foo) == [[[0, 2]]]


# ----------------------------------------------------------- cross product
def test_cross_product_source_in_target_listed_once():
    policies = {Foo: one_subgroup_policy(custom_shards_policy([1], [1], reserved_node_ids_by_shard=[{0}])),
                Bar: one_subgroup_policy(custom_shards_policy([2], [2], reserved_node_ids_by_shard=[{0}])),
                "X": CrossProductPolicy((Foo, 0), (Bar, 0))}
    v = allocate(policies, [0, 1, 2])
    assert layout(v, Foo) == [[[0]]] and layout(v, Bar) == [[[0, 1]]]
    assert layout(v, "X") == [[[0, 1]]] and v.shard_views("X")[0].is_sender == [True, False]


def test_cross_product_grows_and_new_subgroups_all_joined():
    policies = {Foo: one_subgroup_policy(flexible_even_shards(1, 1, 2)),
                Bar: one_subgroup_policy(fixed_even_shards(1, 1)),
                "X": CrossProductPolicy((Foo, 0), (Bar, 0))}
    v0 = allocate(policies, [0, 1])
    assert layout(v0, "X") == [[[0, 1]]]
    v1 = make_next_view(v0, [], [2])
    allocate(policies, None, v0, v1)
    assert layout(v1, Foo) == [[[0, 2]]] and layout(v1, "X") == [[[0, 1]], [[2, 1]]]
    new = v1.shard_views("X", 1)[0]
    assert (new.joined, new.departed) == ([2, 1], [])


@pytest.mark.parametrize("policy, message", [
    (CrossProductPolicy((Bar, 0), (Foo, 0)), "source type Bar is not a group type"),
    (CrossProductPolicy((Foo, 0), (Foo, 1)), "Foo has no subgroup 1"),
])
def test_cross_product_errors(policy, message):
    info = SubgroupInfo(DefaultSubgroupAllocator({Foo: one_subgroup_policy(fixed_even_shards(1, 1)), "X": policy}))
    with pytest.raises(LayoutError, match=message):
        info.allocate([Foo, "X"], None, View(0, range(2)))


# ---------------------------------------------------------- entire view
def test_one_subgroup_entire_view_and_raw():
    v = View(0, [4, 2, 9])
    SubgroupInfo(one_subgroup_entire_view).allocate([Foo, Bar], None, v)
    assert layout(v, Foo) == [[[4, 2, 9]]] and layout(v, Bar) == [[[4, 2, 9]]]
    assert v.next_unassigned_rank == 3 and v.shard_views(Foo)[0].mode is Mode.ORDERED
    w = View(0, [4, 2, 9])
    SubgroupInfo(one_subgroup_entire_view_raw).allocate([Foo], None, w)
    assert w.shard_views(Foo)[0].mode is Mode.UNORDERED and w.shard_views(Foo)[0].senders == [4, 2, 9]


def test_first_view_starting_past_rank_zero():
    view = View(0, range(6), next_unassigned_rank=2)  # ranks 0, 1 taken by something else
    SubgroupInfo(DefaultSubgroupAllocator({Foo: one_subgroup_policy(fixed_even_shards(1, 3))})).allocate(
        [Foo], None, view)
    assert layout(view, Foo) == [[[2, 3, 4]]] and view.next_unassigned_rank == 5
