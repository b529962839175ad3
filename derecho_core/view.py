"""Views of the group and of its shards: :class:`View`, :class:`SubView`, :class:`Mode`, :func:`make_next_view`.

A :class:`View` is one epoch of group membership (reference spec §3.1): the
members in rank order, their addresses, which of them are suspected, and, once
an allocator has run (:meth:`derecho_core.SubgroupInfo.allocate`), the
:class:`SubView` of every shard of every subgroup.

Views are plain data. They hold no socket, thread or lock, so the membership
protocol can build, compare and ship them, and :meth:`View.to_bytes` /
:meth:`View.from_bytes` turn them into msgpack bytes for the wire and the disk.
Fields that only make sense on one node (``my_rank``, ``my_subgroups``) or that
the receiver already knows (the subgroup type order) are not serialized; the
receiver passes them to :meth:`View.from_bytes`, as Derecho's receiver does.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack

from .errors import SubgroupProvisioningError

__all__ = ["IpAndPorts", "Mode", "SubView", "View", "make_next_view"]

#: Bumped when the serialized layout changes, so an old reader refuses new bytes clearly.
WIRE_VERSION = 1


class Mode(enum.Enum):
    """Delivery mode of a shard. ``RAW`` is the name the JSON layouts and the guide use for UNORDERED."""

    ORDERED = 0
    UNORDERED = 1
    RAW = 1  # alias: Mode.RAW is Mode.UNORDERED

    @classmethod
    def parse(cls, value: str | int | Mode) -> Mode:
        """``"Ordered"``, ``"Raw"``, ``"unordered"`` (any case), a Mode, or its integer value."""
        if isinstance(value, Mode):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        if isinstance(value, str):
            key = value.strip().upper()
            if key in cls.__members__:
                return cls.__members__[key]
        raise ValueError(f"unknown delivery mode {value!r}; one of 'Ordered', 'Raw' (= 'Unordered')")


class IpAndPorts(NamedTuple):
    """Where a member listens (spec §3.1); serialized as a 6-element list."""

    ip_address: str
    gms_port: int = 0
    state_transfer_port: int = 0
    sst_port: int = 0
    rdmc_port: int = 0
    external_port: int = 0


def _ids(values: Iterable[Any], what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what}: node ids are non-negative integers, got {v!r}")
        out.append(int(v))
    return out


def _unique(ids: Sequence[int], what: str) -> None:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{what}: node {i} appears twice")
        seen.add(i)


def _addr(value: Any) -> IpAndPorts | None:
    if value is None or isinstance(value, IpAndPorts):
        return value
    if isinstance(value, str):
        return IpAndPorts(value)
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 6 and isinstance(value[0], str):
        ports = [int(p) for p in value[1:]]
        if any(not 0 <= p <= 65535 for p in ports):
            raise ValueError(f"port out of range in address {value!r}")
        return IpAndPorts(value[0], *ports)
    raise ValueError(f"an address is an IpAndPorts, an (ip, port, ...) tuple or an ip string, got {value!r}")


class SubView:
    """The members of one shard, in shard-rank order, with their sender flags, mode and profile.

    ``SubView(members)`` is an ORDERED shard in which everyone sends, with the
    DEFAULT profile. ``joined``/``departed`` (against the same shard of the
    previous view) and ``my_rank`` are filled in by :meth:`SubgroupInfo.allocate`.
    """

    __slots__ = ("members", "is_sender", "mode", "profile", "member_ips_and_ports", "joined", "departed", "my_rank")

    def __init__(self, members: Iterable[int], mode: Mode | str = Mode.ORDERED,
                 is_sender: Iterable[bool] | None = None, profile: str = "DEFAULT", *,
                 member_ips_and_ports: Iterable[IpAndPorts | None] | None = None,
                 joined: Iterable[int] = (), departed: Iterable[int] = ()) -> None:
        self.members: list[int] = _ids(members, "SubView members")
        _unique(self.members, "SubView members")
        self.mode: Mode = Mode.parse(mode)
        # Derecho: an empty is_sender list means "everyone sends".
        flags = [True] * len(self.members) if is_sender is None else [bool(f) for f in is_sender]
        if not flags and self.members:
            flags = [True] * len(self.members)
        if len(flags) != len(self.members):
            raise ValueError(f"SubView: {len(self.members)} members but {len(flags)} sender flags")
        self.is_sender: list[bool] = flags
        if not isinstance(profile, str) or not profile:
            raise ValueError(f"SubView: profile must be a non-empty string, got {profile!r}")
        self.profile: str = profile.upper()  # profiles name [SUBGROUP/<PROFILE>] sections, upper-cased
        addrs: list[IpAndPorts | None] = [None] * len(self.members) if member_ips_and_ports is None else [_addr(a) for a in member_ips_and_ports]
        if len(addrs) != len(self.members):
            raise ValueError(f"SubView: {len(self.members)} members but {len(addrs)} addresses")
        self.member_ips_and_ports: list[IpAndPorts | None] = addrs
        self.joined: list[int] = _ids(joined, "SubView joined")
        self.departed: list[int] = _ids(departed, "SubView departed")
        self.my_rank: int = -1

    # ----------------------------------------------------------------- queries
    def rank_of(self, node_id: int) -> int:
        """Shard rank of ``node_id``, or -1."""
        try:
            return self.members.index(node_id)
        except ValueError:
            return -1

    def sender_rank_of(self, rank: int) -> int:
        """Number of senders before ``rank`` (its index in the round-robin order), or -1 if not a sender."""
        if not 0 <= rank < len(self.members) or not self.is_sender[rank]:
            return -1
        return sum(self.is_sender[:rank])

    def num_senders(self) -> int:
        return sum(self.is_sender)

    @property
    def senders(self) -> list[int]:
        return [m for m, s in zip(self.members, self.is_sender, strict=True) if s]

    def init_joined_departed(self, previous: SubView | None) -> None:
        """Set ``joined``/``departed`` against the same shard in the previous view (None: all joined)."""
        before = [] if previous is None else previous.members
        now, then = set(self.members), set(before)
        self.joined = [m for m in self.members if m not in then]
        self.departed = [m for m in before if m not in now]

    # ------------------------------------------------------------ comparisons
    def _key(self) -> tuple[Any, ...]:
        return (self.members, self.is_sender, self.mode, self.profile, self.member_ips_and_ports,
                self.joined, self.departed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubView) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        extra = ""
        if not all(self.is_sender):
            extra += f", senders={self.senders}"
        if self.mode is not Mode.ORDERED:
            extra += f", mode={self.mode.name}"
        if self.profile != "DEFAULT":
            extra += f", profile={self.profile!r}"
        return f"SubView({self.members}{extra})"

    # ---------------------------------------------------------- serialization
    def _encode(self) -> list[Any]:
        return [self.mode.value, self.members, self.is_sender,
                [None if a is None else list(a) for a in self.member_ips_and_ports],
                self.joined, self.departed, self.profile]

    @classmethod
    def _decode(cls, raw: Any) -> SubView:
        if not isinstance(raw, list) or len(raw) != 7:
            raise ValueError("SubView: expected a 7-element list")
        mode, members, is_sender, addrs, joined, departed, profile = raw
        if not all(isinstance(x, list) for x in (members, is_sender, addrs, joined, departed)):
            raise ValueError("SubView: malformed field")
        if not isinstance(mode, int) or not isinstance(profile, str):
            raise ValueError("SubView: malformed mode or profile")
        return cls(members, Mode(mode), is_sender, profile, member_ips_and_ports=addrs,
                   joined=joined, departed=departed)


class View:
    """One epoch of group membership (spec §3.1).

    ``View(vid, members, failed=None, next_unassigned_rank=0, ...)``: ``members``
    in rank order; ``failed`` one flag per rank (default none failed);
    ``next_unassigned_rank`` the first rank an allocator may still hand out.
    ``member_ips_and_ports`` (optional) gives each member's address;
    ``my_id`` makes ``my_rank`` and ``my_subgroups`` meaningful on this node.

    After :meth:`SubgroupInfo.allocate`: ``subgroup_type_order``,
    ``subgroup_ids_by_type_id`` (type position -> subgroup ids),
    ``subgroup_shard_views`` (subgroup id -> shard -> SubView),
    ``is_adequately_provisioned`` and ``my_subgroups`` (subgroup id -> my shard).
    """

    def __init__(self, vid: int, members: Iterable[int], failed: Iterable[bool] | None = None,
                 next_unassigned_rank: int = 0, *,
                 member_ips_and_ports: Iterable[Any] | None = None,
                 joined: Iterable[int] = (), departed: Iterable[int] = (),
                 my_id: int | None = None, subgroup_type_order: Iterable[Hashable] = ()) -> None:
        if isinstance(vid, bool) or not isinstance(vid, int) or vid < 0:
            raise ValueError(f"View: vid must be a non-negative integer, got {vid!r}")
        self.vid = vid
        self.members: list[int] = _ids(members, "View members")
        _unique(self.members, "View members")
        n = len(self.members)
        self.failed: list[bool] = [False] * n if failed is None else [bool(f) for f in failed]
        if len(self.failed) != n:
            raise ValueError(f"View: {n} members but {len(self.failed)} failed flags")
        addrs: list[IpAndPorts | None] = [None] * n if member_ips_and_ports is None else [_addr(a) for a in member_ips_and_ports]
        if len(addrs) != n:
            raise ValueError(f"View: {n} members but {len(addrs)} addresses")
        self.member_ips_and_ports: list[IpAndPorts | None] = addrs
        if isinstance(next_unassigned_rank, bool) or not isinstance(next_unassigned_rank, int) \
                or not 0 <= next_unassigned_rank <= n:
            raise ValueError(f"View: next_unassigned_rank must be in [0, {n}], got {next_unassigned_rank!r}")
        self.next_unassigned_rank = next_unassigned_rank
        self.joined: list[int] = _ids(joined, "View joined")
        self.departed: list[int] = _ids(departed, "View departed")
        self.my_id: int | None = my_id
        self.subgroup_type_order: list[Hashable] = list(subgroup_type_order)
        self.subgroup_ids_by_type_id: list[list[int]] = []
        self.subgroup_shard_views: list[list[SubView]] = []
        self.my_subgroups: dict[int, int] = {}
        self.is_adequately_provisioned = True

    # ----------------------------------------------------------------- queries
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_failed(self) -> int:
        return sum(self.failed)

    @property
    def my_rank(self) -> int:
        return -1 if self.my_id is None else self.rank_of(self.my_id)

    def rank_of(self, node_id: int) -> int:
        """Rank of ``node_id`` in this view, or -1."""
        try:
            return self.members.index(node_id)
        except ValueError:
            return -1

    def find_rank_of_leader(self) -> int:
        """Lowest rank whose member is not failed (-1 if all failed)."""
        return next((r for r, f in enumerate(self.failed) if not f), -1)

    @property
    def subgroup_ids_by_type(self) -> dict[Hashable, list[int]]:
        """Subgroup ids of each type (the allocation's types, in type order)."""
        return {t: list(ids) for t, ids in zip(self.subgroup_type_order, self.subgroup_ids_by_type_id, strict=False)}

    def subgroup_id(self, subgroup_type: Hashable, index: int = 0) -> int:
        return self.subgroup_ids_by_type_id[self.subgroup_type_order.index(subgroup_type)][index]

    def shard_views(self, subgroup_type: Hashable, index: int = 0) -> list[SubView]:
        """The shards of subgroup ``index`` of ``subgroup_type`` in this view."""
        return self.subgroup_shard_views[self.subgroup_id(subgroup_type, index)]

    def subgroup_members(self, subgroup_type: Hashable, index: int = 0) -> list[list[int]]:
        """Members of each shard of subgroup ``index`` of ``subgroup_type``."""
        return [list(s.members) for s in self.shard_views(subgroup_type, index)]

    def make_subview(self, members: Iterable[int], mode: Mode | str = Mode.ORDERED,
                     is_sender: Iterable[bool] | None = None, profile: str = "DEFAULT") -> SubView:
        """A SubView of members of this view, carrying their addresses.

        Raises :class:`SubgroupProvisioningError` when a node is not a member,
        as Derecho's ``View::make_subview`` does.
        """
        members = list(members)
        addrs = []
        for m in members:
            r = self.rank_of(m)
            if r < 0:
                raise SubgroupProvisioningError(f"node {m} is not a member of view {self.vid}")
            addrs.append(self.member_ips_and_ports[r])
        return SubView(members, mode, is_sender, profile, member_ips_and_ports=addrs)

    def __repr__(self) -> str:
        return (f"View(vid={self.vid}, members={self.members}, next_unassigned_rank={self.next_unassigned_rank}"
                f"{'' if self.is_adequately_provisioned else ', inadequate'})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, View) and self.to_bytes() == other.to_bytes() \
            and self.subgroup_type_order == other.subgroup_type_order

    __hash__ = None  # type: ignore[assignment]  # mutable

    # ---------------------------------------------------------- serialization
    def to_bytes(self) -> bytes:
        """msgpack bytes of the serialized fields, in Derecho's order (spec §3.1).

        ``my_rank``, ``my_subgroups``, ``is_adequately_provisioned`` and the
        type order are not included: only adequate views travel, and the rest
        is per node.
        """
        data: bytes = msgpack.packb([
            WIRE_VERSION, self.vid, self.members,
            [None if a is None else list(a) for a in self.member_ips_and_ports],
            self.failed, self.joined, self.departed, self.next_unassigned_rank,
            self.subgroup_ids_by_type_id,
            [[s._encode() for s in shards] for shards in self.subgroup_shard_views],
        ], use_bin_type=True)
        return data

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, my_id: int | None = None,
                   subgroup_type_order: Iterable[Hashable] = ()) -> View:
        """Rebuild a View from :meth:`to_bytes`; garbage raises ValueError, never anything worse."""
        try:
            return cls._from_bytes(data, my_id, subgroup_type_order)
        except (TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            # a well-formed msgpack document of the wrong shape deep inside a field
            raise ValueError(f"not a serialized View: {exc}") from None

    @classmethod
    def _from_bytes(cls, data: bytes | bytearray | memoryview, my_id: int | None,
                    subgroup_type_order: Iterable[Hashable]) -> View:
        try:
            raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ValueError(f"not a serialized View: {exc}") from None
        if not isinstance(raw, list) or len(raw) != 10:
            raise ValueError("not a serialized View: expected a 10-element list")
        if raw[0] != WIRE_VERSION:
            raise ValueError(f"serialized View has format version {raw[0]!r}; this reader knows {WIRE_VERSION}")
        _, vid, members, addrs, failed, joined, departed, nur, ids_by_type, shard_views = raw
        if not all(isinstance(x, list) for x in (members, addrs, failed, joined, departed, ids_by_type, shard_views)):
            raise ValueError("not a serialized View: malformed field")
        if not isinstance(vid, int) or not isinstance(nur, int):
            raise ValueError("not a serialized View: malformed vid or next_unassigned_rank")
        view = cls(vid, members, failed, nur, member_ips_and_ports=addrs, joined=joined, departed=departed,
                   my_id=my_id, subgroup_type_order=subgroup_type_order)
        if not all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in ids_by_type):
            raise ValueError("not a serialized View: malformed subgroup_ids_by_type_id")
        if not all(isinstance(shards, list) for shards in shard_views):
            raise ValueError("not a serialized View: malformed subgroup_shard_views")
        if view.subgroup_type_order and ids_by_type and len(ids_by_type) != len(view.subgroup_type_order):
            raise ValueError(f"serialized View allocates {len(ids_by_type)} subgroup types but this node has "
                             f"{len(view.subgroup_type_order)}")
        view.subgroup_ids_by_type_id = ids_by_type
        view.subgroup_shard_views = [[SubView._decode(s) for s in shards] for shards in shard_views]
        if sorted(i for ids in ids_by_type for i in ids) != list(range(len(view.subgroup_shard_views))):
            raise ValueError("not a serialized View: subgroup ids do not match the shard views")
        member_set = set(view.members)
        for shards in view.subgroup_shard_views:
            for s in shards:
                if not member_set.issuperset(s.members):
                    raise ValueError("not a serialized View: a shard holds a node that is not a member")
        view.refresh_my_subgroups()
        return view

    def refresh_my_subgroups(self) -> None:
        """Recompute ``my_subgroups`` and every SubView's ``my_rank`` for ``my_id``."""
        self.my_subgroups = {}
        for sg_id, shards in enumerate(self.subgroup_shard_views):
            for shard_num, sv in enumerate(shards):
                sv.my_rank = -1 if self.my_id is None else sv.rank_of(self.my_id)
                if sv.my_rank >= 0:
                    self.my_subgroups[sg_id] = shard_num


def make_next_view(prev_view: View, leavers: Iterable[int], joiners: Iterable[int] | Mapping[int, Any],
                   joiner_ips_and_ports: Iterable[Any] | None = None) -> View:
    """The view that follows ``prev_view`` once ``leavers`` are gone and ``joiners`` added (spec §3.6).

    ``leavers`` are node ids of current members; ``joiners`` new node ids in
    proposal order (or a mapping id -> address, or give the addresses in
    ``joiner_ips_and_ports``). Members: survivors in their old order, then the
    joiners. ``failed`` flags of survivors are kept.

    ``next_unassigned_rank`` drops by one for every leaver whose old rank is
    *below* the old ``next_unassigned_rank``, so the survivors that held a shard
    stay exactly at ranks ``[0, next_unassigned_rank)``. (Derecho compares with
    ``<=`` — QUIRK §3.6: an idle node sitting exactly at the pointer then
    pulls it down too, and the allocator hands an already-assigned node out a
    second time. See docs/allocators.md.)

    The new view carries ``prev_view.my_id`` if that node is still a member
    (else ``my_id`` is None: the membership layer checks ``my_rank``) and the
    same subgroup type order; it has no allocation yet.
    """
    leaver_ids = _ids(leavers, "leavers")
    _unique(leaver_ids, "leavers")
    if isinstance(joiners, Mapping):
        if joiner_ips_and_ports is not None:
            raise ValueError("give joiner addresses either in the joiners mapping or in joiner_ips_and_ports")
        joiner_ids = _ids(joiners.keys(), "joiners")
        joiner_addrs = [_addr(a) for a in joiners.values()]
    else:
        joiner_ids = _ids(joiners, "joiners")
        joiner_addrs = [None] * len(joiner_ids) if joiner_ips_and_ports is None \
            else [_addr(a) for a in joiner_ips_and_ports]
    _unique(joiner_ids, "joiners")
    if len(joiner_addrs) != len(joiner_ids):
        raise ValueError(f"{len(joiner_ids)} joiners but {len(joiner_addrs)} joiner addresses")
    current = set(prev_view.members)
    for node in leaver_ids:
        if node not in current:
            raise ValueError(f"leaver {node} is not a member of view {prev_view.vid}")
    for node in joiner_ids:
        if node in current:
            raise ValueError(f"joiner {node} is already a member of view {prev_view.vid}")
    gone = set(leaver_ids)
    old_nur = prev_view.next_unassigned_rank
    nur = old_nur - sum(1 for node in leaver_ids if prev_view.rank_of(node) < old_nur)
    keep = [r for r, m in enumerate(prev_view.members) if m not in gone]
    my_id = prev_view.my_id if prev_view.my_id is not None and prev_view.my_id not in gone else None
    return View(
        prev_view.vid + 1,
        [prev_view.members[r] for r in keep] + joiner_ids,
        [prev_view.failed[r] for r in keep] + [False] * len(joiner_ids),
        nur,
        member_ips_and_ports=[prev_view.member_ips_and_ports[r] for r in keep] + joiner_addrs,
        joined=joiner_ids,
        departed=leaver_ids,
        my_id=my_id,
        subgroup_type_order=prev_view.subgroup_type_order,
    )
