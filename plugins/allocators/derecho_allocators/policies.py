"""Allocation policies and the helpers that build them (spec §2.2), in Derecho's names and field names.

A :class:`ShardAllocationPolicy` says how many shards a subgroup has and how
big each may be; a :class:`SubgroupAllocationPolicy` how many subgroups a type
has and which shard policy each uses; a :class:`CrossProductPolicy` derives a
type's subgroups from two other subgroups. Policies are immutable and checked
when built, so a bad one fails where it is written, not at the first view.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from derecho_core import ConfigError, Mode

from .errors import LayoutError

if TYPE_CHECKING:
    from derecho_core import Conf

__all__ = [
    "CrossProductPolicy", "ShardAllocationPolicy", "SubgroupAllocationPolicy",
    "custom_shard_policy", "custom_shards_policy", "even_sharding_policy", "fixed_even_shards",
    "flexible_even_shards", "identical_subgroups_policy", "one_subgroup_policy", "raw_fixed_even_shards",
]


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LayoutError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _mode(value: Any) -> Mode:
    try:
        return Mode.parse(value)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None


def _node_set(values: Iterable[Any], what: str) -> frozenset[int]:
    ids = list(values)
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LayoutError(f"{what}: node ids are non-negative integers, got {v!r}")
    return frozenset(ids)


@dataclass(frozen=True)
class ShardAllocationPolicy:
    """How one subgroup is cut into shards (C++ field names).

    Even shards (``even_shards=True``) all use ``min_nodes_per_shard``,
    ``max_nodes_per_shard``, ``shards_mode`` and ``shards_profile``; otherwise
    shard *i* uses ``min_num_nodes_by_shard[i]``, ``max_num_nodes_by_shard[i]``,
    ``modes_by_shard[i]`` and ``profiles_by_shard[i]``.
    ``reserved_node_ids_by_shard[i]`` are nodes that always go to shard *i*
    when they are members (shards of other subgroups may reserve them too: that
    is how subgroups overlap); ``reserved_sender_ids_by_shard[i]`` (a subset)
    are its designated senders: when a shard has any, only they send.
    """

    num_shards: int
    even_shards: bool = True
    min_nodes_per_shard: int = -1
    max_nodes_per_shard: int = -1
    shards_mode: Mode = Mode.ORDERED
    shards_profile: str = "DEFAULT"
    min_num_nodes_by_shard: tuple[int, ...] = ()
    max_num_nodes_by_shard: tuple[int, ...] = ()
    modes_by_shard: tuple[Mode, ...] = ()
    profiles_by_shard: tuple[str, ...] = ()
    reserved_node_ids_by_shard: tuple[frozenset[int], ...] = ()
    reserved_sender_ids_by_shard: tuple[frozenset[int], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        n = _size(self.num_shards, "num_shards")
        if self.even_shards:
            lo = _size(self.min_nodes_per_shard, "min_nodes_per_shard")
            hi = _size(self.max_nodes_per_shard, "max_nodes_per_shard")
            if lo > hi:
                raise LayoutError(f"min_nodes_per_shard ({lo}) is larger than max_nodes_per_shard ({hi})")
            set_(self, "shards_mode", _mode(self.shards_mode))
            set_(self, "shards_profile", _profile(self.shards_profile))
        else:
            mins = tuple(_size(v, f"min_num_nodes_by_shard[{i}]") for i, v in enumerate(self.min_num_nodes_by_shard))
            maxs = tuple(_size(v, f"max_num_nodes_by_shard[{i}]") for i, v in enumerate(self.max_num_nodes_by_shard))
            modes = tuple(_mode(m) for m in self.modes_by_shard) or (Mode.ORDERED,) * n
            profiles = tuple(_profile(p) for p in self.profiles_by_shard) or ("DEFAULT",) * n
            for name, seq in (("min_num_nodes_by_shard", mins), ("max_num_nodes_by_shard", maxs),
                              ("modes_by_shard", modes), ("profiles_by_shard", profiles)):
                if len(seq) != n:
                    raise LayoutError(f"{name} has {len(seq)} entries for {n} shards")
            for i, (lo, hi) in enumerate(zip(mins, maxs, strict=True)):
                if lo > hi:
                    raise LayoutError(f"shard {i}: min_num_nodes_by_shard ({lo}) is larger than "
                                      f"max_num_nodes_by_shard ({hi})")
            set_(self, "min_num_nodes_by_shard", mins)
            set_(self, "max_num_nodes_by_shard", maxs)
            set_(self, "modes_by_shard", modes)
            set_(self, "profiles_by_shard", profiles)
        reserved = tuple(_node_set(s, f"reserved_node_ids_by_shard[{i}]")
                         for i, s in enumerate(self.reserved_node_ids_by_shard))
        senders = tuple(_node_set(s, f"reserved_sender_ids_by_shard[{i}]")
                        for i, s in enumerate(self.reserved_sender_ids_by_shard))
        if reserved and len(reserved) != n:
            raise LayoutError(f"reserved_node_ids_by_shard has {len(reserved)} entries for {n} shards")
        if senders and len(senders) != n:
            raise LayoutError(f"reserved_sender_ids_by_shard has {len(senders)} entries for {n} shards")
        for i, s in enumerate(senders):
            outside = s - (reserved[i] if reserved else frozenset())
            if outside:
                raise LayoutError(f"shard {i}: designated senders {sorted(outside)} are not reserved for it")
        # Every pair of shards (Derecho compared only shard 0 with the last: QUIRK §2.3).
        for i in range(len(reserved)):
            for j in range(i + 1, len(reserved)):
                common = reserved[i] & reserved[j]
                if common:
                    raise LayoutError(f"shards {i} and {j} of one subgroup both reserve node(s) {sorted(common)}")
        set_(self, "reserved_node_ids_by_shard", reserved)
        set_(self, "reserved_sender_ids_by_shard", senders)

    # What the allocator asks, shard by shard, whatever the form.
    def min_size(self, shard: int) -> int:
        return self.min_nodes_per_shard if self.even_shards else self.min_num_nodes_by_shard[shard]

    def max_size(self, shard: int) -> int:
        return self.max_nodes_per_shard if self.even_shards else self.max_num_nodes_by_shard[shard]

    def mode(self, shard: int) -> Mode:
        return self.shards_mode if self.even_shards else self.modes_by_shard[shard]

    def profile(self, shard: int) -> str:
        return self.shards_profile if self.even_shards else self.profiles_by_shard[shard]

    def reserved(self, shard: int) -> frozenset[int]:
        return self.reserved_node_ids_by_shard[shard] if self.reserved_node_ids_by_shard else frozenset()

    def senders(self, shard: int) -> frozenset[int]:
        return self.reserved_sender_ids_by_shard[shard] if self.reserved_sender_ids_by_shard else frozenset()


def _profile(p: Any) -> str:
    if not isinstance(p, str) or not p.strip():
        raise LayoutError(f"a profile is a non-empty name, got {p!r}")
    return p.strip().upper()


@dataclass(frozen=True)
class SubgroupAllocationPolicy:
    """How many subgroups a type has and how each is sharded.

    ``identical_subgroups=True``: ``shard_policy_by_subgroup[0]`` applies to
    every subgroup; otherwise there is one shard policy per subgroup.
    """

    num_subgroups: int
    identical_subgroups: bool = True
    shard_policy_by_subgroup: tuple[ShardAllocationPolicy, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        n = _size(self.num_subgroups, "num_subgroups")
        policies = tuple(self.shard_policy_by_subgroup)
        for p in policies:
            if not isinstance(p, ShardAllocationPolicy):
                raise LayoutError(f"shard_policy_by_subgroup holds {p!r}, not a ShardAllocationPolicy")
        if self.identical_subgroups and n and len(policies) != 1:
            raise LayoutError(f"identical subgroups take exactly one shard policy, got {len(policies)}")
        if not self.identical_subgroups and len(policies) != n:
            raise LayoutError(f"{n} subgroups but {len(policies)} shard policies")
        object.__setattr__(self, "shard_policy_by_subgroup", policies)

    def shard_policy(self, subgroup: int) -> ShardAllocationPolicy:
        # (Derecho indexed by subgroup even for identical subgroups when reading reserved ids.)
        return self.shard_policy_by_subgroup[0 if self.identical_subgroups else subgroup]


@dataclass(frozen=True)
class CrossProductPolicy:
    """One single-shard subgroup per (member of source subgroup, shard of target subgroup) (spec §2.4 D).

    ``source_subgroup`` and ``target_subgroup`` are ``(type, subgroup index)``.
    """

    source_subgroup: tuple[Hashable, int]
    target_subgroup: tuple[Hashable, int]

    def __post_init__(self) -> None:
        for name in ("source_subgroup", "target_subgroup"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[1], int):
                raise LayoutError(f"{name} must be a (type, subgroup index) pair, got {value!r}")


# ------------------------------------------------------------------ helpers
def fixed_even_shards(num_shards: int, nodes_per_shard: int, profile: str = "DEFAULT") -> ShardAllocationPolicy:
    """``num_shards`` ORDERED shards of exactly ``nodes_per_shard`` nodes."""
    return ShardAllocationPolicy(num_shards, True, nodes_per_shard, nodes_per_shard, Mode.ORDERED, profile)


def even_sharding_policy(num_shards: int, nodes_per_shard: int, profile: str = "DEFAULT") -> ShardAllocationPolicy:
    """The user guide's name for :func:`fixed_even_shards` (Derecho renamed it; both work here)."""
    return fixed_even_shards(num_shards, nodes_per_shard, profile)


def raw_fixed_even_shards(num_shards: int, nodes_per_shard: int, profile: str = "DEFAULT") -> ShardAllocationPolicy:
    """Like :func:`fixed_even_shards`, UNORDERED ("Raw") delivery."""
    return ShardAllocationPolicy(num_shards, True, nodes_per_shard, nodes_per_shard, Mode.UNORDERED, profile)


def _profile_int(conf: Conf, profile: str, key: str) -> int:
    name = f"SUBGROUP/{profile.upper()}/{key}"
    value = conf.get(name, None)
    if value is None:
        # Derecho logs an error and returns an empty policy, which then allocates nothing
        # without a word; a missing key is a configuration error here.
        raise ConfigError(f"not set: the policy of profile {profile.upper()} needs [SUBGROUP/{profile.upper()}] "
                          f"{key}", key=name)
    return int(value)


def _conf(conf: Conf | None) -> Conf:
    if conf is not None:
        return conf
    from derecho_core import Conf

    return Conf.load()  # derecho.cfg / derecho_node.cfg / $DERECHO_CONF_FILE, as Derecho reads its global config


def flexible_even_shards(num_shards: int | str, min_nodes_per_shard: int | None = None,
                         max_nodes_per_shard: int | None = None, profile: str = "DEFAULT", *,
                         conf: Conf | None = None) -> ShardAllocationPolicy:
    """Even ORDERED shards of ``min..max`` nodes.

    Two forms, as in Derecho: ``flexible_even_shards(n, min, max, profile="DEFAULT")``, or
    ``flexible_even_shards("VCS", conf=conf)`` which reads ``[SUBGROUP/VCS] num_shards``,
    ``min_nodes`` and ``max_nodes`` (``conf`` defaults to ``Conf.load()``).
    """
    if isinstance(num_shards, str):
        if min_nodes_per_shard is not None or max_nodes_per_shard is not None:
            raise TypeError("flexible_even_shards(profile) takes no sizes; they come from the profile")
        c, prof = _conf(conf), num_shards
        return ShardAllocationPolicy(_profile_int(c, prof, "num_shards"), True, _profile_int(c, prof, "min_nodes"),
                                     _profile_int(c, prof, "max_nodes"), Mode.ORDERED, prof)
    if min_nodes_per_shard is None or max_nodes_per_shard is None:
        raise TypeError("flexible_even_shards(num_shards, min_nodes_per_shard, max_nodes_per_shard[, profile])")
    return ShardAllocationPolicy(num_shards, True, min_nodes_per_shard, max_nodes_per_shard, Mode.ORDERED, profile)


def custom_shards_policy(min_nodes_by_shard: Sequence[int], max_nodes_by_shard: Sequence[int],
                         delivery_modes_by_shard: Sequence[Mode | str] | None = None,
                         profiles_by_shard: Sequence[str] | None = None, *,
                         reserved_node_ids_by_shard: Sequence[Iterable[int]] | None = None,
                         reserved_sender_ids_by_shard: Sequence[Iterable[int]] | None = None,
                         ) -> ShardAllocationPolicy:
    """Shards of individual sizes, modes and profiles; ``num_shards = len(min_nodes_by_shard)``.

    Modes default to ORDERED and profiles to DEFAULT. Reserved node ids and
    designated senders are what a JSON layout's ``reserved_node_ids_by_shard``
    gives.
    """
    n = len(min_nodes_by_shard)
    return ShardAllocationPolicy(
        n, False, -1, -1, Mode.ORDERED, "DEFAULT", tuple(min_nodes_by_shard), tuple(max_nodes_by_shard),
        tuple(delivery_modes_by_shard or ()), tuple(profiles_by_shard or ()),
        tuple(frozenset(s) for s in reserved_node_ids_by_shard or ()),
        tuple(frozenset(s) for s in reserved_sender_ids_by_shard or ()))


def custom_shard_policy(delivery_modes_by_shard: Sequence[Mode | str], profiles_by_shard: Sequence[str], *,
                        conf: Conf | None = None) -> ShardAllocationPolicy:
    """One shard per profile, sized by that profile's ``min_nodes``/``max_nodes`` (``conf`` defaults to ``Conf.load()``)."""
    c = _conf(conf)
    if len(delivery_modes_by_shard) != len(profiles_by_shard):
        raise LayoutError(f"{len(delivery_modes_by_shard)} delivery modes for {len(profiles_by_shard)} profiles")
    mins = [_profile_int(c, p, "min_nodes") for p in profiles_by_shard]
    maxs = [_profile_int(c, p, "max_nodes") for p in profiles_by_shard]
    return custom_shards_policy(mins, maxs, delivery_modes_by_shard, profiles_by_shard)


def one_subgroup_policy(policy: ShardAllocationPolicy) -> SubgroupAllocationPolicy:
    """One subgroup sharded by ``policy``."""
    return SubgroupAllocationPolicy(1, True, (policy,))


def identical_subgroups_policy(num_subgroups: int, policy: ShardAllocationPolicy) -> SubgroupAllocationPolicy:
    """``num_subgroups`` subgroups, each sharded by ``policy``."""
    return SubgroupAllocationPolicy(num_subgroups, True, (policy,))
