"""SubgroupInfo: the allocator contract, and running an allocator the way the membership layer does.

An *allocator* is any callable ``(types, prev_view, curr_view) -> {type:
[[SubView per shard] per subgroup]}`` (DESIGN §6). It may advance
``curr_view.next_unassigned_rank`` and raises
:class:`~derecho_core.SubgroupProvisioningError` when ``curr_view`` is too
small. Allocator plugins register a factory ``factory(conf) -> allocator``
under a name (``[LAYOUT] allocator``).

:meth:`SubgroupInfo.allocate` is Derecho's ``ViewManager::make_subgroup_maps``
(spec §2.5): it runs the allocator, then numbers the subgroups and records
the result on ``curr_view``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import SubgroupProvisioningError
from .view import SubView, View

if TYPE_CHECKING:
    from .conf import Conf

__all__ = ["Allocation", "Allocator", "SubgroupInfo", "type_name"]

#: {type: [[SubView per shard] per subgroup]}
Allocation: TypeAlias = dict[Hashable, list[list[SubView]]]
#: ``(types, prev_view, curr_view) -> Allocation``
Allocator: TypeAlias = Callable[[Sequence[Hashable], "View | None", View], Allocation]


def type_name(t: Hashable) -> str:
    """How a subgroup type is shown: a class by its name, anything else by ``str``."""
    return getattr(t, "__qualname__", None) or str(t)


class SubgroupInfo:
    """Wraps one allocator (Derecho's ``SubgroupInfo``).

    ``SubgroupInfo(allocator)`` with any allocator callable, or
    :meth:`from_conf` to build the ``[LAYOUT] allocator`` plugin by name.
    """

    def __init__(self, allocator: Allocator, *, name: str | None = None) -> None:
        if not callable(allocator):
            raise TypeError(f"SubgroupInfo needs a callable allocator (types, prev_view, curr_view), got {allocator!r}")
        self.allocator = allocator
        self.name = name

    @classmethod
    def from_conf(cls, conf: Conf) -> SubgroupInfo:
        """The allocator named by ``[LAYOUT] allocator`` (default ``default``), built by its plugin."""
        from . import plugins

        name = conf.get("LAYOUT/allocator")
        factory = plugins.allocator(name)
        return cls(factory(conf), name=name)

    @property
    def types(self) -> list[Hashable] | None:
        """The subgroup types the allocator was written for, when it says (e.g. DefaultSubgroupAllocator)."""
        types = getattr(self.allocator, "types", None)
        return list(types) if types is not None else None

    def __repr__(self) -> str:
        return f"SubgroupInfo({self.name or self.allocator!r})"

    def __call__(self, types: Sequence[Hashable], prev_view: View | None, curr_view: View) -> Allocation:
        """Run the bare allocator (no bookkeeping); what an allocator composed of others calls."""
        return self.allocator(types, prev_view, curr_view)

    def allocate(self, types: Sequence[Hashable], prev_view: View | None, curr_view: View, *,
                 raise_on_inadequate: bool = False) -> Allocation:
        """Allocate ``curr_view`` and record it there; the returned map is the allocator's.

        Subgroup ids are given in (type order, subgroup index) order;
        ``curr_view.subgroup_shard_views[id][shard]``,
        ``curr_view.subgroup_ids_by_type_id`` (and ``subgroup_ids_by_type``),
        ``my_subgroups`` and every SubView's ``my_rank``, ``joined`` and
        ``departed`` (against the same type, index and shard of ``prev_view``)
        are set, and ``is_adequately_provisioned`` is True.

        When the allocator raises :class:`SubgroupProvisioningError` the view
        is marked inadequate (``is_adequately_provisioned = False``) and is
        otherwise left as it was: ``next_unassigned_rank`` restored, no
        allocation recorded. Then an empty map is returned, or the error
        re-raised with ``raise_on_inadequate=True``.
        """
        types = list(types)
        if len(set(types)) != len(types):
            raise ValueError(f"subgroup types listed twice: {[type_name(t) for t in types]}")
        saved_nur = curr_view.next_unassigned_rank
        try:
            allocation = self.allocator(types, prev_view, curr_view)
            _check_allocation(types, allocation, curr_view)
        except SubgroupProvisioningError:
            curr_view.next_unassigned_rank = saved_nur
            curr_view.subgroup_type_order = types
            curr_view.subgroup_ids_by_type_id = []
            curr_view.subgroup_shard_views = []
            curr_view.my_subgroups = {}
            curr_view.is_adequately_provisioned = False
            if raise_on_inadequate:
                raise
            return {}
        except BaseException:
            curr_view.next_unassigned_rank = saved_nur
            raise
        ids_by_type: list[list[int]] = []
        shard_views: list[list[SubView]] = []
        prev_ids = _prev_ids(types, prev_view)
        for t in types:
            ids = []
            for index, shards in enumerate(allocation[t]):
                ids.append(len(shard_views))
                prev_shards = _prev_shards(prev_view, prev_ids, t, index)
                for shard_num, sv in enumerate(shards):
                    if all(a is None for a in sv.member_ips_and_ports):
                        # A hand-built SubView(members): give it the members' addresses.
                        sv.member_ips_and_ports = [curr_view.member_ips_and_ports[curr_view.rank_of(m)]
                                                   for m in sv.members]
                    # A subgroup or shard the previous view lacked (the first view, or a cross product
                    # grew): everyone joined. Derecho would index past the end here, and leaves the first
                    # view's lists empty; state transfer tells "was here before" from ``joined``.
                    sv.init_joined_departed(prev_shards[shard_num] if shard_num < len(prev_shards) else None)
                shard_views.append(shards)
            ids_by_type.append(ids)
        curr_view.subgroup_type_order = types
        curr_view.subgroup_ids_by_type_id = ids_by_type
        curr_view.subgroup_shard_views = shard_views
        curr_view.is_adequately_provisioned = True
        curr_view.refresh_my_subgroups()
        return allocation


def _prev_ids(types: list[Hashable], prev_view: View | None) -> dict[Hashable, list[int]]:
    if prev_view is None:
        return {}
    order = prev_view.subgroup_type_order or types  # a decoded view may not know its types
    return dict(zip(order, prev_view.subgroup_ids_by_type_id, strict=False))


def _prev_shards(prev_view: View | None, prev_ids: dict[Hashable, list[int]], t: Hashable,
                 index: int) -> list[SubView]:
    if prev_view is None:
        return []
    ids = prev_ids.get(t, [])
    return prev_view.subgroup_shard_views[ids[index]] if index < len(ids) else []


def _check_allocation(types: list[Hashable], allocation: Any, view: View) -> None:
    """Refuse a malformed allocation with a message that says what is wrong, before anything is recorded."""
    if not isinstance(allocation, dict):
        raise TypeError(f"an allocator returns {{type: [[SubView per shard] per subgroup]}}, got {type(allocation)}")
    missing = [type_name(t) for t in types if t not in allocation]
    if missing:
        raise ValueError(f"the allocator gave no subgroups for type(s) {', '.join(missing)}")
    extra = [type_name(t) for t in allocation if t not in types]
    if extra:
        raise ValueError(f"the allocator returned type(s) {', '.join(extra)} that the group does not have")
    members = set(view.members)
    for t in types:
        subgroups = allocation[t]
        if not isinstance(subgroups, list) or not all(isinstance(s, list) for s in subgroups):
            raise TypeError(f"allocation of {type_name(t)} must be a list (subgroups) of lists (shards) of SubView")
        for index, shards in enumerate(subgroups):
            for shard_num, sv in enumerate(shards):
                if not isinstance(sv, SubView):
                    raise TypeError(f"allocation of {type_name(t)}[{index}][{shard_num}] is not a SubView: {sv!r}")
                outside = [m for m in sv.members if m not in members]
                if outside:
                    raise SubgroupProvisioningError(
                        f"{type_name(t)}[{index}] shard {shard_num} holds node(s) {outside} that are not members "
                        f"of view {view.vid}")
