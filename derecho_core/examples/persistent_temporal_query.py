"""Temporal queries: what was PFoo's state at a given time, asked of the log of a Persistent field.

The Python version of Derecho's ``persistent_temporal_query_test.cpp`` (the
user guide's last section). One process runs one node::

    python derecho_core/examples/persistent_temporal_query.py --node ID [--nodes N] [--PERS/file_path=DIR ...]

or ``derecho demo persistent_temporal_query`` for three local nodes.

Every log entry of a ``Persistent`` field carries the timestamp of its update
(the sender's clock, in microseconds), so ``pint.get_by_time(t)`` gives the
state as of time ``t``. A query is final only once the shard's *stability
frontier* has passed ``t``: no update stamped at or before ``t`` can still
arrive. Before that, ``get_by_time`` raises ``VersionNotStableError``.

The first member sets PFoo's int to 1, 2 and 3. Between two updates every
node notes the time (``time.time_ns() // 1000``), at barriers, so each time
falls after one update and before the next on every node's clock (the nodes
share this machine's clock; across machines Derecho assumes synchronised
clocks). Then every node waits until ``get_stability_frontier_us()`` passes
the last time, and asks its own log for the state at each time.
"""

from __future__ import annotations

import time

from _demo_common import TIMEOUT, run, start
from derecho_allocators import DefaultSubgroupAllocator, fixed_even_shards, one_subgroup_policy
from derecho_core import (
    Group,
    InvalidTimestampError,
    Persistent,
    PersistentRegistry,
    SubgroupInfo,
    VersionNotStableError,
    ordered,
    p2p,
)

DEMO_NODES = 3


class PFoo:
    """Example for a replicated object with a ``Persistent`` field."""

    def __init__(self, registry: PersistentRegistry) -> None:
        self.pint = Persistent(int, registry, "pint")

    @ordered
    @p2p
    def read_state(self) -> int:
        return self.pint.value

    @ordered
    def change_state(self, new_int: int) -> bool:
        if new_int == self.pint.value:
            return False
        self.pint.value = new_int
        return True


def now_us() -> int:
    return time.time_ns() // 1000


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES)
    n = node.nodes
    subgroup_info = SubgroupInfo(DefaultSubgroupAllocator({PFoo: one_subgroup_policy(fixed_even_shards(1, n))}))
    group = Group([PFoo], subgroup_info, factories={PFoo: lambda registry, subgroup_id: PFoo(registry)},
                  conf=node.conf, join_timeout=120)
    node.say("Finished constructing/joining Group; members", group.get_members())
    pfoo_rpc_handle = group.get_subgroup(PFoo)
    writer = group.get_my_rank() == 0

    group.barrier_sync(TIMEOUT)
    times = {0: now_us()}  # value -> a time at which pint had that value (0: before any update)
    node.say(f"t0 = {times[0]} us: no update yet")
    for value in (1, 2, 3):
        group.barrier_sync(TIMEOUT)  # every node noted the previous time: the update comes after it
        if writer:
            results = pfoo_rpc_handle.ordered_send(PFoo.change_state, value)
            results.get(TIMEOUT)
            node.say(f"Changed PFoo's state to {value}: version {results.version}, stamped {results.timestamp_us} us")
        group.barrier_sync(TIMEOUT)  # the update is delivered (and stamped) before this node notes the time
        times[value] = now_us()
        node.say(f"t{value} = {times[value]} us: after the update to {value}")

    pint = pfoo_rpc_handle.get_ref().pint
    last = times[3]
    try:
        pint.get_by_time(last)
        node.say(f"get_by_time(t3) answered before the frontier passed t3 (frontier "
                 f"{pfoo_rpc_handle.get_stability_frontier_us()})")
    except VersionNotStableError:
        node.say("get_by_time(t3) right away: VersionNotStableError (the stability frontier has not passed t3)")

    waited = time.monotonic()
    deadline = waited + TIMEOUT
    while pfoo_rpc_handle.get_stability_frontier_us() <= last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stability frontier did not pass t3 within {TIMEOUT} s")
        time.sleep(0.02)
    frontier = pfoo_rpc_handle.get_stability_frontier_us()
    node.say(f"stability frontier {frontier} us passed t3 after {1000 * (time.monotonic() - waited):.0f} ms")

    try:
        value = pint.get_by_time(times[0])
        node.check(False, f"get_by_time(t0) should find no version, found {value}")
    except InvalidTimestampError:
        node.say("get_by_time(t0) = (no version yet: InvalidTimestampError)")
    for expected in (1, 2, 3):
        value = pint.get_by_time(times[expected])
        version = pint.get_version_at_time(times[expected])
        node.say(f"get_by_time(t{expected}) = {value} (version {version})")
        node.check(value == expected, f"get_by_time(t{expected}) gives {expected}, not {value}")

    future = frontier + 1_000_000
    try:
        value = pint.get_by_time(future)
        node.check(False, f"get_by_time(frontier + 1 s) should raise VersionNotStableError, gave {value}")
    except VersionNotStableError:
        node.say("get_by_time(frontier + 1 s) raises VersionNotStableError, as it should")
    return node.finish(group)


if __name__ == "__main__":
    run(main)
