"""Handles on subgroups: ``Replicated`` (members), ``PeerCaller`` (non-members) and ``RawObject``.

``Replicated[T]`` is this node's handle on a subgroup it belongs to:
``ordered_send`` (every shard member runs the method, in one order),
``p2p_send`` (one member answers), raw ``send``, versions and frontiers.
``PeerCaller[T]`` (alias ``ExternalCaller``) is what a member of the group
holds for a subgroup it is not in: ``p2p_send`` only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Generic, Hashable, TypeVar

from .rpc.query_results import QueryResults

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

    # ------------------------------------------------------------------ calls
    def ordered_send(self, method: Any, *args: Any, **kwargs: Any) -> QueryResults[Any]:
        """Invoke ``method`` (the method, its name, or its ``rpc_name`` tag) on every member of this shard.

        Returns at once; the :class:`QueryResults` gives each member's reply.
        Every member runs the call in the same order relative to every other
        ordered call of the shard. Waits (flow control) only while this node
        already has many calls queued.
        """
        return self._group.rpc.ordered_send(self.subgroup_type, self.subgroup_id, method, args, kwargs)

    def p2p_send(self, node_id: int, method: Any, *args: Any, **kwargs: Any) -> QueryResults[Any]:
        """Invoke the ``@p2p`` method on member ``node_id`` only; its reply is the one entry of the result."""
        return self._group.rpc.p2p_send(self.subgroup_type, self.subgroup_id, node_id, method, args, kwargs)

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
        ts = time.time_ns()
        self._group.rpc.note_raw_send(self.subgroup_id, ts)
        self._group._engine.send(self.subgroup_id, bytes(payload), timeout=timeout, timestamp_ns=ts,
                                 wait_for_room=not self._group.rpc.is_delivery_thread())

    # ------------------------------------------------------------------ the local replica
    def get_ref(self) -> T:
        """This node's copy of the object. Read it from handlers, or knowing the delivery thread may change it."""
        holder = self._group.rpc.objects.get(self.subgroup_id)
        if holder is None:
            raise LookupError(f"node {self._group.get_my_id()} holds no object for subgroup {self.subgroup_id}")
        obj: T = holder.obj
        return obj

    def get_current_version(self) -> int:
        """Inside an ordered handler: the version of the update being executed; elsewhere the latest delivered."""
        return self._group.rpc.get_current_version(self.subgroup_id)[0]

    def get_current_timestamp_us(self) -> int:
        """Inside an ordered handler: the timestamp (µs) of the update being executed, else 0."""
        return self._group.rpc.get_current_version(self.subgroup_id)[1]

    def get_global_persistence_frontier(self) -> int:
        """The latest version every member of this shard has persisted."""
        return self._group.rpc.get_global_persistence_frontier(self.subgroup_id)

    def wait_for_global_persistence_frontier(self, version: int, timeout: float | None = None) -> bool:
        """Wait until every shard member persisted ``version``; False at once if it was not delivered yet."""
        return self._group.rpc.wait_for_global_persistence_frontier(self.subgroup_id, version, timeout)

    def get_stability_frontier_us(self) -> int:
        """The global stability frontier (µs): temporal queries before it are final (spec §5.8)."""
        return self._group.rpc.get_stability_frontier_us(self.subgroup_id)

    compute_global_stability_frontier = get_stability_frontier_us

    def get_shard_members(self) -> list[int]:
        return self._group.get_subgroup_members(self.subgroup_type, self.index)[
            self._group.get_my_shard(self.subgroup_type, self.index)]

    def get_shard_num(self) -> int:
        return self._group.get_my_shard(self.subgroup_type, self.index)

    def get_subgroup_id(self) -> int:
        return self.subgroup_id

    def __repr__(self) -> str:
        name = getattr(self.subgroup_type, "__name__", str(self.subgroup_type))
        return f"Replicated[{name}](index={self.index}, subgroup_id={self.subgroup_id})"


class PeerCaller(Generic[T]):
    """A member's handle on a subgroup it does not belong to: ``p2p_send`` to that subgroup's members."""

    def __init__(self, group: Group, subgroup_type: Hashable, index: int, subgroup_id: int) -> None:
        self._group = group
        self.subgroup_type = subgroup_type
        self.index = index
        self.subgroup_id = subgroup_id

    def p2p_send(self, node_id: int, method: Any, *args: Any, **kwargs: Any) -> QueryResults[Any]:
        return self._group.rpc.p2p_send(self.subgroup_type, self.subgroup_id, node_id, method, args, kwargs)

    def __repr__(self) -> str:
        name = getattr(self.subgroup_type, "__name__", str(self.subgroup_type))
        return f"PeerCaller[{name}](index={self.index}, subgroup_id={self.subgroup_id})"


#: the name PeerCaller had in Derecho before October 2021
ExternalCaller = PeerCaller
