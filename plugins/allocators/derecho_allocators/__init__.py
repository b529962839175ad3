"""derecho-allocators: Derecho's default subgroup allocator, its policy helpers and JSON layouts.

    from derecho_core import SubgroupInfo
    from derecho_allocators import (DefaultSubgroupAllocator, one_subgroup_policy,
                                    identical_subgroups_policy, even_sharding_policy)

    subgroup_info = SubgroupInfo(DefaultSubgroupAllocator({
        Foo: one_subgroup_policy(even_sharding_policy(2, 3)),
        Bar: identical_subgroups_policy(2, even_sharding_policy(1, 3)),
    }))

The plugin registers the allocator ``default`` ([LAYOUT] allocator), which
reads the JSON layout of ``[LAYOUT] json_layout`` or ``json_layout_file``.
"""

from __future__ import annotations

from .default import DefaultSubgroupAllocator
from .entire_view import one_subgroup_entire_view, one_subgroup_entire_view_raw
from .errors import LayoutError
from .json_layout import parse_json_layout
from .policies import (
    CrossProductPolicy,
    ShardAllocationPolicy,
    SubgroupAllocationPolicy,
    custom_shard_policy,
    custom_shards_policy,
    even_sharding_policy,
    fixed_even_shards,
    flexible_even_shards,
    identical_subgroups_policy,
    one_subgroup_policy,
    raw_fixed_even_shards,
)

__version__ = "0.1.0"

__all__ = [
    "CrossProductPolicy",
    "DefaultSubgroupAllocator",
    "LayoutError",
    "ShardAllocationPolicy",
    "SubgroupAllocationPolicy",
    "custom_shard_policy",
    "custom_shards_policy",
    "even_sharding_policy",
    "fixed_even_shards",
    "flexible_even_shards",
    "identical_subgroups_policy",
    "one_subgroup_entire_view",
    "one_subgroup_entire_view_raw",
    "one_subgroup_policy",
    "parse_json_layout",
    "raw_fixed_even_shards",
]
