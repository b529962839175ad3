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
        # multicast: per (node, incarnation): vid -> delivered message ids in that view
        self.delivered: dict[tuple[int, int], dict[int, list[str]]] = {}
        self.delivered_ids: dict[tuple[int, int], set[str]] = {}
        self.submitted: dict[tuple[int, int], list[str]] = {}
        self.rejected: set[str] = set()
        #: vid -> (node, sequence) of the first node that finished that view, to compare the others with
        self.finished_view: dict[int, tuple[int, list[str]]] = {}
        self.deliveries = 0

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
        if len(hist) > 1:
            self._check_virtual_synchrony(node, hist[-2])

    # ---------------------------------------------------------------- multicast
    def on_submit(self, node: SimNode, msg_id: str) -> None:
        self.submitted.setdefault((node.node_id, node.incarnation), []).append(msg_id)

    def on_rejected(self, node: SimNode, tag: Any, error: Exception) -> None:
        self.rejected.add(str(tag))

    def on_deliver(self, node: SimNode, d: Any) -> None:
        key = (node.node_id, node.incarnation)
        msg_id = bytes(d.payload).split(b".", 1)[0].decode()
        vid = d.vid
        sender, inc, count = msg_id.split(":")
        if int(sender) != d.sender_id:
            self.fail(f"node {node.node_id} delivered {msg_id} attributed to sender {d.sender_id}")
        if msg_id not in self.submitted.get((int(sender), int(inc)), ()):
            self.fail(f"node {node.node_id} delivered {msg_id}, which nobody sent")
        seen = self.delivered_ids.setdefault(key, set())
        if msg_id in seen:
            self.fail(f"node {node.node_id} delivered {msg_id} twice")
        seen.add(msg_id)
        seq = self.delivered.setdefault(key, {}).setdefault(vid, [])
        if self.cluster.params.traffic == "raw":
            last = next((m for m in reversed(seq) if m.rsplit(":", 1)[0] == f"{sender}:{inc}"), None)
            if last is not None and int(last.rsplit(":", 1)[1]) > int(count):
                self.fail(f"node {node.node_id} delivered {msg_id} after {last}: not FIFO per sender")
        else:
            if d.version != ((vid << 32) | d.seq):
                self.fail(f"version {d.version:#x} of {msg_id} is not (vid {vid} << 32) | seq {d.seq}")
        seq.append(msg_id)
        self.deliveries += 1
        if self.cluster.params.traffic == "ordered":
            # total order: every node's sequence in this view is a prefix of one sequence
            # (checked one delivery at a time, so comparing the newest position suffices)
            pos = len(seq) - 1
            for other_key, views in self.delivered.items():
                other = views.get(vid)
                if other_key == key or other is None or len(other) <= pos:
                    continue
                if other[pos] != seq[pos]:
                    self.fail(f"total order broken in view {vid}: node {key[0]} delivered {seq[pos]} where "
                              f"node {other_key[0]} delivered {other[pos]}")

    def _check_virtual_synchrony(self, node: SimNode, vid: int) -> None:
        """Nodes that install the view after ``vid`` delivered exactly the same messages in ``vid``."""
        if self.cluster.params.traffic != "ordered":
            return  # raw mode delivers on receipt: no virtual synchrony, only FIFO without duplicates
        mine = list(self.delivered.get((node.node_id, node.incarnation), {}).get(vid, []))
        first = self.finished_view.get(vid)
        if first is None:
            self.finished_view[vid] = (node.node_id, mine)
            return
        other, theirs = first
        if self.cluster.params.traffic == "raw":
            same = sorted(mine) == sorted(theirs)
        else:
            same = mine == theirs
        if not same:
            extra = set(mine) ^ set(theirs)
            self.fail(f"virtual synchrony broken: nodes {other} and {node.node_id} both left view {vid} but "
                      f"delivered different messages in it ({len(theirs)} vs {len(mine)}; differing: "
                      f"{sorted(extra)[:5]})")

    def check_no_loss(self) -> None:
        """Every message of a sender alive at the end was delivered by that sender (re-sent across views)."""
        if self.cluster.params.traffic != "ordered":
            return
        for node in self.cluster.live():
            key = (node.node_id, node.incarnation)
            got = self.delivered_ids.get(key, set())
            missing = [m for m in self.submitted.get(key, []) if m not in got and m not in self.rejected]
            if missing:
                self.fail(f"node {node.node_id} never delivered {len(missing)} of its own messages, e.g. "
                          f"{missing[:5]}")

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
