"""Application callbacks for delivered messages and persistence (DESIGN §6, spec §10.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: (subgroup_id, sender_id, index, payload, version)
StabilityCallback = Callable[[int, int, int, memoryview, int], None]
#: (subgroup_id, version)
PersistenceCallback = Callable[[int, int], None]


@dataclass
class UserMessageCallbacks:
    """Passed as ``Group(..., callbacks=UserMessageCallbacks(...))``.

    ``global_stability_callback(subgroup_id, sender_id, index, payload, version)``
    runs on the delivery thread for every delivered raw (non-RPC) message, in
    delivery order; ``payload`` is a memoryview, ``version`` is
    ``(vid << 32) | seq`` in ORDERED subgroups and -1 in raw (UNORDERED) ones.
    The persistence callbacks run when a version becomes durable locally or on
    every shard member.
    """

    global_stability_callback: StabilityCallback | None = None
    local_persistence_callback: PersistenceCallback | None = None
    global_persistence_callback: PersistenceCallback | None = None
