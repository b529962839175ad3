"""An allocator plugin: every subgroup type gets one subgroup of one shard holding every member.

Select it with ``[LAYOUT] allocator = one_shard``.
"""

from __future__ import annotations

from typing import Any

from derecho_core import hookimpl


def one_shard_allocator(types: list[type], prev_view: Any, curr_view: Any) -> dict[type, list[list[Any]]]:
    """One shard of all members, ordered mode, everyone a sender, for every type."""
    from derecho_core import SubView

    members = list(curr_view.members)
    curr_view.next_unassigned_rank = len(members)
    return {t: [[SubView(members)]] for t in types}


def make_allocator(conf: Any) -> Any:
    return one_shard_allocator


@hookimpl
def derecho_register_allocators(register):
    register("one_shard", make_allocator)
