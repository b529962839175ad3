"""Invariants the simulator checks after every step (DESIGN §5, membership part)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import DerechoError

if TYPE_CHECKING:
    from ..protocol.events import Stop
    from ..view import View
    from .cluster import Cluster, SimNode


class InvariantViolation(DerechoError):
    """A guarantee broke in a simulated run; the message says which seed replays it."""


class Checker:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        #: vid -> member list, the first time anyone installed it
        self.views: dict[int, tuple[int, ...]] = {}
        #: node -> vids it installed, in order (per incarnation)
        self.history: dict[tuple[int, int], list[int]] = {}
        self.stops: list[tuple[int, Any]] = []
        self._checked_commits: set[tuple[int, int, int]] = set()

    def fail(self, message: str) -> None:
        trace = "\n".join(self.cluster.trace[-40:])
        raise InvariantViolation(f"seed {self.cluster.seed} at t={self.cluster.now:.2f}: {message}\n"
                                 f"replay: {self.cluster.replay_command()}\nlast events:\n{trace}")

    def on_install(self, node: SimNode, view: View) -> None:
        members = tuple(view.members)
        known = self.views.setdefault(view.vid, members)
        if known != members:
            self.fail(f"view {view.vid} names two member lists: {list(known)} and {list(members)} "
                      f"(node {node.node_id})")
        if node.node_id not in members:
            self.fail(f"node {node.node_id} installed view {view.vid} that does not contain it")
        hist = self.history.setdefault((node.node_id, node.incarnation), [])
        if hist and view.vid != hist[-1] + 1:
            self.fail(f"node {node.node_id} jumped from view {hist[-1]} to view {view.vid}")
        hist.append(view.vid)
        if view.vid > 0:
            self._check_majority(view)

    def _check_majority(self, view: View) -> None:
        """View v was committed in view v-1 by acknowledgements from a majority of v-1's active members."""
        prev = self.views.get(view.vid - 1)
        if prev is None:
            return  # only a joiner saw it so far; the leader's commit is checked when it installs
        records = [r for n in self.cluster.nodes.values() for r in n.proto.commits if r.vid == view.vid - 1]
        if not records:
            self.fail(f"view {view.vid} was installed but nobody committed a change in view {view.vid - 1}")
        for r in records:
            if set(r.members) != set(prev):
                self.fail(f"commit record for view {r.vid} lists members {r.members}, view was {prev}")
        best = max(records, key=lambda r: len(r.acked))
        active = len(prev) - len(best.rip)
        if not len(best.acked - best.rip) > active / 2:
            self.fail(f"view {view.vid} was committed by {sorted(best.acked)} only: not a majority of the "
                      f"{active} active members of view {view.vid - 1} {list(prev)}")

    def on_stop(self, node: SimNode, stop: Stop) -> None:
        self.stops.append((node.node_id, stop))

    def after_step(self) -> None:
        pass

    # ---------------------------------------------------------------- end-of-run checks
    def check_converged(self, expect_members: set[int] | None = None) -> None:
        """Every live node of the majority installed the same, latest view (liveness)."""
        live = self.cluster.live()
        if not live:
            self.fail("no node is running at the end of the run")
        vids = {n.node_id: (n.proto.view.vid if n.proto.view else None) for n in live}
        if None in vids.values():
            self.fail(f"some live nodes never installed a view: {vids}")
        if len(set(vids.values())) != 1:
            self.fail(f"live nodes did not converge on one view: {vids}")
        view = live[0].proto.view
        assert view is not None
        live_ids = {n.node_id for n in live}
        if set(view.members) != live_ids:
            self.fail(f"final view {view.vid} has members {view.members} but the live nodes are {sorted(live_ids)}")
        if expect_members is not None and live_ids != expect_members:
            self.fail(f"expected live members {sorted(expect_members)}, got {sorted(live_ids)}")
        for n in live:
            assert n.proto.view is not None
            if n.proto.my_row.wedged:
                self.fail(f"node {n.node_id} is still wedged in the final view {n.proto.view.vid}")
