"""Handles on subgroups: ``Replicated`` (members) and ``RawObject`` (the type of raw subgroups).

The RPC layer (``ordered_send``, ``p2p_send``, ``QueryResults``) builds on
these; this module holds what the multicast layer offers: raw ``send``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Hashable, TypeVar

if TYPE_CHECKING:
    from .group import Group

T = TypeVar("T")


class RawObject:
    """The stateless type of raw subgroups: ``group.get_subgroup(RawObject).send(payload)``."""


class Replicated(Generic[T]):
    """This node's handle on one subgroup it belongs to."""

    def __init__(self, group: Group, subgroup_type: Hashable, index: int, subgroup_id: int) -> None:
        self._group = group
        self.subgroup_type = subgroup_type
        self.index = index
        self.subgroup_id = subgroup_id

    def send(self, payload: bytes | bytearray | memoryview, *, timeout: float | None = None) -> None:
        """Multicast raw bytes to this node's shard; delivered through ``global_stability_callback``.

        Waits while this node already has many messages queued for the shard
        (flow control); raises ``ValueError`` for a payload over the profile's
        ``max_payload_size``.
        """
        max_size = self._group._max_payload(self.subgroup_id)
        if len(payload) > max_size:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_payload_size = {max_size} of this "
                             "subgroup's profile; raise SUBGROUP/<PROFILE>/max_payload_size")
        self._group._engine.send(self.subgroup_id, bytes(payload), timeout=timeout)

    def get_shard_members(self) -> list[int]:
        return self._group.get_subgroup_members(self.subgroup_type, self.index)[
            self._group.get_my_shard(self.subgroup_type, self.index)]

    def __repr__(self) -> str:
        name = getattr(self.subgroup_type, "__name__", str(self.subgroup_type))
        return f"Replicated[{name}](index={self.index}, subgroup_id={self.subgroup_id})"


