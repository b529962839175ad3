"""Foo and Bar on the same three nodes, Cache on the next three: a custom subgroup allocator.

The Python version of Derecho's ``overlapping_replicated_objects.cpp`` (the
user guide's "Defining Subgroup Membership" example). One process runs one
node::

    python derecho_core/examples/overlapping_replicated_objects.py --node ID [--SECTION/key=value ...]

or let ``derecho demo overlapping_replicated_objects`` start all six.

The allocator is a plain Python function ``(types, prev_view, curr_view)``
that returns ``{type: [[SubView per shard] per subgroup]}``. For Foo and Bar
it takes the first three members of the view (so the two subgroups are
co-resident), for Cache the next three; with fewer members it raises
``SubgroupProvisioningError`` and the group waits for more nodes.

The first Cache member asks every replica whether ``Ken`` is cached until all
say yes, then reads it with an ordered ``get``; the other two put
``Ken = Birman`` and ``Ken = Woodberry`` (the replicas agree on whichever is
ordered last). The second Cache member also reads Foo's state from a Foo
member with a p2p_send, as a non-member.
"""

from __future__ import annotations

from typing import Any

from _demo_common import TIMEOUT, Bar, Cache, Foo, run, start
from derecho_core import Group, SubgroupInfo, SubgroupProvisioningError

DEMO_NODES = 6


def overlapping_allocator(subgroup_type_order: Any, prev_view: Any, curr_view: Any) -> dict[Any, Any]:
    """The guide's membership function: Foo and Bar on members 0-2 of the view, Cache on members 3-5."""
    subgroup_allocation = {}
    for subgroup_type in subgroup_type_order:
        if subgroup_type in (Foo, Bar):
            # must have at least 3 nodes in the top-level group
            if curr_view.num_members < 3:
                raise SubgroupProvisioningError(f"Foo and Bar need 3 members, the view has {curr_view.num_members}")
            first_3_nodes = curr_view.members[0:3]
            # one subgroup with one shard: the desired SubView goes at subgroup_layout[0][0]
            subgroup_layout = [[curr_view.make_subview(first_3_nodes)]]
            # the first 3 nodes are assigned, unless next_unassigned_rank was already beyond them
            curr_view.next_unassigned_rank = max(curr_view.next_unassigned_rank, 3)
        else:  # subgroup_type is Cache
            # must have at least 6 nodes in the top-level group
            if curr_view.num_members < 6:
                raise SubgroupProvisioningError(f"Cache needs 6 members, the view has {curr_view.num_members}")
            next_3_nodes = curr_view.members[3:6]
            subgroup_layout = [[curr_view.make_subview(next_3_nodes)]]
            curr_view.next_unassigned_rank += 3
        subgroup_allocation[subgroup_type] = subgroup_layout
    return subgroup_allocation


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES)
    if node.nodes < 6:
        node.say("this example needs 6 nodes (Foo and Bar on the first three, Cache on the next three)")
        return 2

    subgroup_info = SubgroupInfo(overlapping_allocator)
    factories = {Foo: lambda registry, subgroup_id: Foo(-1)}
    group = Group([Foo, Bar, Cache], subgroup_info, factories=factories, conf=node.conf, join_timeout=120)
    node.say("Finished constructing/joining Group; members", group.get_members())

    my_id = group.get_my_id()
    foo_members = group.get_subgroup_members(Foo)[0]
    bar_members = group.get_subgroup_members(Bar)[0]
    cache_members = group.get_subgroup_members(Cache)[0]
    node.say(f"Foo members {foo_members}, Bar members {bar_members}, Cache members {cache_members}")
    node.check(foo_members == bar_members, "Foo and Bar live on the same nodes")
    node.check(not set(foo_members) & set(cache_members), "Cache lives on other nodes than Foo and Bar")

    # The C++ demo's readers sleep a second, or poll, while the writers write. Here the readers (the
    # third Foo/Bar member and the first Cache member) wait at a barrier that the writers reach once
    # their updates are delivered, so what they read is exact.
    is_reader = my_id in (foo_members[2], cache_members[0])
    if is_reader:
        group.barrier_sync(TIMEOUT)

    if my_id in foo_members:
        rank_in_foo_and_bar = foo_members.index(my_id)
        foo_rpc_handle = group.get_subgroup(Foo)
        bar_rpc_handle = group.get_subgroup(Bar)
        if rank_in_foo_and_bar == 0:
            node.say("Appending to Bar.")
            sent_nodes = bar_rpc_handle.ordered_send(Bar.append, "Write from 0...").get(TIMEOUT)
            node.say("Append delivered to nodes:", " ".join(str(n) for n in sent_nodes))
            node.say("Reading Foo's state just to allow node 1's message to be delivered")
            foo_rpc_handle.ordered_send(Foo.read_state).get(TIMEOUT)
        elif rank_in_foo_and_bar == 1:
            new_value = 3
            node.say(f"Changing Foo's state to {new_value}")
            results = foo_rpc_handle.ordered_send(Foo.change_state, new_value)
            replies = results.get(TIMEOUT)
            node.say("Got a reply map!")
            for reply_node, reply in replies.items():
                node.say(f"Reply from node {reply_node} was {str(reply.result(TIMEOUT)).lower()}")
            node.say("Appending to Bar")
            bar_rpc_handle.ordered_send(Bar.append, "Write from 1...").get(TIMEOUT)
        elif rank_in_foo_and_bar == 2:
            node.say("Reading Foo's state from the group")
            foo_results = node.replies(foo_rpc_handle.ordered_send(Foo.read_state))
            for reply_node, state in foo_results.items():
                node.say(f"Node {reply_node} says the state is: {state}")
            node.check(set(foo_results.values()) == {3}, f"every Foo replica's state is 3: {foo_results}")
            bar_rpc_handle.ordered_send(Bar.append, "Write from 2...").get(TIMEOUT)
            node.say("Printing log from Bar")
            bar_results = node.replies(bar_rpc_handle.ordered_send(Bar.print))
            for reply_node, log in bar_results.items():
                node.say(f"Node {reply_node} says the log is: {log}")
            logs = set(bar_results.values())
            node.check(len(logs) == 1 and all(f"Write from {r}..." in next(iter(logs)) for r in range(3)),
                       f"every Bar replica has the same log with all three writes: {bar_results}")
            node.say("Clearing Bar's log")
            bar_rpc_handle.ordered_send(Bar.clear).get(TIMEOUT)
    else:
        rank_in_cache = cache_members.index(my_id)
        cache_rpc_handle = group.get_subgroup(Cache)
        if rank_in_cache == 0:
            node.say("Waiting for a 'Ken' value to appear in the cache...")
            found = False
            while not found:
                results = cache_rpc_handle.ordered_send(Cache.contains, "Ken")
                # fold "and" over the replies to see if they are all true
                contains_accum = True
                for reply_node, reply in results.get(TIMEOUT).items():
                    contains_result = reply.result(TIMEOUT)
                    node.say(f"  Reply from node {reply_node}: {str(contains_result).lower()}")
                    contains_accum = contains_accum and contains_result
                found = contains_accum
            node.say("..found!")
            values = node.replies(cache_rpc_handle.ordered_send(Cache.get, "Ken"))
            for reply_node, value in values.items():
                node.say(f"Node {reply_node} had Ken = {value}")
            node.check(len(set(values.values())) == 1 and set(values.values()) <= {"Birman", "Woodberry"},
                       f"every Cache replica has the same value for Ken: {values}")
        elif rank_in_cache == 1:
            node.say("Putting Ken = Birman in the cache")
            # twice, as the C++ demo does, just to send more messages
            cache_rpc_handle.ordered_send(Cache.put, "Ken", "Birman")
            cache_rpc_handle.ordered_send(Cache.put, "Ken", "Birman").get(TIMEOUT)
            p2p_target = foo_members[2]
            node.say(f"Reading Foo's state from node {p2p_target}")
            p2p_foo_handle = group.get_nonmember_subgroup(Foo)
            foo_query = p2p_foo_handle.p2p_send(p2p_target, Foo.read_state)
            response = foo_query.get(TIMEOUT)[p2p_target].result(TIMEOUT)
            node.say(f"  Response: {response}")
            node.check(response in (-1, 3), f"Foo's state is -1 (initial) or 3, not {response!r}")
        elif rank_in_cache == 2:
            node.say("Putting Ken = Woodberry in the cache")
            cache_rpc_handle.ordered_send(Cache.put, "Ken", "Woodberry")
            cache_rpc_handle.ordered_send(Cache.put, "Ken", "Woodberry").get(TIMEOUT)
    if not is_reader:
        group.barrier_sync(TIMEOUT)  # the writers' updates are delivered: let the readers go

    return node.finish(group)


if __name__ == "__main__":
    run(main)
