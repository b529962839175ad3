"""The simulated cluster: nodes running the real membership protocol on a virtual network and clock."""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from ..protocol import events as ev
from ..protocol.membership import Membership
from ..protocol.multicast import ShardParams
from ..protocol.node import Deliver, NodeProtocol, SendRejected, SendRequest
from ..view import IpAndPorts, View
from .invariants import Checker

log = logging.getLogger("derecho.sim")


@dataclass
class SimParams:
    heartbeat_ms: float = 20.0
    suspicion_timeout_ms: float = 200.0
    min_delay_ms: float = 0.05
    max_delay_ms: float = 4.0
    #: after a crash, how soon a peer's transport reports the broken connection (None: never; a hung node)
    reset_detect_ms: tuple[float, float] = (1.0, 30.0)
    partition_safety: bool = True
    #: a cut link breaks (both ends told the peer is unreachable) after this long, like a TCP timeout
    link_timeout_ms: float = 600.0
    #: multicast traffic: None (membership only), or "ordered" / "raw"
    traffic: str | None = None
    #: payload size of the generated messages; above max_smc they travel by RDMC
    message_size: int = 64
    send_interval_ms: float = 25.0
    max_smc_payload_size: int = 512
    block_size: int = 256
    window_size: int = 8
    rdmc_send_algorithm: str = "binomial_send"


@dataclass
class SimNode:
    node_id: int
    address: IpAndPorts
    proto: Membership
    alive: bool = True
    incarnation: int = 0
    views: list[View] = field(default_factory=list)
    stop: ev.Stop | None = None
    node: NodeProtocol | None = None
    sent: int = 0


class Cluster:
    """A set of simulated nodes. Everything random comes from ``seed``."""

    def __init__(self, seed: int, params: SimParams | None = None,
                 allocate_factory: Callable[[], Any] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.params = params or SimParams()
        self.allocate_factory = allocate_factory
        self.now = 0.0
        self.nodes: dict[int, SimNode] = {}
        self.by_gms: dict[tuple[str, int], int] = {}
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._link_clock: dict[tuple[Any, Any], float] = {}
        #: pairs of node ids that cannot talk (both directions)
        self.cut: set[frozenset[int]] = set()
        self._cut_epoch: dict[frozenset[int], int] = {}
        #: member messages waiting for a heal, per (src, dst), with their send order
        self._held: dict[tuple[int, int], list[tuple[int, Callable[[], None]]]] = {}
        #: (src, src incarnation, dst, dst incarnation) whose connection timed out
        self._broken: set[tuple[int, int, int, int]] = set()
        self.checker = Checker(self)
        self.traffic_on = True
        self.trace: list[str] = []
        self.steps = 0

    # ------------------------------------------------------------------ scheduling
    def at(self, time: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (time, next(self._seq), fn))

    def run_until(self, time: float) -> None:
        while self._queue and self._queue[0][0] <= time:
            t, _, fn = heapq.heappop(self._queue)
            self.now = max(self.now, t)
            fn()
            self.steps += 1
        self.now = max(self.now, time)

    # ------------------------------------------------------------------ nodes
    def _address(self, node_id: int) -> IpAndPorts:
        # distinct loopback-style addresses; never used for real traffic
        return IpAndPorts(f"10.99.{node_id // 256}.{node_id % 256}", 1000 + node_id, 2000 + node_id, 3000 + node_id, 4000 + node_id,
                          5000 + node_id)

    def _new_proto(self, node_id: int, incarnation: int) -> Membership:
        if self.allocate_factory:
            allocate = self.allocate_factory()
        elif self.params.traffic:
            allocate = _one_shard(self.params.traffic)
        else:
            allocate = None
        return Membership(node_id, self._address(node_id), heartbeat_ms=self.params.heartbeat_ms,
                          suspicion_timeout_ms=self.params.suspicion_timeout_ms,
                          partition_safety=self.params.partition_safety, allocate=allocate,
                          nonce=(node_id << 20) + incarnation + 1, subgroup_type_order=["sim"])

    def _shard_params(self, profile: str) -> ShardParams:
        p = self.params
        return ShardParams(window_size=p.window_size, max_payload_size=max(p.message_size, 1 << 16),
                           max_smc_payload_size=p.max_smc_payload_size, block_size=p.block_size,
                           rdmc_send_algorithm=p.rdmc_send_algorithm)

    def start_leader(self, node_id: int) -> None:
        node = self._add(node_id)
        assert node.node is not None
        self._perform(node, node.node.start_new_group(self.now))

    def start_joiner(self, node_id: int, contact: int) -> None:
        node = self._add(node_id)
        assert node.node is not None
        target = self.nodes[contact].address
        self._perform(node, node.node.start_join((target.ip_address, target.gms_port), self.now))

    def _send_traffic(self, node_id: int, incarnation: int) -> None:
        node = self.nodes.get(node_id)
        if node is None or node.incarnation != incarnation or not node.alive or node.stop is not None:
            return
        if self.traffic_on and node.proto.view is not None and node.node is not None \
                and node.node.multicast is not None:
            node.sent += 1
            msg_id = f"{node_id}:{incarnation}:{node.sent}"
            payload = msg_id.encode().ljust(self.params.message_size, b".")
            self.checker.on_submit(node, msg_id)
            self._deliver(node, SendRequest(0, payload, False, int(self.now * 1e6), msg_id))
        self.at(self.now + self.params.send_interval_ms * (0.5 + self.rng.random()),
                lambda: self._send_traffic(node_id, incarnation))

    def _add(self, node_id: int) -> SimNode:
        old = self.nodes.get(node_id)
        incarnation = old.incarnation + 1 if old else 0
        if old is not None and old.alive and old.stop is None:
            raise RuntimeError(f"node {node_id} is still running")
        proto = self._new_proto(node_id, incarnation)
        node = SimNode(node_id, self._address(node_id), proto, incarnation=incarnation,
                       node=NodeProtocol(proto, self._shard_params))
        if self.params.traffic:
            self.at(self.now + self.rng.uniform(0, self.params.send_interval_ms),
                    lambda: self._send_traffic(node_id, incarnation))
        self.nodes[node_id] = node
        self.by_gms[(node.address.ip_address, node.address.gms_port)] = node_id
        self.trace.append(f"{self.now:9.2f} start node {node_id} (incarnation {incarnation})")
        return node

    def crash(self, node_id: int, hung: bool = False) -> None:
        """Kill a node. Unless ``hung``, its peers' transports notice the broken connections."""
        node = self.nodes[node_id]
        if not node.alive:
            return
        node.alive = False
        self.trace.append(f"{self.now:9.2f} crash node {node_id}{' (hung)' if hung else ''}")
        if hung:
            return
        view = node.proto.view
        if view is None:
            return
        for peer in view.members:
            if peer != node_id:
                delay = self.rng.uniform(*self.params.reset_detect_ms)
                self.at(self.now + delay, lambda p=peer, inc=node.incarnation: self._notify_reset(p, node_id, inc))

    def _notify_reset(self, peer: int, failed: int, incarnation: int) -> None:
        target = self.nodes.get(peer)
        if target is None or not target.alive or frozenset((peer, failed)) in self.cut:
            return
        if self.nodes[failed].incarnation != incarnation:
            return
        self._deliver(target, ev.PeerUnreachable(failed, "connection reset"))

    def partition(self, side: set[int]) -> None:
        """Cut every link between ``side`` and the rest.

        Like TCP: member-to-member messages are held (retransmitted) while the
        cut lasts and arrive in order after a heal; a cut longer than the
        transport's timeout breaks the connection, and both ends' transports
        report the peer unreachable. GMS-channel messages are simply lost.
        """
        others = set(self.nodes) - side
        for a in side:
            for b in others:
                pair = frozenset((a, b))
                if pair not in self.cut:
                    self.cut.add(pair)
                    epoch = self._cut_epoch[pair] = self._cut_epoch.get(pair, 0) + 1
                    self.at(self.now + self.params.link_timeout_ms,
                            lambda pair=pair, epoch=epoch: self._break_link(pair, epoch))
        self.trace.append(f"{self.now:9.2f} partition {sorted(side)} | {sorted(others)}")

    def heal(self) -> None:
        self.cut.clear()
        self.trace.append(f"{self.now:9.2f} heal")
        held, self._held = self._held, {}
        for (src, dst), items in sorted(held.items()):
            for _, arrive in sorted(items, key=lambda item: item[0]):
                key = ("held", src, dst)
                when = max(self.now + self.rng.uniform(self.params.min_delay_ms, self.params.max_delay_ms),
                           self._link_clock.get(key, 0.0) + 1e-6)
                self._link_clock[key] = when
                self.at(when, arrive)

    def _break_link(self, pair: frozenset[int], epoch: int) -> None:
        if pair not in self.cut or self._cut_epoch.get(pair) != epoch:
            return
        a, b = sorted(pair)
        for src, dst in ((a, b), (b, a)):
            self._held.pop((src, dst), None)
            s, d = self.nodes.get(src), self.nodes.get(dst)
            if s is not None and d is not None:
                self._broken.add((src, s.incarnation, dst, d.incarnation))
        self.trace.append(f"{self.now:9.2f} connection {a}-{b} times out")
        for me, other in ((a, b), (b, a)):
            node = self.nodes.get(me)
            if node is not None:
                self._deliver(node, ev.PeerUnreachable(other, "connection timed out"))

    # ------------------------------------------------------------------ running protocol code
    def _deliver(self, node: SimNode, event: ev.Event) -> None:
        if node.alive and node.stop is not None and node.stop.kind == "left" and isinstance(event, ev.Received) \
                and bytes(event.data[:1]) == b"M":
            # a leaving engine keeps reading membership messages until the others saw its departure
            node.proto.handle(ev.Received(event.node_id, bytes(event.data[1:])), self.now)
            return
        if not node.alive or node.stop is not None:
            return
        assert node.node is not None
        actions = node.node.handle(event, self.now)
        self._perform(node, actions)

    def _perform(self, node: SimNode, actions: list[ev.Action]) -> None:
        for action in actions:
            if isinstance(action, ev.Send):
                data = b"".join(bytes(b) for b in action.data) if isinstance(action.data, tuple) else action.data
                self._transmit(node, ("node", action.node_id), action.node_id, data, member=True)
            elif isinstance(action, ev.SendToAddress):
                dst = self.by_gms.get(action.address)
                if dst is not None:
                    self._transmit(node, ("gms", dst), dst, action.data, member=False)
            elif isinstance(action, ev.InstallView):
                node.views.append(action.view)
                self.trace.append(f"{self.now:9.2f} node {node.node_id} installs view {action.view.vid} "
                                  f"{action.view.members}")
                self.checker.on_install(node, action.view)
            elif isinstance(action, ev.Stop):
                node.stop = action
                self.trace.append(f"{self.now:9.2f} node {node.node_id} stops: {action.kind}: {action.reason}")
                self.checker.on_stop(node, action)
            elif isinstance(action, Deliver):
                self.checker.on_deliver(node, action.delivery)
            elif isinstance(action, SendRejected):
                self.checker.on_rejected(node, action.tag, action.error)
            elif isinstance(action, ev.Log):
                if log.isEnabledFor(action.level):
                    log.log(action.level, f"[t={self.now:.2f}] " + action.message, *action.args)
        self.checker.after_step()
        if node.alive and node.stop is None:
            assert node.node is not None
            deadline = node.node.next_deadline()
            if deadline != float("inf"):
                inc = node.incarnation
                self.at(max(deadline, self.now + 0.001), lambda: self._tick(node.node_id, inc))

    def _tick(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.incarnation != incarnation:
            return
        # coalesce: only tick when the protocol's deadline has come
        if node.proto.next_deadline() <= self.now + 1e-9:
            self._deliver(node, ev.Tick())

    def _transmit(self, src: SimNode, channel: tuple[str, int], dst: int, data: bytes, member: bool) -> None:
        pair = frozenset((src.node_id, dst))
        sender, inc = src.node_id, src.incarnation
        target_node = self.nodes.get(dst)
        if member and target_node is not None and (sender, inc, dst, target_node.incarnation) in self._broken:
            return  # that connection timed out during a partition; it is gone
        if not member and pair in self.cut:
            return  # a short GMS exchange simply fails; joiners retry
        seq = next(self._seq)

        def arrive() -> None:
            target = self.nodes.get(dst)
            s = self.nodes.get(sender)
            if target is None or s is None:
                return
            if member and s.incarnation != inc:
                return  # the connection of a dead incarnation is gone
            if member and (sender, inc, dst, target.incarnation) in self._broken:
                return
            if pair in self.cut or (member and self._held.get((sender, dst))):
                if member:
                    self._held.setdefault((sender, dst), []).append((seq, arrive))  # retransmitted after a heal
                return
            self._deliver(target, ev.Received(sender, data) if member else ev.ReceivedAtAddress(data))

        if member and (pair in self.cut or self._held.get((sender, dst))):
            self._held.setdefault((sender, dst), []).append((seq, arrive))
            return
        key = (src.node_id, src.incarnation, channel)
        delay = self.rng.uniform(self.params.min_delay_ms, self.params.max_delay_ms)
        when = max(self.now + delay, self._link_clock.get(key, 0.0) + 1e-6)  # FIFO per link
        self._link_clock[key] = when
        self.at(when, arrive)

    # ------------------------------------------------------------------ inspection
    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.stop is None]

    def replay_command(self) -> str:
        cmd = f"python -m derecho_core.sim --seed {self.seed}"
        p = self.params
        if p.traffic:
            cmd += f" --traffic {p.traffic} --size {p.message_size} --algorithm {p.rdmc_send_algorithm}"
        if not p.partition_safety:
            cmd += " --no-partition-safety"
        return cmd


def _one_shard(mode: str) -> Any:
    """Allocator of the traffic runs: one subgroup, one shard of every member, all senders."""
    from ..view import Mode, SubView

    def allocate(prev: Any, view: View) -> Any:
        sv = SubView(view.members, Mode.ORDERED if mode == "ordered" else Mode.UNORDERED)
        sv.init_joined_departed(prev.subgroup_shard_views[0][0] if prev is not None and prev.subgroup_shard_views
                                else None)
        view.subgroup_type_order = ["sim"]
        view.subgroup_ids_by_type_id = [[0]]
        view.subgroup_shard_views = [[sv]]
        view.next_unassigned_rank = view.num_members
        view.refresh_my_subgroups()
        return {"sim": [[sv]]}

    return allocate
