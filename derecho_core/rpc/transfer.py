"""State transfer inside a view change: the RPC layer's side of :mod:`derecho_core.state_transfer`.

Runs on the delivery thread while it installs a view, so no update touches an
object while it is being shipped. Outgoing transfers run in threads (a node
may have to send one shard's state while it receives another's, and two nodes
doing that to each other must not wait on each other); the delivery thread
waits for them before it delivers anything of the new view.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ..errors import DerechoError
from ..view import View

if TYPE_CHECKING:
    from .manager import RpcManager, SubgroupObject

log = logging.getLogger("derecho.state_transfer")

#: a wait (connect, or one frame) longer than this fails the transfer: the peer is gone
TRANSFER_TIMEOUT_S = 60.0


def _address(view: View, node_id: int) -> tuple[str, int]:
    rank = view.rank_of(node_id)
    addr = view.member_ips_and_ports[rank] if rank >= 0 else None
    if addr is None:
        raise DerechoError(f"view {view.vid} has no address for node {node_id}")
    return addr.ip_address, addr.state_transfer_port


class Outgoing:
    """The transfers this node sends in one view change; ``join`` waits for all of them."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self, manager: RpcManager, view: View, holder: SubgroupObject, joiner: int) -> None:
        from .. import state_transfer

        address = _address(view, joiner)
        upto = holder.latest_version

        def run() -> None:
            try:
                sent = state_transfer.send_state(
                    address, view.vid, holder.subgroup_id, manager.my_id, holder.obj, _registry(holder), upto,
                    manager.group._engine.key, TRANSFER_TIMEOUT_S, serializer=manager.serializer.kind)
                log.info("sent the state of subgroup %d (up to version %d, %d bytes) to node %d",
                         holder.subgroup_id, upto, sent, joiner)
                manager.transfers.append({"to": joiner, "subgroup": holder.subgroup_id, "vid": view.vid,
                                          "bytes": sent, "upto": upto})
            except Exception as exc:
                # the joiner failing is the membership layer's business; the group carries on without it
                self.errors.append(f"node {joiner}: {exc}")
                log.warning("state transfer of subgroup %d to node %d failed: %s", holder.subgroup_id, joiner, exc)

        t = threading.Thread(target=run, name=f"state-transfer-{holder.subgroup_id}-to-{joiner}", daemon=True)
        t.start()
        self.threads.append(t)

    def join(self) -> None:
        for t in self.threads:
            t.join()


def receive(manager: RpcManager, view: View, holder: SubgroupObject, leader: int) -> int:
    """Receive a shard's state from its old leader; returns the latest version it reflects."""
    server = manager.group._state_server
    if server is None:
        raise DerechoError("state transfer needs the state-transfer listener, which is not running")
    log.info("node %d receives the state of subgroup %d from node %d", manager.my_id, holder.subgroup_id, leader)
    registry = _registry(holder)
    server.expect(view.vid, holder.subgroup_id, holder.obj, registry, TRANSFER_TIMEOUT_S)
    manager.transfers.append({"from": leader, "subgroup": holder.subgroup_id, "vid": view.vid})
    # every version of earlier views is now reflected here: versions are (vid << 32) | seq
    version = (view.vid << 32) - 1
    if registry is not None:
        version = max(registry.get_current_version(), -1)
    return version


def _registry(holder: SubgroupObject) -> Any:
    """The registry to ship, or None for an object without Persistent fields (its state is the snapshot)."""
    return holder.registry if holder.registry is not None and holder.registry.fields else None
