"""The two ready-made allocators that need no policy: every type gets the whole view as one shard."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from derecho_core import Mode, SubView, View

__all__ = ["one_subgroup_entire_view", "one_subgroup_entire_view_raw"]


def _entire_view(types: Sequence[Hashable], curr_view: View, mode: Mode) -> dict[Hashable, list[list[SubView]]]:
    # Every type overlaps on all members; everyone is assigned, so nothing is left idle.
    curr_view.next_unassigned_rank = curr_view.num_members
    return {t: [[curr_view.make_subview(curr_view.members, mode)]] for t in types}


def one_subgroup_entire_view(types: Sequence[Hashable], prev_view: View | None,
                             curr_view: View) -> dict[Hashable, list[list[SubView]]]:
    """For every type: one subgroup, one ORDERED shard holding every member."""
    return _entire_view(types, curr_view, Mode.ORDERED)


def one_subgroup_entire_view_raw(types: Sequence[Hashable], prev_view: View | None,
                                 curr_view: View) -> dict[Hashable, list[list[SubView]]]:
    """Like :func:`one_subgroup_entire_view`, UNORDERED ("Raw") delivery."""
    return _entire_view(types, curr_view, Mode.UNORDERED)
