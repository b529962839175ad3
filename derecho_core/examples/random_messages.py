"""A raw subgroup of every node: each sends messages of random letters with send(), all count deliveries.

The Python version of Derecho's ``random_messages.cpp``. One process runs
one node::

    python derecho_core/examples/random_messages.py --node ID [--nodes N] [--unordered] [--SECTION/key=value ...]

or ``derecho demo random_messages`` for three local nodes.

The group holds one subgroup of the stateless type ``RawObject``: one shard
of all N nodes (the group waits for all of them). A raw subgroup carries bytes,
not RPC calls: ``group.get_subgroup(RawObject).send(payload)`` multicasts a
payload, and every member is handed each delivered message by the
``global_stability_callback`` of its ``UserMessageCallbacks``. Each node sends
10 messages of 10 random lowercase letters, then a 1-byte message that says it
is done; a node is finished when it has the done message of every sender.

The shard is ORDERED by default, as in the C++ demo (every node delivers the
messages in the same order, each with a version); ``--unordered`` makes it a
raw (UNORDERED) shard, ``raw_fixed_even_shards``: each message is delivered
when it arrives, in per-sender order, with version -1.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import threading

from _demo_common import TIMEOUT, run, start
from derecho_allocators import DefaultSubgroupAllocator, fixed_even_shards, one_subgroup_policy, raw_fixed_even_shards
from derecho_core import Group, RawObject, SubgroupInfo, UserMessageCallbacks

DEMO_NODES = 3

NUM_MSGS = 10
MSG_SIZE = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unordered", action="store_true",
                        help="a raw (UNORDERED) shard instead of an ORDERED one")


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES, add_arguments=add_arguments)
    num_nodes = node.nodes

    # 'done' tracks the end of the test: every sender's 1-byte message has arrived
    done = threading.Event()
    finished_nodes: set[int] = set()
    received: dict[int, list[bytes]] = {}
    delivery_order = hashlib.sha256()

    def stability_callback(subgroup: int, sender_id: int, index: int, data: memoryview, version: int) -> None:
        """Called for each delivered message (on the delivery thread, in delivery order)."""
        delivery_order.update(f"{sender_id}:{index};".encode())
        # the terminal message is of size 1: the sender has finished sending
        if len(data) == 1:
            finished_nodes.add(sender_id)
            if len(finished_nodes) == num_nodes:
                done.set()
            return
        received.setdefault(sender_id, []).append(bytes(data))
        node.say(f"sender id {sender_id}: {bytes(data).decode()} (index {index}, version {version})")

    # Use the standard layout manager: a single subgroup with a single shard of all the nodes
    shards = raw_fixed_even_shards(1, num_nodes) if node.args.unordered else fixed_even_shards(1, num_nodes)
    one_raw_group = SubgroupInfo(DefaultSubgroupAllocator({RawObject: one_subgroup_policy(shards)}))

    group = Group([RawObject], one_raw_group, conf=node.conf,
                  callbacks=UserMessageCallbacks(global_stability_callback=stability_callback), join_timeout=120)
    node.say("Finished constructing/joining Group")
    node.say("The order of members is:", " ".join(str(m) for m in group.get_members()))

    raw_subgroup = group.get_subgroup(RawObject)
    rng = random.Random()
    for _ in range(NUM_MSGS):
        # message content is generated at random
        raw_subgroup.send(bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(MSG_SIZE)))
    # send a 1-byte message to signal completion
    raw_subgroup.send(b"\0")

    # wait for delivery of all messages
    if not done.wait(TIMEOUT):
        raise TimeoutError(f"only {sorted(finished_nodes)} of {num_nodes} senders finished within {TIMEOUT} s")
    total = sum(len(msgs) for msgs in received.values())
    node.say(f"received {total} messages from {len(received)} senders: "
             + ", ".join(f"{s}: {len(m)}" for s, m in sorted(received.items())))
    node.check(total == NUM_MSGS * num_nodes and all(len(m) == NUM_MSGS for m in received.values()),
               f"{NUM_MSGS} messages from each of the {num_nodes} senders")
    node.check(all(len(msg) == MSG_SIZE and msg.isalpha() for msgs in received.values() for msg in msgs),
               f"every message is {MSG_SIZE} letters")
    if not node.args.unordered:
        # ORDERED: every node delivered the same messages in the same order
        node.say(f"delivery order digest {delivery_order.hexdigest()[:16]}")
    # wait for all nodes to be done
    return node.finish(group)


if __name__ == "__main__":
    run(main)
