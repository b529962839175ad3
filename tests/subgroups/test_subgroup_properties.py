"""Hypothesis properties of the default allocator over random policies and random failure/join sequences.

Checked after every view change (issue 5, acceptance 2):
* no node twice within one subgroup (and, without reserved ids, none in two shards at all);
* survivors keep their shard and their order (and their sender flags, mode and profile);
* every shard size is within [min, max] (or above max only through survivors and reserved ids),
  or the allocator raises SubgroupProvisioningError;
* a provisioning error leaves the view untouched (next_unassigned_rank, no allocation);
* every rank at or past next_unassigned_rank is idle (what make_next_view relies on);
* the view survives to_bytes/from_bytes unchanged.
"""

from __future__ import annotations

from derecho_allocators import (
    DefaultSubgroupAllocator,
    SubgroupAllocationPolicy,
    custom_shards_policy,
    flexible_even_shards,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from derecho_core import Mode, SubgroupInfo, SubgroupProvisioningError, View, make_next_view

MAX_NODE = 40
PROFILES = ["DEFAULT", "LARGE"]


@st.composite
def shard_policies(draw, reserved_pool: list[int] | None):
    n = draw(st.integers(1, 3))
    if draw(st.booleans()) and not reserved_pool:
        lo = draw(st.integers(1, 3))
        return flexible_even_shards(n, lo, lo + draw(st.integers(0, 2)), draw(st.sampled_from(PROFILES)))
    mins = [draw(st.integers(1, 3)) for _ in range(n)]
    maxs = [m + draw(st.integers(0, 2)) for m in mins]
    modes = [draw(st.sampled_from([Mode.ORDERED, Mode.UNORDERED])) for _ in range(n)]
    reserved = senders = None
    if reserved_pool:
        # disjoint reservations within the subgroup; the same ids may recur in other subgroups (overlap)
        ids = draw(st.permutations(reserved_pool))
        cuts = sorted(draw(st.lists(st.integers(0, len(ids)), min_size=n - 1, max_size=n - 1)))
        parts = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        reserved = [set(p) for p in parts]
        senders = [set(p[:draw(st.integers(0, len(p)))]) for p in parts]
    return custom_shards_policy(mins, maxs, modes, [draw(st.sampled_from(PROFILES)) for _ in range(n)],
                                reserved_node_ids_by_shard=reserved, reserved_sender_ids_by_shard=senders)


@st.composite
def layouts(draw):
    with_reserved = draw(st.booleans())
    types = [f"T{i}" for i in range(draw(st.integers(1, 3)))]
    policies = {}
    for t in types:
        num = draw(st.integers(1, 2))
        pool = draw(st.lists(st.integers(0, MAX_NODE), min_size=1, max_size=4, unique=True)) \
            if with_reserved and draw(st.booleans()) else None
        if draw(st.booleans()):
            policies[t] = SubgroupAllocationPolicy(num, True, (draw(shard_policies(pool)),))
        else:
            policies[t] = SubgroupAllocationPolicy(num, False, tuple(draw(shard_policies(pool)) for _ in range(num)))
    return types, policies


@st.composite
def histories(draw):
    """A first membership and a list of (failure count, joiners) steps."""
    first = draw(st.lists(st.integers(0, MAX_NODE), min_size=1, max_size=20, unique=True))
    steps = [(draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(draw(st.integers(1, 6)))]
    return first, steps, draw(st.randoms(use_true_random=False))


def shard_keys(types, policies):
    for t in types:
        p = policies[t]
        for sg in range(p.num_subgroups):
            sp = p.shard_policy(sg)
            for shard in range(sp.num_shards):
                yield t, sg, shard, sp


def check_view(types, policies, prev: View | None, view: View) -> None:
    reserved_any = any(sp.reserved_node_ids_by_shard for *_, sp in shard_keys(types, policies))
    seen_anywhere: set[int] = set()
    for t in types:
        for sg, sg_id in enumerate(view.subgroup_ids_by_type[t]):
            in_subgroup: list[int] = []
            for shard, sv in enumerate(view.subgroup_shard_views[sg_id]):
                in_subgroup.extend(sv.members)
                sp = policies[t].shard_policy(sg)
                assert len(sv.members) >= sp.min_size(shard)
                active_reserved = sp.reserved(shard) & set(view.members)
                assert active_reserved <= set(sv.members)  # reserved nodes always hold their shard
                prev_sv = prev.shard_views(t, sg)[shard] if prev is not None else None
                survivors = [m for m in prev_sv.members if m in set(view.members)] if prev_sv else []
                if len(sv.members) > sp.max_size(shard):
                    assert len(sv.members) == len(set(survivors) | active_reserved)
                if prev_sv is not None:
                    # survivors first, in their old order, with their old flags, mode and profile
                    assert sv.members[:len(survivors)] == survivors
                    assert sv.is_sender[:len(survivors)] == [prev_sv.is_sender[prev_sv.rank_of(m)]
                                                             for m in survivors]
                    assert (sv.mode, sv.profile) == (prev_sv.mode, prev_sv.profile)
                else:
                    assert (sv.mode, sv.profile) == (sp.mode(shard), sp.profile(shard))
                if sp.senders(shard):
                    assert set(sv.senders) <= sp.senders(shard)
            assert len(in_subgroup) == len(set(in_subgroup)), f"{t}[{sg}] holds a node twice: {in_subgroup}"
            if not reserved_any:
                assert not seen_anywhere & set(in_subgroup), "a node in two subgroups without reservations"
                seen_anywhere.update(in_subgroup)
    assigned = {m for shards in view.subgroup_shard_views for sv in shards for m in sv.members}
    assert all(m not in assigned for m in view.members[view.next_unassigned_rank:])
    if not reserved_any:
        # without reservations the assigned nodes are exactly the ranks below next_unassigned_rank
        assert set(view.members[:view.next_unassigned_rank]) == assigned
    again = View.from_bytes(view.to_bytes(), subgroup_type_order=types, my_id=view.my_id)
    assert again == view


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), histories())
def test_random_layouts_and_histories(layout, history):
    types, policies = layout
    first, steps, rnd = history
    info = SubgroupInfo(DefaultSubgroupAllocator(policies))
    installed: View | None = None
    view = View(0, first, my_id=first[0])
    next_id = MAX_NODE + 1
    for step in [None, *steps]:
        if step is not None:
            fails, joins = step
            leavers = rnd.sample(view.members, min(fails, view.num_members - 1))
            joiners = list(range(next_id, next_id + joins))
            if rnd.random() < 0.3:  # a reserved or earlier id (re)joins
                back = [n for n in range(MAX_NODE + 1) if n not in view.members and n not in joiners]
                joiners += rnd.sample(back, min(1, len(back)))
            next_id += joins
            view = make_next_view(view, leavers, joiners)
        before = (view.next_unassigned_rank, view.to_bytes())
        try:
            info.allocate(types, installed, view, raise_on_inadequate=True)
        except SubgroupProvisioningError:
            assert not view.is_adequately_provisioned
            assert (view.next_unassigned_rank, view.to_bytes()) == before  # untouched
            event("inadequate view")
            continue
        event("adequate later view" if installed is not None else "adequate first view")
        check_view(types, policies, installed, view)
        installed = view  # only adequate views are installed


@settings(max_examples=100, deadline=None)
@given(layouts(), st.lists(st.integers(0, MAX_NODE), min_size=1, max_size=25, unique=True))
def test_first_view_sizes_or_error(layout, members):
    """Sizes within [min, max] unless reserved ids push them up; otherwise exactly a provisioning error."""
    types, policies = layout
    view = View(0, members)
    mins = sum(sp.min_size(shard) for *_, shard, sp in shard_keys(types, policies))
    reserved_any = any(sp.reserved_node_ids_by_shard for *_, sp in shard_keys(types, policies))
    try:
        SubgroupInfo(DefaultSubgroupAllocator(policies)).allocate(types, None, view, raise_on_inadequate=True)
    except SubgroupProvisioningError:
        if not reserved_any:
            assert mins > len(members)
        assert view.next_unassigned_rank == 0 and view.subgroup_shard_views == []
        return
    if not reserved_any:
        assert mins <= len(members)
        for t, sg, shard, sp in shard_keys(types, policies):
            size = len(view.shard_views(t, sg)[shard].members)
            assert sp.min_size(shard) <= size <= sp.max_size(shard)
        # spare nodes are only left idle when every shard is full
        idle = view.num_members - view.next_unassigned_rank
        if idle:
            assert all(len(view.shard_views(t, sg)[shard].members) == sp.max_size(shard)
                       for t, sg, shard, sp in shard_keys(types, policies))
    check_view(types, policies, None, view)
