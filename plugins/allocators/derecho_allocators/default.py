"""DefaultSubgroupAllocator: Derecho's default membership function (spec §2.4), with its quirks fixed.

The algorithm, in order:

A. shard sizes: every shard starts at max(min, survivors ∪ active reserved ids);
   if the view cannot hold that, :class:`SubgroupProvisioningError`; then spare
   nodes are handed out one per shard per pass, earliest shards first, until
   every shard is at its maximum or no node is left.
B. first view: each shard takes its active reserved ids (sorted), then the next
   free members in rank order.
C. later views: each shard keeps its surviving members in their old order with
   their old sender flags (and its old mode and profile), takes back reserved
   ids that (re)joined, then fills up from the free members in rank order.
D. cross products: one single-shard subgroup per (source member, target shard).

What differs from the C++ code, and why, is in docs/allocators.md.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from derecho_core import SubgroupProvisioningError, SubView, View

from .errors import LayoutError
from .policies import CrossProductPolicy, ShardAllocationPolicy, SubgroupAllocationPolicy

if TYPE_CHECKING:
    from derecho_core import Conf

__all__ = ["DefaultSubgroupAllocator", "Policy"]

Policy = Union[SubgroupAllocationPolicy, CrossProductPolicy]
_Key = tuple[Hashable, int, int]  # (type, subgroup index, shard number)


def _name(t: Hashable) -> str:
    return getattr(t, "__qualname__", None) or str(t)


class DefaultSubgroupAllocator:
    """Allocates every type by its policy: ``DefaultSubgroupAllocator({Foo: policy, Bar: policy})``.

    ``policies_by_type`` maps each subgroup type to a
    :class:`SubgroupAllocationPolicy` or :class:`CrossProductPolicy`; the
    group's type order (the ``types`` the allocator is called with) decides the
    order of allocation. A JSON layout gives policies by position instead
    (:meth:`from_json` with ``types=None``); they are matched to the group's
    types when it runs.
    """

    def __init__(self, policies_by_type: Mapping[Hashable, Policy] | Sequence[Policy], *,
                 type_names: Sequence[str] | None = None) -> None:
        if isinstance(policies_by_type, Mapping):
            self._by_type: dict[Hashable, Policy] | None = dict(policies_by_type)
            self._positional: list[Policy] | None = None
            policies = list(self._by_type.values())
        else:
            self._by_type = None
            self._positional = list(policies_by_type)
            policies = self._positional
        for p in policies:
            if not isinstance(p, (SubgroupAllocationPolicy, CrossProductPolicy)):
                raise LayoutError(f"a policy is a SubgroupAllocationPolicy or CrossProductPolicy, got {p!r}")
        self.type_names = list(type_names) if type_names is not None else None
        # Derecho fills this only for JSON layouts; reserved ids given in Python count just the same.
        self.all_reserved_node_ids: frozenset[int] = frozenset(
            node for p in policies if isinstance(p, SubgroupAllocationPolicy)
            for sp in p.shard_policy_by_subgroup for shard in sp.reserved_node_ids_by_shard for node in shard)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_json(cls, types: Sequence[Hashable] | None, layout: str | list[Any], *,
                  source: str | None = None) -> DefaultSubgroupAllocator:
        """From a JSON layout (spec §2.3), text or already parsed; one entry per type, in type order.

        With ``types`` the policies are bound to them now (their count must
        match); with None they are matched by position when the allocator runs.
        """
        from .json_layout import parse_json_layout

        policies, aliases = parse_json_layout(layout, source=source)
        if types is None:
            return cls(policies, type_names=[a or f"type{i}" for i, a in enumerate(aliases)])
        types = list(types)
        if len(types) != len(policies):
            raise LayoutError(f"the layout has {len(policies)} entries but there are {len(types)} subgroup types "
                              f"({', '.join(_name(t) for t in types)}); give one entry per type, in type order",
                              path="layout", source=source)
        return cls(dict(zip(types, policies, strict=True)))

    @classmethod
    def from_json_file(cls, types: Sequence[Hashable] | None, path: str | os.PathLike[str]) -> DefaultSubgroupAllocator:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return cls.from_json(types, text, source=str(path))

    @classmethod
    def from_conf(cls, conf: Conf, types: Sequence[Hashable] | None = None) -> DefaultSubgroupAllocator:
        """From ``[LAYOUT] json_layout`` or ``json_layout_file`` (what the plugin's ``default`` factory does)."""
        text = conf.json_layout()
        if not text:
            raise LayoutError("the 'default' allocator needs a layout: set [LAYOUT] json_layout or json_layout_file, "
                              "or build SubgroupInfo(DefaultSubgroupAllocator({Type: policy, ...})) in code",
                              key="LAYOUT/json_layout")
        path = conf.json_layout_path()
        return cls.from_json(types, text, source=str(path) if path else "[LAYOUT] json_layout")

    @property
    def positional(self) -> bool:
        """True for a JSON layout without types: entry i serves the group's i-th type, whatever it is called."""
        return self._positional is not None

    @property
    def types(self) -> list[Hashable] | None:
        """The types the policies name (or the JSON aliases, for a positional layout)."""
        if self._by_type is not None:
            return list(self._by_type)
        return list(self.type_names) if self.type_names is not None else None

    def __repr__(self) -> str:
        if self._by_type is not None:
            return f"DefaultSubgroupAllocator({{{', '.join(_name(t) for t in self._by_type)}}})"
        return f"DefaultSubgroupAllocator(<{len(self._positional or [])} positional policies>)"

    def _resolve(self, types: Sequence[Hashable]) -> dict[Hashable, Policy]:
        if self._positional is not None:
            if len(types) != len(self._positional):
                raise LayoutError(f"the layout has {len(self._positional)} entries but the group has {len(types)} "
                                  f"subgroup types ({', '.join(_name(t) for t in types)})", path="layout")
            return dict(zip(types, self._positional, strict=True))
        assert self._by_type is not None
        missing = [_name(t) for t in types if t not in self._by_type]
        if missing:
            raise LayoutError(f"no allocation policy for type(s) {', '.join(missing)}; the policies cover "
                              f"{', '.join(_name(t) for t in self._by_type) or 'nothing'}")
        return {t: self._by_type[t] for t in types}

    # --------------------------------------------------------------- the run
    def __call__(self, types: Sequence[Hashable], prev_view: View | None, curr_view: View
                 ) -> dict[Hashable, list[list[SubView]]]:
        types = list(types)
        policies = self._resolve(types)
        standard = [(t, p) for t, p in policies.items() if isinstance(p, SubgroupAllocationPolicy)]
        member_set = set(curr_view.members)
        active_reserved = self.all_reserved_node_ids & member_set
        prev_shards = _previous_shards(types, prev_view)
        survivors: dict[_Key, list[int]] = {}
        for t, p in standard:
            for sg in range(p.num_subgroups):
                for shard in range(p.shard_policy(sg).num_shards):
                    prev = prev_shards.get((t, sg, shard))
                    survivors[(t, sg, shard)] = [m for m in prev.members if m in member_set] if prev else []
        sizes = self._shard_sizes(standard, survivors, member_set, active_reserved, curr_view)
        allocation: dict[Hashable, list[list[SubView]]] = {}
        taken = set(active_reserved)
        for nodes in survivors.values():
            taken.update(nodes)
        if prev_view is None:
            # First view: hand out members from next_unassigned_rank on (0 for a fresh group).
            pool = [m for m in curr_view.members[curr_view.next_unassigned_rank:] if m not in taken]
        else:
            # Later view: every member that holds no shard and is reserved for none, in rank order.
            # Without reserved ids this is exactly members[next_unassigned_rank:] (survivors hold
            # the ranks below it, spec §3.6); with them it stays right where Derecho's re-ordering
            # did not (QUIRK §2.4 C).
            pool = [m for m in curr_view.members if m not in taken]
        pool.reverse()  # pop() from the end = take in rank order
        assigned_ranks = [-1]
        for t, p in standard:
            layout = []
            for sg in range(p.num_subgroups):
                sp = p.shard_policy(sg)
                shards = []
                for shard in range(sp.num_shards):
                    sv = _fill_shard(curr_view, sp, shard, prev_shards.get((t, sg, shard)),
                                     survivors[(t, sg, shard)], sizes[(t, sg, shard)], member_set, pool)
                    assigned_ranks.extend(curr_view.rank_of(m) for m in sv.members)
                    shards.append(sv)
                layout.append(shards)
            allocation[t] = layout
        # Every rank at or past next_unassigned_rank is idle (what make_next_view relies on).
        curr_view.next_unassigned_rank = max(curr_view.next_unassigned_rank, max(assigned_ranks) + 1)
        for t, p in policies.items():
            if isinstance(p, CrossProductPolicy):
                allocation[t] = _cross_product(t, p, policies, allocation, curr_view)
        return {t: allocation[t] for t in types}

    def _shard_sizes(self, standard: list[tuple[Hashable, SubgroupAllocationPolicy]],
                     survivors: dict[_Key, list[int]], member_set: set[int], active_reserved: set[int],
                     curr_view: View) -> dict[_Key, int]:
        """Step A of spec §2.4."""
        n = curr_view.num_members
        nodes_needed = len(active_reserved)  # a reserved node counts once however many shards reserve it
        sizes: dict[_Key, int] = {}
        maxima: dict[_Key, int] = {}
        for t, p in standard:
            for sg in range(p.num_subgroups):
                sp = p.shard_policy(sg)
                for shard in range(sp.num_shards):
                    key = (t, sg, shard)
                    active = sp.reserved(shard) & member_set
                    inherent = set(survivors[key]) | active
                    nodes_needed += len(inherent) - len(active)
                    minimum = sp.min_size(shard)
                    if len(inherent) >= minimum:
                        sizes[key] = len(inherent)  # may exceed the maximum: accepted, as in Derecho
                    else:
                        sizes[key] = minimum
                        nodes_needed += minimum - len(inherent)
                    maxima[key] = sp.max_size(shard)
        if nodes_needed > n:
            raise SubgroupProvisioningError(
                f"view {curr_view.vid} has {n} members but the layout needs at least {nodes_needed} "
                "(shard minimums, survivors and reserved nodes)")
        # One node per shard per pass, earliest shards first.
        while nodes_needed < n:
            all_at_max = True
            for key in sizes:  # insertion order = type, subgroup, shard order
                if nodes_needed >= n:
                    break
                if sizes[key] < maxima[key]:
                    sizes[key] += 1
                    nodes_needed += 1
                # '<', not Derecho's '== max': a shard pushed past its maximum by survivors or
                # reserved ids would otherwise keep the loop going for ever.
                if sizes[key] < maxima[key]:
                    all_at_max = False
            if all_at_max:
                break
        return sizes


def _previous_shards(types: list[Hashable], prev_view: View | None) -> dict[_Key, SubView]:
    if prev_view is None:
        return {}
    order = prev_view.subgroup_type_order or types  # a decoded view may not know its types
    out: dict[_Key, SubView] = {}
    for t, ids in zip(order, prev_view.subgroup_ids_by_type_id, strict=False):
        for index, sg_id in enumerate(ids):
            for shard, sv in enumerate(prev_view.subgroup_shard_views[sg_id]):
                out[(t, index, shard)] = sv
    return out


def _fill_shard(view: View, sp: ShardAllocationPolicy, shard: int, prev: SubView | None, survivors: list[int],
                size: int, member_set: set[int], pool: list[int]) -> SubView:
    """Steps B and C of spec §2.4 for one shard."""
    reserved = sp.reserved(shard) & member_set
    senders = sp.senders(shard)
    if prev is None:
        members = sorted(reserved)
        flags = [m in senders if senders else True for m in members]
        mode, profile = sp.mode(shard), sp.profile(shard)
    else:
        members = list(survivors)
        flags = [prev.is_sender[prev.rank_of(m)] for m in members]
        # Reserved ids that (re)joined; one already in the shard is not added twice.
        for m in sorted(reserved - set(members)):
            members.append(m)
            flags.append(m in senders if senders else True)
        mode, profile = prev.mode, prev.profile  # inherited, not re-read from the policy (spec §2.4 C)
    while len(members) < size:
        if not pool:  # only when a first view started past next_unassigned_rank = 0
            raise SubgroupProvisioningError(f"view {view.vid} has no free member left for a shard")
        members.append(pool.pop())
        flags.append(not senders)  # a shard with designated senders gets receivers only
    return view.make_subview(members, mode, flags, profile)


def _cross_product(t: Hashable, p: CrossProductPolicy, policies: dict[Hashable, Policy],
                   allocation: dict[Hashable, list[list[SubView]]], view: View) -> list[list[SubView]]:
    """Step D of spec §2.4: subgroup i*t+j = [source member i] + target shard j; only the source member sends."""
    for role, (st, index) in (("source", p.source_subgroup), ("target", p.target_subgroup)):
        if not isinstance(policies.get(st), SubgroupAllocationPolicy):
            raise LayoutError(f"cross product {_name(t)}: its {role} type {_name(st)} is not a group type "
                              "allocated by a SubgroupAllocationPolicy")
        if not 0 <= index < len(allocation[st]):
            raise LayoutError(f"cross product {_name(t)}: {_name(st)} has no subgroup {index} "
                              f"(it has {len(allocation[st])})")
    source = [m for sv in allocation[p.source_subgroup[0]][p.source_subgroup[1]] for m in sv.members]
    targets = allocation[p.target_subgroup[0]][p.target_subgroup[1]]
    out: list[list[SubView]] = []
    for s in source:
        for target in targets:
            # A source node that is also in the target shard appears once (Derecho would list it twice).
            members = [s] + [m for m in target.members if m != s]
            out.append([view.make_subview(members, "ORDERED", [True] + [False] * (len(members) - 1))])
    return out
