"""Shared helpers of the subgroup tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from derecho_core import IpAndPorts, Mode, SubgroupInfo, SubView, View


def r(first: int, last: int) -> list[int]:
    """Inclusive range, to write expected shards as r(20, 29)."""
    return list(range(first, last + 1))


def addr(node: int) -> IpAndPorts:
    # Like the C++ tester's generator: one distinct address per node.
    return IpAndPorts(f"192.168.1.{node}", 35465, 35466, 35467, 35468, 35469)


def first_view(members: Iterable[int], types: Iterable[Hashable] = ()) -> View:
    members = list(members)
    return View(0, members, member_ips_and_ports=[addr(m) for m in members], my_id=members[0],
                subgroup_type_order=types)


def layout(view: View, t: Hashable) -> list[list[list[int]]]:
    """Members of every shard of every subgroup of type t: [[shard members per shard] per subgroup]."""
    return [[list(sv.members) for sv in view.subgroup_shard_views[sg]]
            for sg in view.subgroup_ids_by_type[t]]


def senders(view: View, t: Hashable) -> list[list[list[int]]]:
    return [[sv.senders for sv in view.subgroup_shard_views[sg]] for sg in view.subgroup_ids_by_type[t]]


def all_shards(view: View) -> list[SubView]:
    return [sv for shards in view.subgroup_shard_views for sv in shards]


def assert_ordered_default_all_senders(view: View, types: Iterable[Hashable]) -> None:
    for t in types:
        for sg in view.subgroup_ids_by_type[t]:
            for sv in view.subgroup_shard_views[sg]:
                assert sv.mode is Mode.ORDERED
                assert sv.profile == "DEFAULT"
                assert all(sv.is_sender), (t, sv)


def run(info: SubgroupInfo, types: list[Hashable], prev: View | None, curr: View) -> View:
    info.allocate(types, prev, curr)
    return curr
