"""The plugin module named by the ``derecho`` entry point: registers the allocator ``default``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from derecho_core import hookimpl

if TYPE_CHECKING:
    from derecho_core import Conf


def make_default_allocator(conf: Conf) -> Any:
    """``[LAYOUT] allocator = default``: the JSON layout of ``[LAYOUT] json_layout`` / ``json_layout_file``.

    Policies are matched to the group's types by position when it runs.
    """
    from .default import DefaultSubgroupAllocator

    return DefaultSubgroupAllocator.from_conf(conf)


@hookimpl
def derecho_register_allocators(register: Any) -> None:
    register("default", make_default_allocator)
