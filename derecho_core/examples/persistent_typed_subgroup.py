"""PFoo, a replicated object with a Persistent field: every update is a version in a log on disk.

The Python version of Derecho's ``persistent_typed_subgroup_test.cpp`` (the
user guide's "Tracking Updates with Version Vectors"). One process runs one
node::

    python derecho_core/examples/persistent_typed_subgroup.py --node ID [--nodes N] [--PERS/file_path=DIR ...]

or ``derecho demo persistent_typed_subgroup`` for three local nodes.

PFoo keeps an int in ``Persistent(int, registry, "pint")``. Every ordered call
delivered to the subgroup (one shard of all N nodes) makes a new version of
the field, numbered ``(view id << 32) | sequence number`` and logged with its
timestamp under ``PERS/file_path``; the persistence callbacks say when a
version is durable here and on every member.

1. The first member reads the state (an ordered call: it makes a version too)
   while the second changes it to 3.
2. After a barrier, the last member changes it to 3 again (every reply is
   false: no change, but still a version) and then to 7, and waits with
   ``await_global_persistence`` until every member has the version on disk.
3. After another barrier, every node prints its own log: each version, its
   timestamp and ``pint.get(version)``, then ``get_latest_version`` and the
   global persistence frontier. The logs are identical on every node.
"""

from __future__ import annotations

import datetime

from _demo_common import TIMEOUT, run, start
from derecho_allocators import DefaultSubgroupAllocator, fixed_even_shards, one_subgroup_policy
from derecho_core import Group, Persistent, PersistentRegistry, SubgroupInfo, UserMessageCallbacks, ordered, p2p

DEMO_NODES = 3


class PFoo:
    """Example for a replicated object with a ``Persistent`` field."""

    def __init__(self, registry: PersistentRegistry) -> None:
        # the registry is how Derecho finds every Persistent field of the object to version it
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


def show_version(version: int) -> str:
    return f"{version} (view {version >> 32}, seq {version & 0xFFFFFFFF})"


def show_time(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6).strftime("%H:%M:%S.%f")


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES)
    n = node.nodes
    if n < 2:
        node.say("this example needs at least 2 nodes")
        return 2

    def persisted_here(subgroup_id: int, version: int) -> None:
        node.say(f"Subgroup {subgroup_id}, version {show_version(version)} is persisted here")

    def persisted_everywhere(subgroup_id: int, version: int) -> None:
        node.say(f"Subgroup {subgroup_id}, version {show_version(version)} is persisted on every member")

    callback_set = UserMessageCallbacks(local_persistence_callback=persisted_here,
                                        global_persistence_callback=persisted_everywhere)
    subgroup_info = SubgroupInfo(DefaultSubgroupAllocator({PFoo: one_subgroup_policy(fixed_even_shards(1, n))}))
    # The factory hands the object its PersistentRegistry (and the subgroup id, unused here).
    group = Group([PFoo], subgroup_info, factories={PFoo: lambda registry, subgroup_id: PFoo(registry)},
                  conf=node.conf, callbacks=callback_set, join_timeout=120)
    node.say("Finished constructing/joining Group; members", group.get_members())
    node_rank = group.get_my_rank()
    pfoo_rpc_handle = group.get_subgroup(PFoo)

    # 1.
    if node_rank == 0:
        node.say("Reading PFoo's state just to allow node 1's message to be delivered")
        pfoo_rpc_handle.ordered_send(PFoo.read_state).get(TIMEOUT)
    elif node_rank == 1:
        new_value = 3
        node.say(f"Changing PFoo's state to {new_value}")
        resultx = pfoo_rpc_handle.ordered_send(PFoo.change_state, new_value)
        repliex = resultx.get(TIMEOUT)
        node.say(f"Got a reply map! (version {show_version(resultx.version)})")
        for reply_node, reply in repliex.items():
            node.say(f"Replyx from node {reply_node} was {str(reply.result(TIMEOUT)).lower()}")
    group.barrier_sync(TIMEOUT)

    # 2.
    if node_rank == n - 1:
        for new_value in (3, 7):
            node.say(f"Changing PFoo's state to {new_value}")
            results = pfoo_rpc_handle.ordered_send(PFoo.change_state, new_value)
            replies = node.replies(results)
            node.say(f"Version {show_version(results.version)}: replies "
                     + ", ".join(f"node {k} {str(v).lower()}" for k, v in replies.items()))
            node.check(set(replies.values()) == {new_value == 7},
                       f"change_state({new_value}) replies {new_value == 7} everywhere: {replies}")
        results.await_global_persistence(TIMEOUT)
        frontier = pfoo_rpc_handle.get_global_persistence_frontier()
        node.say(f"Version {show_version(results.version)} is on disk on every member; "
                 f"global persistence frontier {show_version(frontier)}")
        node.check(frontier >= results.version, "the global persistence frontier reached the last update")
    group.barrier_sync(TIMEOUT)

    # 3. This node's own log (read after the barrier: no update is in flight).
    pint = pfoo_rpc_handle.get_ref().pint
    latest = pint.get_latest_version()
    node.say(f"PFoo's log here: {pint.get_num_versions()} versions, latest version {show_version(latest)}")
    log = []
    for version, timestamp_us, value in pint:
        node.say(f"  version {show_version(version)} at {show_time(timestamp_us)}: pint.get(version) = "
                 f"{pint.get(version)}")
        node.check(pint.get(version) == value, f"get({version}) gives the logged value {value}")
        log.append((version, value))
    node.say("log:", " ".join(f"{v}={x}" for v, x in log))
    node.say(f"current value *pint = {pint.value}")
    node.check(pint.value == 7 and [x for _, x in log][-3:] == [3, 3, 7],
               f"the log ends with 3, 3, 7: {log}")
    node.check(len(log) == 4, f"4 versions (read_state, change_state x3): {len(log)}")
    pfoo_rpc_handle.wait_for_global_persistence_frontier(latest, TIMEOUT)
    frontier = pfoo_rpc_handle.get_global_persistence_frontier()
    node.say(f"global persistence frontier {show_version(frontier)}")
    node.check(frontier >= latest, "every version is on disk on every member")
    return node.finish(group)


if __name__ == "__main__":
    run(main)
