"""The user guide's custom membership function as an allocator plugin named ``guide``.

An allocator is a callable ``(types, prev_view, curr_view)`` returning
``{type: [[SubView per shard] per subgroup]}``. It may advance
``curr_view.next_unassigned_rank`` (the first rank it left idle) and raises
``SubgroupProvisioningError`` when the view is too small: the group then waits
for more members before it installs a view.

Types are matched by name (a class named ``Foo`` or the string ``"Foo"``), so
the same allocator serves a group and ``derecho layout --types Foo,Bar,Cache``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from derecho_core import SubgroupProvisioningError, SubView, View, hookimpl

__all__ = ["guide_allocator", "make_allocator"]


def _name(t: Hashable) -> str:
    return getattr(t, "__name__", None) or str(t)


def guide_allocator(types: Sequence[Hashable], prev_view: View | None,
                    curr_view: View) -> dict[Hashable, list[list[SubView]]]:
    """Foo and Bar: one shard of the first 3 members; anything else (Cache): the next 3."""
    allocation: dict[Hashable, list[list[SubView]]] = {}
    for t in types:
        if _name(t) in ("Foo", "Bar"):
            if curr_view.num_members < 3:  # must have at least 3 nodes in the top-level group
                raise SubgroupProvisioningError(f"{_name(t)} needs 3 members; view {curr_view.vid} has "
                                                f"{curr_view.num_members}")
            shard = curr_view.make_subview(curr_view.members[0:3])
            # Foo and Bar overlap on the same three nodes: ranks 0..2 are taken.
            curr_view.next_unassigned_rank = max(curr_view.next_unassigned_rank, 3)
        else:
            if curr_view.num_members < 6:  # must have at least 6 nodes in the top-level group
                raise SubgroupProvisioningError(f"{_name(t)} needs 6 members; view {curr_view.vid} has "
                                                f"{curr_view.num_members}")
            shard = curr_view.make_subview(curr_view.members[3:6])
            # The guide writes `next_unassigned_rank += 3`, which overshoots the member count
            # once a later view already starts past rank 3; ranks 0..5 are taken, say so.
            curr_view.next_unassigned_rank = max(curr_view.next_unassigned_rank, 6)
        allocation[t] = [[shard]]  # one subgroup with one shard
    return allocation


def make_allocator(conf: Any) -> Any:
    """The factory the plugin registers: receives the node's Conf, returns the allocator."""
    return guide_allocator


@hookimpl
def derecho_register_allocators(register: Any) -> None:
    register("guide", make_allocator)
