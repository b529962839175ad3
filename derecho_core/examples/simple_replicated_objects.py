"""Foo, Bar and Cache replicated on six nodes: ordered_send, reply maps, and p2p_send from a non-member.

The Python version of Derecho's ``simple_replicated_objects.cpp`` and of the
user guide's Cache example. One process runs one node::

    python derecho_core/examples/simple_replicated_objects.py --node ID [--SECTION/key=value ...]

or let ``derecho demo simple_replicated_objects`` start all six on this machine.

Layout (the default subgroup allocator, one subgroup of one shard of three
nodes per type): Foo and Bar both live on nodes 0, 1 and 2 (their shards
reserve those node ids, so the two subgroups overlap, as in
``simple_replicated_objects_overlap.cpp``); Cache takes the next three nodes,
3, 4 and 5. The group waits until all six have joined.

Phase 1, updates: the Foo/Bar members change Foo's state and append to Bar's
log; two Cache members put keys. Every sender waits for its call's reply map
(the call is then delivered), and everyone meets at ``barrier_sync``.
Phase 2, reads: ordered reads of Foo, Bar and Cache (every ``contains`` reply
must be true), and p2p reads by non-members: node 0 asks a Cache member for
``get("Ken")``, node 4 asks a Foo member for Foo's state.
"""

from __future__ import annotations

from _demo_common import TIMEOUT, Bar, Cache, Foo, run, start
from derecho_allocators import (
    DefaultSubgroupAllocator,
    custom_shards_policy,
    fixed_even_shards,
    one_subgroup_policy,
)
from derecho_core import Group, SubgroupInfo

DEMO_NODES = 6


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES)
    if node.nodes < 6:
        node.say("this example needs 6 nodes (Foo and Bar on nodes 0-2, Cache on the next three)")
        return 2

    # Each type gets one subgroup with one shard of three members. Foo's and Bar's shards reserve
    # node ids 0, 1 and 2, so both subgroups sit on those nodes; Cache takes the next three.
    foo_and_bar_nodes = custom_shards_policy([3], [3], reserved_node_ids_by_shard=[{0, 1, 2}])
    subgroup_function = SubgroupInfo(DefaultSubgroupAllocator({
        Foo: one_subgroup_policy(foo_and_bar_nodes),
        Bar: one_subgroup_policy(foo_and_bar_nodes),
        Cache: one_subgroup_policy(fixed_even_shards(1, 3)),
    }))
    # A factory supplies each object's initial state; it gets the PersistentRegistry and the
    # subgroup id, which these objects do not need.
    factories = {Foo: lambda registry, subgroup_id: Foo(-1)}

    group = Group([Foo, Bar, Cache], subgroup_function, factories=factories, conf=node.conf,
                  join_timeout=120)
    node.say("Finished constructing/joining Group; members", group.get_members())

    my_id = group.get_my_id()
    foo_members = group.get_subgroup_members(Foo)[0]
    bar_members = group.get_subgroup_members(Bar)[0]
    cache_members = group.get_subgroup_members(Cache)[0]
    node.say(f"Foo members {foo_members}, Bar members {bar_members}, Cache members {cache_members}")

    # ---------------------------------------------------------------- phase 1: updates
    if my_id in foo_members:
        rank = foo_members.index(my_id)
        foo_rpc_handle = group.get_subgroup(Foo)
        bar_rpc_handle = group.get_subgroup(Bar)
        if rank in (0, 1):
            new_value = 1 if rank == 0 else 3
            node.say(f"Changing Foo's state to {new_value}")
            results = foo_rpc_handle.ordered_send(Foo.change_state, new_value)
            replies = results.get(TIMEOUT)
            node.say("Got a reply map!")
            for reply_node, reply in replies.items():
                node.say(f"Reply from node {reply_node} was {str(reply.result(TIMEOUT)).lower()}")
            node.check(sorted(replies) == sorted(foo_members), "the reply map holds every Foo member")
        node.say("Appending to Bar")
        sent_nodes = bar_rpc_handle.ordered_send(Bar.append, f"Write from {rank}...").get(TIMEOUT)
        node.say("Append delivered to nodes:", " ".join(str(n) for n in sent_nodes))
    elif my_id in cache_members:
        rank = cache_members.index(my_id)
        cache_rpc_handle = group.get_subgroup(Cache)
        if rank == 0:
            node.say("Putting Ken = Birman in the cache")
            cache_rpc_handle.ordered_send(Cache.put, "Ken", "Birman").get(TIMEOUT)
        elif rank == 1:
            node.say("Putting Derecho = Cornell in the cache")
            cache_rpc_handle.ordered_send(Cache.put, "Derecho", "Cornell").get(TIMEOUT)

    # every update above is delivered (its sender saw the reply map) before anyone reads
    group.barrier_sync(TIMEOUT)

    # ---------------------------------------------------------------- phase 2: reads
    if my_id in foo_members:
        rank = foo_members.index(my_id)
        if rank == 0:
            # Node 0 is not in the Cache subgroup: a p2p_send through a non-member handle.
            p2p_target = cache_members[0]
            node.say(f"Reading Ken from the Cache on node {p2p_target}")
            p2p_cache_handle = group.get_nonmember_subgroup(Cache)
            response = p2p_cache_handle.p2p_send(p2p_target, Cache.get, "Ken").get(TIMEOUT)[p2p_target]
            value = response.result(TIMEOUT)
            node.say(f"  Response: Ken = {value}")
            node.check(value == "Birman", f"p2p get('Ken') gives 'Birman', not {value!r}")
        elif rank == 2:
            foo_rpc_handle = group.get_subgroup(Foo)
            node.say("Reading Foo's state from the group")
            states = node.replies(foo_rpc_handle.ordered_send(Foo.read_state))
            for reply_node, state in states.items():
                node.say(f"Node {reply_node} says the state is: {state}")
            node.check(len(set(states.values())) == 1 and set(states.values()) <= {1, 3},
                       f"every Foo replica has the same state, 1 or 3: {states}")
            bar_rpc_handle = group.get_subgroup(Bar)
            node.say("Printing log from Bar")
            logs = node.replies(bar_rpc_handle.ordered_send(Bar.print))
            for reply_node, log in logs.items():
                node.say(f"Node {reply_node} says the log is: {log}")
            some_log = next(iter(logs.values()))
            node.check(len(set(logs.values())) == 1 and all(f"Write from {r}..." in some_log for r in range(3)),
                       f"every Bar replica has the same log with all three writes: {logs}")
            node.say("Clearing Bar's log")
            bar_rpc_handle.ordered_send(Bar.clear).get(TIMEOUT)
    else:
        rank = cache_members.index(my_id)
        cache_rpc_handle = group.get_subgroup(Cache)
        if rank == 1:
            # The second Cache member is not in the Foo subgroup: read Foo's state from its last member.
            p2p_target = foo_members[2]
            node.say(f"Reading Foo's state from node {p2p_target}")
            p2p_foo_handle = group.get_nonmember_subgroup(Foo)
            response = p2p_foo_handle.p2p_send(p2p_target, Foo.read_state).get(TIMEOUT)[p2p_target].result(TIMEOUT)
            node.say(f"  Response: {response}")
            node.check(response in (1, 3), f"Foo's state is 1 or 3, not {response!r}")
        elif rank == 2:
            node.say("Checking that every replica contains Ken")
            results = cache_rpc_handle.ordered_send(Cache.contains, "Ken")
            contains_accum = True
            for reply_node, reply in results.get(TIMEOUT).items():
                contains_result = reply.result(TIMEOUT)
                node.say(f"  contains reply from node {reply_node}: {str(contains_result).lower()}")
                contains_accum = contains_accum and contains_result
            node.say(f"Every replica contains Ken: {str(contains_accum).lower()}")
            node.check(contains_accum, "every contains('Ken') reply is true")

    return node.finish(group)


if __name__ == "__main__":
    run(main)
