"""An external client: a process outside the group calls the Cache by p2p_send and gets notifications.

The Python version of Derecho's ``external_client`` demo. Nodes 0 to N-2 are
members with a Cache subgroup (one shard of all of them); the last node is not
a member: it runs an ``ExternalGroupClient``::

    python derecho_core/examples/external_client.py --node ID [--nodes N] [--SECTION/key=value ...]

or ``derecho demo external_client`` for three members and the client.

1. The members put two entries in the Cache by ordered_send.
2. The client fetches the view from node 0's external port, lists the Cache
   shard, and reads an entry from every member by ``p2p_send``.
3. A member notifies the client, which prints the notification.
4. The client refreshes its view (``update_view``), tells every member it is
   done, and the members leave together.
"""

from __future__ import annotations

import os
import threading
import time

from _demo_common import TIMEOUT, Cache, Node, run, start
from derecho_allocators import DefaultSubgroupAllocator, fixed_even_shards, one_subgroup_policy
from derecho_core import ExternalGroupClient, Group, SubgroupInfo, p2p

DEMO_NODES = 4


class ClientCache(Cache):
    """The Cache plus a way for the client to say it has finished."""

    def __init__(self) -> None:
        super().__init__()
        self.client_done = threading.Event()

    def __getstate__(self) -> dict[str, object]:
        return {"cache_map": self.cache_map}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]
        self.cache_map.update(state["cache_map"])  # type: ignore[call-overload]

    @p2p
    def done(self) -> bool:
        self.client_done.set()
        return True


def contact_external_port(node_conf_port: int) -> int:
    """Node 0's external port: ``derecho demo`` lists every node's; by hand, pass --contact-external-port."""
    listed = os.environ.get("DERECHO_DEMO_EXTERNAL_PORTS")
    return int(listed.split(",")[0]) if listed else node_conf_port


def main() -> int:
    node = start(__doc__.splitlines()[0], default_nodes=DEMO_NODES, add_arguments=lambda p: p.add_argument(
        "--contact-external-port", type=int, default=None, help="node 0's DERECHO/external_port"))
    members = node.nodes - 1
    layout = SubgroupInfo(DefaultSubgroupAllocator({ClientCache: one_subgroup_policy(fixed_even_shards(1, members))}))
    if node.id == members:
        return client(node, members)
    group = Group([ClientCache], layout, conf=node.conf)
    node.say("Finished constructing/joining Group; members", group.get_members())
    cache = group.get_subgroup(ClientCache)
    if node.id == 0:
        node.replies(cache.ordered_send("put", "Ken", "Birman"))
        node.replies(cache.ordered_send("put", "Derecho", "Cornell"))
        node.say("put Ken and Derecho in the cache")
    callback = group.get_client_callback(ClientCache)
    obj = cache.get_ref()
    deadline = time.monotonic() + 4 * TIMEOUT
    notified = False
    while not obj.client_done.wait(0.05) and time.monotonic() < deadline:
        if node.id == 0 and not notified and callback.has_external_client(members):
            callback.notify(members, {"from": node.id, "text": "the cache holds 2 entries"})
            notified = True
    node.check(obj.client_done.is_set(), "the client said it was done")
    return node.finish(group)


def client(n: Node, members: int) -> int:
    port = n.args.contact_external_port or contact_external_port(n.conf.get("DERECHO/external_port"))
    contact = (n.conf.get("DERECHO/contact_ip"), port)
    got_notification = threading.Event()
    deadline = time.monotonic() + TIMEOUT
    while True:  # the members may still be forming the group
        try:
            ext = ExternalGroupClient([ClientCache], n.conf, contact=contact)
            if ext.get_view().is_adequately_provisioned and len(ext.get_members()) == members:
                break
            ext.close()
        except Exception:  # the members are not up yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
    with ext:
        n.say("external client: view", ext.get_view().vid, "members", ext.get_members())
        shard = ext.get_subgroup_members(ClientCache)[0]
        n.say("Cache shard members:", shard)
        caller = ext.get_subgroup_caller(ClientCache)

        def on_notify(message: object) -> None:
            n.say("notification:", message)
            got_notification.set()

        caller.register_notification_handler(on_notify)
        deadline = time.monotonic() + TIMEOUT
        for member in shard:
            while True:
                value = caller.p2p_send(member, "get", "Ken").get(TIMEOUT)[member].result(TIMEOUT)
                if value or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # node 0's put may not be delivered yet
            n.say(f"p2p_send get('Ken') to node {member}: {value}")
            n.check(value == "Birman", f"node {member} answers Birman")
        n.check(got_notification.wait(TIMEOUT), "a member's notification arrived")
        view = ext.update_view()
        n.say("refreshed view", view.vid, "members", list(view.members))
        for member in shard:
            caller.p2p_send(member, "done").get(TIMEOUT)[member].result(TIMEOUT)
    status = 1 if n.failures else 0
    n.say("done:", "every check passed" if not status else f"{len(n.failures)} check(s) failed")
    return status


if __name__ == "__main__":
    run(main)
