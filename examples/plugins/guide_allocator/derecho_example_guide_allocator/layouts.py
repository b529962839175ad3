"""The guide's example of the default allocator, for ``derecho layout --layout ...layouts.py:subgroup_info``.

One Foo subgroup of two shards of 3, then two Bar subgroups of one shard of 3:
with members 0..11, Foo gets [0,1,2] and [3,4,5], Bar subgroup 0 [6,7,8] and
subgroup 1 [9,10,11] (types are allocated in the group's type order).
"""

from __future__ import annotations

from derecho_allocators import (
    DefaultSubgroupAllocator,
    even_sharding_policy,
    identical_subgroups_policy,
    one_subgroup_policy,
)

from derecho_core import SubgroupInfo


class Foo:
    """Stands for the guide's replicated type Foo."""


class Bar:
    """Stands for the guide's replicated type Bar."""


subgroup_info = SubgroupInfo(DefaultSubgroupAllocator({
    Foo: one_subgroup_policy(even_sharding_policy(2, 3)),
    Bar: identical_subgroups_policy(2, even_sharding_policy(1, 3)),
}))
