"""Random fault schedules for the simulator, each fully determined by its seed.

A scenario starts 3 to 7 nodes, lets them form a group, then during a fault
window crashes nodes (some hung rather than reset), crashes the leader in the
middle of a view change, adds joiners, restarts crashed nodes under their old
ids, and cuts a minority off and heals it. Faults only ever hit a fixed
minority of the initial nodes, so a majority always stays alive and connected.
After the window the run settles and every live node must have installed the
same view holding exactly the live nodes.
"""

from __future__ import annotations

import random
from typing import Callable
from dataclasses import dataclass, field

from .cluster import Cluster, SimParams
from .invariants import InvariantViolation


@dataclass
class ScenarioResult:
    seed: int
    nodes: int
    faults: list[str] = field(default_factory=list)
    final_vid: int = 0
    final_members: list[int] = field(default_factory=list)
    steps: int = 0
    virtual_ms: float = 0.0
    views_installed: int = 0
    settle_ms: float = 0.0
    deliveries: int = 0


def run_scenario(seed: int, params: SimParams | None = None, *, fault_window_ms: float | None = None,
                 settle_ms: float = 8000.0) -> ScenarioResult:
    """Run one seeded scenario; raises :class:`InvariantViolation` on any broken guarantee."""
    plan = random.Random(seed * 7919 + 1)
    cluster = Cluster(seed, params)
    if fault_window_ms is None:
        fault_window_ms = 1500.0 if cluster.params.traffic else 3000.0
    n = plan.randint(3, 7)
    result = ScenarioResult(seed, n)

    # ---- formation: node 0 leads, the others join through it
    cluster.start_leader(0)
    t = 0.0
    for node in range(1, n):
        t += plan.uniform(1, 30)
        cluster.at(t, lambda node=node: cluster.start_joiner(node, 0))
    formed_by = t + 3000
    while cluster.now < formed_by:
        cluster.run_until(min(formed_by, max(cluster.now, t) + 50))
        views = [x.proto.view for x in cluster.live()]
        if cluster.now > t and all(v is not None and v.num_members == n for v in views) \
                and len({v.vid for v in views if v is not None}) == 1:
            break
    cluster.checker.check_converged(set(range(n)))

    # ---- faults
    budget = (n - 1) // 2
    kinds = ["crash", "hung", "leader_mid_change", "join", "restart", "partition"]
    chosen = [plan.choice(kinds) for _ in range(plan.randint(1, 4))]
    faultable = plan.sample(range(n), budget)
    if "leader_mid_change" in chosen and 0 not in faultable:
        faultable[0] = 0  # the first leader must be crashable for this fault
    safe = [x for x in range(n) if x not in faultable]
    start = cluster.now
    next_new_id = n
    crashed: list[int] = []

    def contact() -> int:
        return plan.choice(safe)

    def crash(node: int, hung: bool) -> None:
        if cluster.nodes[node].alive and cluster.nodes[node].stop is None:
            cluster.crash(node, hung=hung)
            crashed.append(node)

    def crash_leader_mid_change(deadline: float) -> None:
        """Crash the current leader as soon as it has proposed a batch (spec §3.7 takeover path)."""
        leaders = [x for x in cluster.live() if x.proto.is_leader() and x.proto.active_leader]
        for node in leaders:
            row = node.proto.my_row
            if any(c.end_of_view for c in row.pending()) and node.node_id in faultable:
                result.faults.append(f"leader {node.node_id} crashed mid view change at {cluster.now:.1f}")
                crash(node.node_id, hung=False)
                return
        if cluster.now < deadline:
            cluster.at(cluster.now + 0.5, lambda: crash_leader_mid_change(deadline))

    def restart_when_removed(node: int, deadline: float) -> None:
        views = [x.proto.view for x in cluster.live() if x.proto.view is not None]
        if views and all(node not in v.members for v in views) and not cluster.nodes[node].alive:
            result.faults.append(f"restart {node} at {cluster.now:.1f}")
            cluster.start_joiner(node, contact())
            return
        if cluster.now < deadline:
            cluster.at(cluster.now + 5, lambda: restart_when_removed(node, deadline))

    for kind in chosen:
        when = start + plan.uniform(0, fault_window_ms * 0.6)
        if kind in ("crash", "hung") and faultable:
            victim = plan.choice(faultable)
            result.faults.append(f"{kind} {victim} at {when:.1f}")
            cluster.at(when, lambda v=victim, h=(kind == "hung"): crash(v, h))
        elif kind == "leader_mid_change":
            # a join starts a view change (no crash budget needed); the leader dies once it has proposed
            new = next_new_id
            next_new_id += 1
            result.faults.append(f"join {new} at {when:.1f}, then crash the leader mid view change")
            cluster.at(when, lambda new=new: (cluster.start_joiner(new, contact()),
                                              crash_leader_mid_change(cluster.now + 500)))
        elif kind == "join":
            new = next_new_id
            next_new_id += 1
            result.faults.append(f"join {new} at {when:.1f}")
            cluster.at(when, lambda new=new: cluster.start_joiner(new, contact()))
        elif kind == "restart" and faultable:
            victim = plan.choice(faultable)
            result.faults.append(f"crash {victim} at {when:.1f} to restart it")
            cluster.at(when, lambda v=victim: (crash(v, False),
                                               restart_when_removed(v, start + fault_window_ms)))
        elif kind == "partition" and faultable:
            side = set(plan.sample(faultable, plan.randint(1, len(faultable))))
            heal_at = when + plan.uniform(300, 1000)
            result.faults.append(f"partition {sorted(side)} at {when:.1f}, heal at {heal_at:.1f}")
            cluster.at(when, lambda s=side: cluster.partition(s))
            cluster.at(heal_at, cluster.heal)

    cluster.run_until(start + fault_window_ms)
    cluster.heal()
    _settle(cluster, settle_ms, cluster.checker.check_converged)
    result.settle_ms = cluster.now - (start + fault_window_ms)
    if cluster.params.traffic:
        # stop sending; everything a live sender sent must then be delivered
        cluster.traffic_on = False
        _settle(cluster, settle_ms, cluster.checker.check_no_loss)
        cluster.checker.check_converged()
        result.deliveries = cluster.checker.deliveries
    view = cluster.live()[0].proto.view
    assert view is not None
    result.final_vid = view.vid
    result.final_members = list(view.members)
    result.steps = cluster.steps
    result.virtual_ms = cluster.now
    result.views_installed = sum(len(x.views) for x in cluster.nodes.values())
    return result


def _settle(cluster: Cluster, bound_ms: float, check: Callable[[], None]) -> None:
    """Run until ``check`` passes, at most ``bound_ms`` of virtual time; then it must pass.

    Only the end-of-run check is retried: an invariant broken while running
    (raised from ``run_until``) fails the scenario at once.
    """
    end = cluster.now + bound_ms
    while cluster.now < end:
        cluster.run_until(cluster.now + 100)
        try:
            check()
            return
        except InvariantViolation:
            continue
    check()
