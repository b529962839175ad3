"""Group membership: joins, failure detection, and view changes decided by a majority.

A pure state machine (DESIGN §4): :meth:`Membership.handle` takes an event and
the current time and returns actions. It follows Derecho's SST-based protocol
(spec §3.3–3.9) with the SST carried as row updates over the transport:

* every member owns one row of the GMS table (suspicions, proposed changes,
  the counters ``num_changes ≥ num_acked ≥ num_committed ≥ num_installed``,
  ``wedged``, ``rip``) and pushes the fields it changes to the others, FIFO;
* the leader (lowest non-failed rank) proposes a batch of changes ending in
  an end-of-view mark, every member copies and acknowledges it and wedges, the
  leader commits once every non-failed member has acknowledged, every member
  waits until all non-failed members are wedged (and the multicast layer has
  finished its ragged trim), then installs the next view;
* a new leader first waits until every live member suspects all lower ranks,
  then adopts the longest batch any member holds (a batch a prior leader may
  have committed) before proposing anything of its own;
* a node that suspects half or more of its view (graceful leavers excluded)
  stops instead of proposing: a minority never installs a view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

from ..errors import SubgroupProvisioningError
from ..view import IpAndPorts, View, make_next_view
from . import wire
from .restart import Candidate, RestartCoordinator, RestartInfo
from .events import (
    Action,
    Connect,
    Disconnect,
    Event,
    InstallView,
    LeaveRequest,
    Log,
    PeerUnreachable,
    Received,
    ReceivedAtAddress,
    ReportFailure,
    Send,
    SendToAddress,
    Stop,
    Tick,
    WedgeView,
)

#: an allocation callback: (prev_view, next_view) -> allocation; raises SubgroupProvisioningError
Allocate = Callable[[View | None, View], Any]


@dataclass(frozen=True)
class Change:
    """One proposed membership change: ``node`` joins (if not a member) or leaves."""

    leader: int
    node: int
    end_of_view: bool = False
    address: IpAndPorts | None = None  # for joins
    nonce: int = 0  # the joiner's process identity, to recognise its retries

    def encode(self) -> list[Any]:
        return [self.leader, self.node, self.end_of_view, None if self.address is None else list(self.address),
                self.nonce]

    @classmethod
    def decode(cls, raw: Any) -> Change:
        if not isinstance(raw, list) or len(raw) != 5:
            raise wire.WireError(f"change proposal must be a 5-element list, got {raw!r}")
        leader = wire.check_int(raw[0], "change leader")
        node = wire.check_int(raw[1], "change node")
        if not isinstance(raw[2], bool):
            raise wire.WireError("change end_of_view must be a bool")
        address = None
        if raw[3] is not None:
            if not isinstance(raw[3], list) or len(raw[3]) != 6 or not isinstance(raw[3][0], str) \
                    or not all(isinstance(p, int) and 0 <= p <= 65535 for p in raw[3][1:]):
                raise wire.WireError(f"change address must be [ip, 5 ports], got {raw[3]!r}")
            address = IpAndPorts(*raw[3])
        return cls(leader, node, raw[2], address, wire.check_int(raw[4], "change nonce"))


ROW_FIELDS = ("suspected", "left", "changes", "num_changes", "num_acked", "num_committed", "num_installed", "wedged",
              "rip")
_COUNTERS = ("num_changes", "num_acked", "num_committed", "num_installed")


@dataclass
class Row:
    """One member's row of the GMS part of the SST (spec §4.3)."""

    suspected: list[bool]
    changes: list[Change] = field(default_factory=list)
    num_changes: int = 0
    num_acked: int = 0
    num_committed: int = 0
    num_installed: int = 0
    wedged: bool = False
    rip: bool = False
    #: ranks this member knows left gracefully (their rows said rip): suspected, but not failures, so a
    #: member that learns of a departure by gossip never counts it towards a lost majority
    left: list[bool] = field(default_factory=list)

    def encode(self, names: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in names:
            value = getattr(self, name)
            if name == "left" and not value:
                value = [False] * len(self.suspected)
            out[name] = [c.encode() for c in value] if name == "changes" else (
                list(value) if isinstance(value, list) else value)
        return out

    def apply(self, fields: Any, n: int) -> None:
        """Apply a pushed update; raises WireError (leaving the row untouched) on bad input."""
        if not isinstance(fields, dict):
            raise wire.WireError("SST update must be a map of fields")
        parsed: dict[str, Any] = {}
        for name, value in fields.items():
            if name in ("suspected", "left"):
                if not isinstance(value, list) or len(value) != n or not all(isinstance(b, bool) for b in value):
                    raise wire.WireError(f"{name} must be {n} booleans")
                parsed[name] = list(value)
            elif name == "changes":
                if not isinstance(value, list) or len(value) > 10_000:
                    raise wire.WireError("changes must be a list")
                parsed[name] = [Change.decode(c) for c in value]
            elif name in _COUNTERS:
                parsed[name] = wire.check_int(value, name)
            elif name in ("wedged", "rip"):
                if not isinstance(value, bool):
                    raise wire.WireError(f"{name} must be a bool")
                parsed[name] = value
            else:
                raise wire.WireError(f"unknown SST field {name!r}")
        for name, value in parsed.items():
            setattr(self, name, value)

    def pending(self) -> list[Change]:
        """The proposals not yet installed (Derecho: changes[0 : num_changes - num_installed])."""
        return self.changes[: self.num_changes - self.num_installed]


@dataclass
class CommitRecord:
    """Evidence the simulator checks: who acknowledged a batch the leader committed."""

    vid: int
    leader: int
    num_committed: int
    acked: frozenset[int]
    members: tuple[int, ...]
    rip: frozenset[int]


class Membership:
    """The membership state machine of one node.

    ``address`` is this node's :class:`IpAndPorts`; GMS traffic (joins) goes to
    ``(ip, gms_port)``. ``allocate(prev_view, next_view)`` assigns subgroups and
    raises :class:`SubgroupProvisioningError` for an inadequate view (None:
    every view is adequate). ``nonce`` identifies this process incarnation.
    """

    def __init__(self, node_id: int, address: IpAndPorts, *, heartbeat_ms: float = 100,
                 suspicion_timeout_ms: float = 2000, partition_safety: bool = True,
                 allocate: Allocate | None = None, nonce: int = 0,
                 join_retry_ms: float | None = None,
                 subgroup_type_order: Sequence[Hashable] = (),
                 ready_to_install: Callable[[int], bool] | None = None,
                 group_id: str = "", restart: RestartInfo | None = None, restart_timeout_ms: float = 2000,
                 restart_leaders: Sequence[tuple[str, int]] = (), backup_restart_leaders: bool = False) -> None:
        self.id = node_id
        self.address = IpAndPorts(*address)
        self.heartbeat_ms = heartbeat_ms
        self.suspicion_timeout_ms = suspicion_timeout_ms
        self.partition_safety = partition_safety
        self.allocate = allocate
        self.nonce = nonce
        self.join_retry_ms = join_retry_ms if join_retry_ms is not None else max(4 * suspicion_timeout_ms, 1000)
        self.type_order = list(subgroup_type_order)
        self._inadequate_logged: tuple[int, tuple[int, ...]] | None = None
        #: the identity of this node's group: a fresh one for a new group, the saved one on restart, the
        #: leader's once admitted. A joiner whose logs carry another identity is refused (Derecho issue #82).
        self.group_id = restart.group_id if restart is not None else group_id
        self.restart = restart
        self.restart_timeout_ms = restart_timeout_ms
        self.restart_leaders = list(restart_leaders)
        self.backup_restart_leaders = backup_restart_leaders
        self.restart_leader_index = 0
        self.restarting: RestartCoordinator | None = None  # this node leads a total restart
        self._restart_reason_logged = ""
        self._restart_attempts = 0
        #: multicast's ragged-trim hook: may the view that follows ``vid`` be installed yet?
        self.ready_to_install = ready_to_install or (lambda vid: True)

        self.now = 0.0
        self.view: View | None = None
        self.rows: list[Row | None] = []
        self.failed: set[int] = set()  # ranks this node considers failed in the current view
        self.last_heard: dict[int, float] = {}
        self.next_heartbeat = 0.0
        self.active_leader = False
        self.takeover_pending = False
        self.join_queue: list[Change] = []
        self.initial_candidates: list[Change] | None = None  # leader of a group not yet adequate
        self.buffered: list[tuple[int, int, Any]] = []  # (vid, sender, fields) from views ahead of ours
        self.contact: tuple[str, int] | None = None
        self.join_target: tuple[str, int] | None = None
        self.join_deadline = 0.0
        self.stopped: Stop | None = None
        self.leaving = False
        self.leave_acks: set[int] = set()  # members that saw this node's departure (or are gone)
        self.commits: list[CommitRecord] = []
        self._nonces: dict[int, int] = {}  # joiners' process identities, to recognise their retries
        self.left_nodes: set[int] = set()  # members seen leaving gracefully (rip)
        self.installed: list[View] = []
        self._out: list[Action] = []
        self._dirty: set[str] = set()

    # ================================================================== start-up
    def start_new_group(self, now: float) -> list[Action]:
        """This node is the contact: it leads a fresh group, first alone, until the first view is adequate."""
        self.now = now
        if self.restart is not None:
            self._lead_restart()
            return self._flush()
        self.initial_candidates = [Change(self.id, self.id, False, self.address, self.nonce)]
        self._try_initial_view()
        return self._flush()

    def _lead_restart(self) -> None:
        assert self.restart is not None
        me = Candidate(self.id, self.address, self.nonce, self.restart)
        self.restarting = RestartCoordinator(me, self.restart_timeout_ms, self.now, self.allocate, self.type_order)
        self.join_target = None
        self._log(logging.INFO, "node %d leads a total restart of group %s from its view %d", self.id,
                  self.group_id, self.restart.view.vid)
        self._probe_live_group()
        self._try_restart()

    def _probe_live_group(self) -> None:
        """Ask the saved view's other members whether a group is still running (then join it instead)."""
        assert self.restart is not None
        msg = self._join_message()
        for rank, node in enumerate(self.restart.view.members):
            addr = self.restart.view.member_ips_and_ports[rank]
            if node != self.id and addr is not None:
                self._out.append(SendToAddress((addr.ip_address, addr.gms_port), msg))

    def _try_restart(self) -> None:
        assert self.restarting is not None
        view = self.restarting.decide(self.now)
        if view is None:
            reason = self.restarting.last_reason
            if reason != self._restart_reason_logged:
                self._restart_reason_logged = reason
                self._log(logging.INFO, "total restart: %s", reason)
            return
        coordinator, self.restarting = self.restarting, None
        self.restart = None
        self._nonces = {c.node: c.nonce for c in coordinator.candidates}
        self._log(logging.INFO, "total restart: installing view %d with %s", view.vid, view.members)
        self._install(view, Row([False] * view.num_members), allocate=False)
        for c in coordinator.candidates:
            if c.node != self.id:
                self._send_welcome(c.node, c.address)

    def start_join(self, contact: tuple[str, int], now: float) -> list[Action]:
        """Ask the node at ``contact`` (host, gms_port) to admit this node."""
        self.now = now
        self.contact = contact
        self.join_target = contact
        self._send_join()
        return self._flush()

    def _send_join(self) -> None:
        assert self.join_target is not None
        self.join_deadline = self.now + (self.restart_timeout_ms if self.restart is not None
                                         else self.join_retry_ms)
        self._out.append(SendToAddress(self.join_target, self._join_message()))

    def _join_message(self) -> bytes:
        info = self.restart.encode() if self.restart is not None else None
        return wire.encode(wire.JOIN, self.id, list(self.address), self.nonce, info)

    def _join_timed_out(self) -> None:
        """No answer to a join: retry; a restarting node may move on to the next restart leader."""
        if self.restart is not None and self.backup_restart_leaders and self.restart_leaders:
            self._restart_attempts += 1
            if self._restart_attempts >= 2:  # the leader stayed silent for two windows: it has failed
                self._restart_attempts = 0
                self.restart_leader_index = (self.restart_leader_index + 1) % len(self.restart_leaders)
                target = self.restart_leaders[self.restart_leader_index]
                self._log(logging.WARNING, "restart leader did not answer; trying the next one, %s:%d", *target)
                if target == (self.address.ip_address, self.address.gms_port):
                    self._lead_restart()
                    return
                self.contact = target
        self.join_target = self.contact
        self._send_join()

    # ================================================================== queries
    @property
    def my_rank(self) -> int:
        return -1 if self.view is None else self.view.rank_of(self.id)

    def leader_rank(self) -> int:
        assert self.view is not None
        for rank in range(self.view.num_members):
            if rank not in self.failed:
                return rank
        return -1

    def is_leader(self) -> bool:
        return self.view is not None and self.leader_rank() == self.my_rank

    @property
    def my_row(self) -> Row:
        row = self.rows[self.my_rank]
        assert row is not None
        return row

    def next_deadline(self) -> float:
        """When the protocol next needs a :class:`Tick` (absolute ms)."""
        if self.stopped:
            return float("inf")
        if self.view is None:
            if self.restarting is not None:
                return self.restarting.window_end
            return self.join_deadline if self.join_target else float("inf")
        return min(self.next_heartbeat, self.now + self.heartbeat_ms)

    # ================================================================== events
    def handle(self, event: Event, now: float) -> list[Action]:
        self.now = max(self.now, now)
        if self.stopped:
            if self.leaving:
                self._note_leave_ack(event)
            return []
        if isinstance(event, Tick):
            self._on_tick()
        elif isinstance(event, Received):
            self._on_message(event.node_id, event.data)
        elif isinstance(event, ReceivedAtAddress):
            self._on_gms_message(event.data)
        elif isinstance(event, PeerUnreachable):
            self._suspect_node(event.node_id, f"transport: {event.reason or 'peer unreachable'}")
        elif isinstance(event, ReportFailure):
            self._suspect_node(event.node_id, "reported by the application")
        elif isinstance(event, LeaveRequest):
            self._leave()
        if not self.stopped and self.view is not None:
            self._evaluate()
        return self._flush()

    def poke(self, now: float) -> list[Action]:
        """Re-evaluate the predicates (another layer's state changed, e.g. the ragged trim advanced)."""
        self.now = max(self.now, now)
        if not self.stopped and self.view is not None:
            self._evaluate()
        return self._flush()

    def failed_nodes(self) -> set[int]:
        """Node ids this node considers failed in its current view."""
        return set() if self.view is None else {self.view.members[r] for r in self.failed}

    def _flush(self) -> list[Action]:
        if self._dirty and self.view is not None and not self.stopped:
            self._push(self._dirty)
        self._dirty = set()
        out, self._out = self._out, []
        return out

    def _log(self, level: int, message: str, *args: Any) -> None:
        self._out.append(Log(level, message, args))

    def _stop(self, kind: str, reason: str) -> None:
        if self.stopped is None:
            self.stopped = Stop(kind, reason)
            self._out.append(self.stopped)

    # ------------------------------------------------------------------ timers
    def _on_tick(self) -> None:
        if self.view is None:
            if self.restarting is not None:
                if self.now >= self.restarting.window_end:
                    self._probe_live_group()
                self._try_restart()
            elif self.join_target is not None and self.now >= self.join_deadline:
                # no answer: the contact may have failed or the welcome was lost; start over at the contact
                self._join_timed_out()
            return
        if self.now >= self.next_heartbeat:
            self.next_heartbeat = self.now + self.heartbeat_ms
            hb = wire.encode(wire.HEARTBEAT, self.view.vid)
            for rank, node in enumerate(self.view.members):
                if rank != self.my_rank and rank not in self.failed:
                    self._out.append(Send(node, hb))
        for rank, node in enumerate(self.view.members):
            if rank == self.my_rank or rank in self.failed:
                continue
            if self.now - self.last_heard.get(node, self.now) > self.suspicion_timeout_ms:
                self._suspect_node(node, f"silent for more than {self.suspicion_timeout_ms:g} ms")

    # ------------------------------------------------------------------ member messages
    def _on_message(self, sender: int, data: Any) -> None:
        try:
            msg = wire.decode(data)
            kind = msg[0]
            if kind == wire.SST:
                self._on_sst(sender, wire.check_int(msg[1], "vid"), msg[2])
            elif kind == wire.HEARTBEAT:
                vid = wire.check_int(msg[1], "vid")
                if self.view is not None and vid == self.view.vid:
                    self.last_heard[sender] = self.now
            elif kind == wire.WELCOME:
                self._on_welcome(msg)
            else:
                self._on_gms_message(data)
        except wire.WireError as exc:
            self._log(logging.WARNING, "dropped a bad membership message from node %d: %s", sender, exc)

    def _on_sst(self, sender: int, vid: int, fields: Any) -> None:
        if self.view is None or vid > self.view.vid:
            if len(self.buffered) < 10_000:
                self.buffered.append((vid, sender, fields))
            return
        if vid < self.view.vid:
            return  # an update for a view we already left
        rank = self.view.rank_of(sender)
        if rank < 0 or rank == self.my_rank or rank in self.failed:
            return  # not a member, or a frozen row (Derecho freezes the rows of failed members)
        self.last_heard[sender] = self.now
        row = self.rows[rank]
        if row is None:
            row = Row([False] * self.view.num_members)
            row.apply(fields, self.view.num_members)
            self.rows[rank] = row
        else:
            row.apply(fields, self.view.num_members)

    # ------------------------------------------------------------------ GMS channel (joins)
    def _on_gms_message(self, data: Any) -> None:
        try:
            msg = wire.decode(data)
            kind = msg[0]
            if kind == wire.JOIN:
                node = wire.check_int(msg[1], "joiner id")
                raw = msg[2]
                if not isinstance(raw, list) or len(raw) != 6:
                    raise wire.WireError("joiner address must be [ip, 5 ports]")
                wire.check_ip(raw[0], f"the address of joiner {node}")
                change = Change.decode([self.id, node, False, raw, msg[3]])
                info = None
                if len(msg) == 5 and msg[4] is not None:
                    info = RestartInfo.decode(msg[4], self.type_order)
                self._on_join(change, info)
            elif kind == wire.JOIN_REPLY:
                self._on_join_reply(msg)
            elif kind == wire.WELCOME:
                self._on_welcome(msg)
            else:
                raise wire.WireError(f"{kind} is not a GMS-channel message")
        except wire.WireError as exc:
            self._log(logging.WARNING, "dropped a bad GMS message: %s", exc)

    def _reply(self, to: IpAndPorts, code: str, text: str = "") -> None:
        leader_addr = None
        if self.view is not None and self.leader_rank() >= 0:
            a = self.view.member_ips_and_ports[self.leader_rank()]
            if a is not None:
                leader_addr = [a.ip_address, a.gms_port]
        leader_id = self.view.members[self.leader_rank()] if self.view is not None else self.id
        self._out.append(SendToAddress((to.ip_address, to.gms_port),
                                       wire.encode(wire.JOIN_REPLY, code, leader_id, leader_addr, text)))

    def _on_join(self, change: Change, info: RestartInfo | None = None) -> None:
        assert change.address is not None
        if self.restarting is not None:
            refused = self.restarting.add(Candidate(change.node, change.address, change.nonce, info))
            if refused is not None:
                self._reply(change.address, wire.WRONG_GROUP, refused)
            else:
                self._try_restart()
            return
        if info is not None and info.group_id != self.group_id and self.group_id:
            self._reply(change.address, wire.WRONG_GROUP,
                        f"its logs belong to group {info.group_id}, but this group is {self.group_id}")
            return
        if self.initial_candidates is not None:
            # the contact of a group whose first view is not adequate yet
            if any(c.node == change.node for c in self.initial_candidates):
                if all(c.nonce != change.nonce for c in self.initial_candidates if c.node == change.node):
                    self._reply(change.address, wire.ID_IN_USE,
                                f"node id {change.node} is already used by another process")
                return
            self.initial_candidates.append(change)
            self._try_initial_view()
            return
        if self.view is None:
            return  # still joining ourselves; the joiner will retry
        if not self.active_leader or not self.is_leader():
            self._reply(change.address, wire.LEADER_REDIRECT)
            return
        rank = self.view.rank_of(change.node)
        if rank >= 0:
            member_nonce = self._member_nonce(change.node)
            if member_nonce == change.nonce and change.nonce != 0:
                self._send_welcome(change.node, change.address)  # a retry: our welcome was lost
            elif rank in self.failed:
                self._queue_join(change)  # a restarted node: admit it once its old self is removed
            else:
                self._reply(change.address, wire.ID_IN_USE,
                            f"node id {change.node} is a member of view {self.view.vid}; "
                            "pick another DERECHO/local_id")
            return
        if any(c.node == change.node for c in self.my_row.pending()):
            return  # already proposed; the welcome will follow the view change
        self._queue_join(change)

    def _queue_join(self, change: Change) -> None:
        for queued in self.join_queue:
            if queued.node == change.node:
                if queued.nonce != change.nonce:
                    self._reply(change.address, wire.ID_IN_USE,
                                f"node id {change.node} is already asking to join from another process")
                return
        self.join_queue.append(change)

    def _member_nonce(self, node: int) -> int | None:
        return self._nonces.get(node)

    def _on_join_reply(self, msg: list[Any]) -> None:
        if self.view is not None:
            return
        code = msg[1]
        if code not in wire.JOIN_REPLY_CODES:
            raise wire.WireError(f"unknown join reply code {code!r}")
        text = msg[4] if isinstance(msg[4], str) else ""
        if code == wire.ID_IN_USE:
            self._stop("id_in_use", f"ID_IN_USE: {text or f'node id {self.id} is already in the group'}")
        elif code == wire.WRONG_GROUP:
            self._stop("wrong_group", f"WRONG_GROUP: the group refused this node: {text}")
        elif code == wire.LEADER_REDIRECT and msg[3] is not None:
            if self.restarting is not None:
                # a live member answered our probe: the group survived; join it instead of restarting
                self._log(logging.INFO, "total restart: a member of view %d is alive; joining the running group",
                          self.restarting.newest.vid)
                self.restarting = None
                self.contact = wire.check_address(msg[3], "leader address")
            self.join_target = wire.check_address(msg[3], "leader address")
            self._send_join()

    def _on_welcome(self, msg: list[Any]) -> None:
        if self.view is not None or (self.join_target is None and self.restarting is None):
            return
        try:
            view = View.from_bytes(msg[1], my_id=self.id, subgroup_type_order=self.type_order)
        except (ValueError, TypeError) as exc:
            raise wire.WireError(f"welcome carries a bad view: {exc}") from None
        if view.rank_of(self.id) < 0:
            return
        leader_row = Row([False] * view.num_members)
        leader_row.apply(msg[2], view.num_members)
        row = Row([False] * view.num_members, list(leader_row.changes), leader_row.num_changes,
                  leader_row.num_acked, leader_row.num_committed, leader_row.num_installed)
        self.join_target = None
        self._nonces = {}
        if len(msg) == 4 and isinstance(msg[3], str):
            self.group_id = msg[3]
        self.restart = None
        self.restarting = None  # a restart leader admitted to a group that survived
        self._install(view, row, allocate=True)

    # ------------------------------------------------------------------ initial view
    def _try_initial_view(self) -> None:
        assert self.initial_candidates is not None
        cands = self.initial_candidates
        view = View(0, [c.node for c in cands], member_ips_and_ports=[c.address for c in cands], my_id=self.id,
                    subgroup_type_order=self.type_order)
        if not self._adequate(None, view):
            self._log(logging.INFO, "first view with %d member(s) is not adequately provisioned; "
                      "waiting for more nodes to join", len(cands))
            return
        self.initial_candidates = None
        self._nonces = {c.node: c.nonce for c in cands}
        self._install(view, Row([False] * view.num_members), allocate=False)
        for c in cands[1:]:
            assert c.address is not None
            self._send_welcome(c.node, c.address)

    def _adequate(self, prev: View | None, view: View) -> bool:
        if self.allocate is None:
            return True
        try:
            self.allocate(prev, view)
        except SubgroupProvisioningError as exc:
            view.is_adequately_provisioned = False
            self._log(logging.DEBUG, "view %d inadequate: %s", view.vid, exc)
            return False
        return getattr(view, "is_adequately_provisioned", True)

    # ------------------------------------------------------------------ suspicion
    def _suspect_node(self, node: int, why: str) -> None:
        if self.view is None:
            return
        rank = self.view.rank_of(node)
        if rank < 0 or rank in self.failed:
            return
        if node == self.id:
            return
        self._log(logging.WARNING, "suspecting node %d (%s)", node, why)
        self._suspect_rank(rank)

    def _suspect_rank(self, rank: int) -> None:
        assert self.view is not None
        if rank in self.failed:
            return
        was_leader = self.is_leader()
        self.failed.add(rank)
        self.view.failed[rank] = True
        row = self.my_row
        row.suspected[rank] = True
        self._dirty.add("suspected")
        their = self.rows[rank]
        if self.view.members[rank] in self.left_nodes or (their is not None and their.rip):
            self.left_nodes.add(self.view.members[rank])
            if not row.left:
                row.left = [False] * self.view.num_members
            row.left[rank] = True
            self._dirty.add("left")
        # its row is frozen from now on; one last update tells it why it is being removed (if it
        # is alive at all). The connection is closed once a view without it is installed.
        self._out.append(Send(self.view.members[rank], wire.encode(
            wire.SST, self.view.vid, row.encode(["suspected"]))))
        self._check_majority()
        if self.stopped:
            return
        self._wedge()
        if not was_leader and self.is_leader():
            self.takeover_pending = True
            self._log(logging.INFO, "node %d becomes leader of view %d; waiting for the others to agree "
                      "that the previous leaders failed", self.id, self.view.vid)

    def _rip_ranks(self) -> set[int]:
        # a member that announced its departure stays a leaver in the views that still list it
        assert self.view is not None
        for r, row in enumerate(self.rows):
            if row is not None and row.rip:
                self.left_nodes.add(self.view.members[r])
        return {r for r, m in enumerate(self.view.members) if m in self.left_nodes}

    def _check_majority(self) -> None:
        assert self.view is not None
        if self.leaving:
            return
        rip = self._rip_ranks()
        n = self.view.num_members - len(rip)
        failed = len(self.failed - rip)
        if failed and failed >= (n + 1) // 2:
            msg = (f"node {self.id} suspects {failed} of the {n} active members of view {self.view.vid} "
                   f"({sorted(self.view.members[r] for r in self.failed - rip)}): it may be on the minority "
                   "side of a partition")
            if self.partition_safety:
                self._stop("partition", msg + "; stopping, as a minority never installs a view "
                           "(DERECHO/disable_partitioning_safety = false)")
            else:
                self._log(logging.WARNING, "%s; continuing because disable_partitioning_safety = true", msg)

    def _wedge(self) -> None:
        row = self.my_row
        if not row.wedged:
            row.wedged = True
            self._dirty.add("wedged")
            assert self.view is not None
            self._out.append(WedgeView(self.view.vid))

    # ------------------------------------------------------------------ leave
    def _leave(self) -> None:
        if self.view is None:
            self._stop("left", "left before joining")
            return
        self.leaving = True
        row = self.my_row
        row.rip = True
        row.suspected[self.my_rank] = True
        self._push({"rip", "suspected", "left"})
        self._stop("left", f"node {self.id} left the group in view {self.view.vid}")

    def _note_leave_ack(self, event: Event) -> None:
        """After leaving: a member whose row marks this node suspected has read the departure."""
        if self.view is None:
            return
        if isinstance(event, PeerUnreachable):
            self.leave_acks.add(event.node_id)
        elif isinstance(event, Received):
            try:
                msg = wire.decode(event.data)
                if msg[0] == wire.SST and wire.check_int(msg[1], "vid") == self.view.vid:
                    row = Row([False] * self.view.num_members)
                    row.apply(msg[2], self.view.num_members)
                    if row.suspected[self.my_rank] or row.rip:  # it read the departure, or left itself
                        self.leave_acks.add(event.node_id)
            except (wire.WireError, IndexError):
                pass  # anything else from a peer no longer matters to a node that left

    def leave_acknowledged(self) -> bool:
        """Every member that was live when this node left has read its departure, or is gone.

        A leaving node waits for this before it closes its connections: closing with a peer's data
        unread sends a reset, and a peer receiving it loses what it had not read yet, the departure
        announcement included. It would then take the departure for a failure, and several members
        leaving at once for a lost majority.
        """
        if self.view is None:
            return True
        return all(m in self.leave_acks for r, m in enumerate(self.view.members)
                   if r != self.my_rank and r not in self.failed)

    # ------------------------------------------------------------------ SST push
    def _push(self, names: Iterable[str]) -> None:
        assert self.view is not None
        names = [n for n in ROW_FIELDS if n in set(names)]
        msg = wire.encode(wire.SST, self.view.vid, self.my_row.encode(names))
        for rank, node in enumerate(self.view.members):
            if rank != self.my_rank and rank not in self.failed:
                self._out.append(Send(node, msg))

    # ================================================================== the predicates
    def _evaluate(self) -> None:
        for _ in range(100):  # each pass may enable the next; bounded so a bug cannot spin
            before = (self.view.vid if self.view else -1, len(self._out), len(self._dirty))
            self._gossip_suspicions()
            if self.stopped or self.view is None:
                return
            if self.is_leader():
                if self.takeover_pending:
                    self._try_takeover()
                if self.active_leader:
                    self._propose()
                    self._commit()
            else:
                self._ack()
            self._try_install()
            if self.stopped:
                return
            after = (self.view.vid if self.view else -1, len(self._out), len(self._dirty))
            if after == before:
                return

    def _gossip_suspicions(self) -> None:
        assert self.view is not None
        me = self.my_rank
        for rank, row in enumerate(self.rows):
            if row is None or rank == me or rank in self.failed:
                continue
            if row.suspected[me] and not row.rip and not self.leaving:
                self._stop("removed", f"node {self.view.members[rank]} reported that node {self.id} failed; "
                           f"it was removed from the group in view {self.view.vid}")
                return
            # departures first: a suspicion taken over before the leaver's own announcement arrives
            # must not count as a failure (several members leaving together looked like a lost majority)
            for r, gone in enumerate(row.left):
                if gone and r != me:
                    self.left_nodes.add(self.view.members[r])
            for r, s in enumerate(row.suspected):
                if s and r not in self.failed and r != me:
                    self._suspect_rank(r)
                    if self.stopped:
                        return
            if row.rip and rank not in self.failed:
                self._suspect_rank(rank)
                if self.stopped:
                    return

    def _live_rows(self) -> list[tuple[int, Row | None]]:
        return [(r, row) for r, row in enumerate(self.rows) if r not in self.failed]

    def _try_takeover(self) -> None:
        """Spec §3.7: once every live member suspects all ranks below me, adopt a prior leader's batch."""
        me = self.my_rank
        for rank, row in self._live_rows():
            if rank == me:
                continue
            if row is None or not all(row.suspected[r] for r in range(me)):
                return
        self.takeover_pending = False
        mine = self.my_row
        best: Row | None = None
        for rank, row in enumerate(self.rows):
            if row is None or rank == me:
                continue
            if any(c.end_of_view for c in row.pending()) and row.num_changes > mine.num_changes \
                    and row.num_installed == mine.num_installed:
                if best is None or row.num_changes > best.num_changes:
                    best = row
        if best is not None:
            mine.changes = list(best.pending())
            mine.num_changes = best.num_changes
            self._dirty.update({"changes", "num_changes"})
            self._log(logging.INFO, "new leader %d adopts the prior leader's batch of %d change(s)",
                      self.id, len(mine.pending()))
        self.active_leader = True

    def _propose(self) -> None:
        assert self.view is not None
        row = self.my_row
        pending = row.pending()
        if any(c.end_of_view for c in pending):
            if row.num_acked < row.num_changes:
                row.num_acked = row.num_changes
                self._dirty.add("num_acked")
            return  # a batch is in flight; new changes wait for the next view
        proposed = {c.node for c in pending}
        new: list[Change] = list(pending)
        for rank in sorted(self.failed):
            node = self.view.members[rank]
            if node not in proposed:
                new.append(Change(self.id, node))
                proposed.add(node)
        joins = []
        for change in self.join_queue:
            rank = self.view.rank_of(change.node)
            if change.node in proposed or (rank >= 0 and rank not in self.failed):
                continue
            if rank >= 0 and rank in self.failed:
                continue  # its old incarnation must leave first; stays queued
            joins.append(change)
        new.extend(Change(self.id, c.node, False, c.address, c.nonce) for c in joins)
        if not new:
            return
        new[-1] = Change(new[-1].leader, new[-1].node, True, new[-1].address, new[-1].nonce)
        next_view = self._next_view(new)
        if not self._adequate(self.view, next_view):
            key = (next_view.vid, tuple(next_view.members))
            if (joins or len(new) != len(pending)) and key != self._inadequate_logged:
                self._inadequate_logged = key  # said once per candidate view, not at every poke
                self._log(logging.INFO, "view %d would be inadequately provisioned; staying wedged and waiting "
                          "for more joins", next_view.vid)
            if joins:
                self._wedge()
            # keep failures proposed without an end-of-view mark; installed once joins make it adequate
            return
        joined = {c.node for c in joins}
        self.join_queue = [c for c in self.join_queue if c.node not in joined]
        row.changes = new
        row.num_changes = row.num_installed + len(new)
        row.num_acked = row.num_changes
        self._dirty.update({"changes", "num_changes", "num_acked"})
        self._wedge()
        self._log(logging.INFO, "leader %d proposes view %d: %s", self.id, next_view.vid,
                  ", ".join(("+" if self.view.rank_of(c.node) < 0 else "-") + str(c.node) for c in new))

    def _commit(self) -> None:
        assert self.view is not None
        row = self.my_row
        acked = []
        for _rank, other in self._live_rows():
            if other is None:
                return
            acked.append(other.num_acked)
        low = min(acked)
        if low > row.num_committed:
            row.num_committed = low
            self._dirty.add("num_committed")
            self.commits.append(CommitRecord(
                self.view.vid, self.id, low,
                frozenset(self.view.members[r] for r, o in enumerate(self.rows)
                          if o is not None and r not in self.failed and o.num_acked >= low),
                tuple(self.view.members), frozenset(self.view.members[r] for r in self._rip_ranks())))

    def _ack(self) -> None:
        assert self.view is not None
        leader = self.rows[self.leader_rank()]
        if leader is None:
            return
        row = self.my_row
        if leader.num_installed != row.num_installed:
            return
        if leader.num_changes > row.num_acked:
            row.changes = list(leader.pending())
            row.num_changes = leader.num_changes
            row.num_acked = leader.num_changes
            self._dirty.update({"changes", "num_changes", "num_acked"})
            self._wedge()
        if leader.num_committed > row.num_committed and leader.num_committed <= row.num_changes:
            row.num_committed = leader.num_committed
            self._dirty.add("num_committed")

    def _try_install(self) -> None:
        assert self.view is not None
        row = self.my_row
        committed = row.num_committed - row.num_installed
        if committed <= 0:
            return
        batch = row.pending()[:committed]
        if not any(c.end_of_view for c in batch):
            return
        self._wedge()
        for _rank, other in self._live_rows():
            if other is None or not other.wedged:
                return  # meta-wedge: every live member must have wedged
        if not self.ready_to_install(self.view.vid):
            return  # the multicast layer's ragged trim is not finished
        end = next(i for i, c in enumerate(batch) if c.end_of_view) + 1
        batch = batch[:end]
        next_view = self._next_view(batch)
        old = self.view
        new_row = Row([False] * next_view.num_members, row.changes[end:], row.num_changes, row.num_acked,
                      row.num_committed, row.num_installed + end)
        if next_view.rank_of(self.id) < 0:
            self._stop("removed", f"node {self.id} is not a member of view {next_view.vid}")
            return
        was_leader = self.active_leader
        self._nonces.update({c.node: c.nonce for c in batch if old.rank_of(c.node) < 0})
        # pre-mark members we already suspect that survive into the next view
        pre_failed = [m for r, m in enumerate(old.members) if r in self.failed and next_view.rank_of(m) >= 0]
        self._install(next_view, new_row, allocate=True, prev=old)
        for node in pre_failed:
            self._suspect_node(node, "failed during the previous view change")
        if was_leader:
            # the leader that ran this view change welcomes the joiners (a new leader that adopted the
            # batch counts: it was active when it installed)
            for c in batch:
                if old.rank_of(c.node) < 0:
                    assert c.address is not None
                    self._send_welcome(c.node, c.address)

    def _next_view(self, batch: Sequence[Change]) -> View:
        assert self.view is not None
        leavers = [c.node for c in batch if self.view.rank_of(c.node) >= 0]
        joiners = {c.node: c.address for c in batch if self.view.rank_of(c.node) < 0}
        return make_next_view(self.view, leavers, joiners)

    def _install(self, view: View, row: Row, *, allocate: bool, prev: View | None = None) -> None:
        if self._dirty and self.view is not None:
            self._push(self._dirty)  # the old view's last updates (the commit) go out under the old vid
        self._dirty = set()
        view.my_id = self.id
        if not view.subgroup_type_order and self.type_order:
            view.subgroup_type_order = list(self.type_order)
        allocation = None
        if allocate and self.allocate is not None and not view.subgroup_shard_views:
            try:
                allocation = self.allocate(prev, view)
            except SubgroupProvisioningError as exc:
                # Derecho installs an adopted batch even then ("we really hope it was adequate")
                view.is_adequately_provisioned = False
                self._log(logging.WARNING, "installing view %d although it is inadequately provisioned: %s",
                          view.vid, exc)
        # the failed flags describe this node's knowledge; a fresh view starts with none
        view.failed = [False] * view.num_members
        view.refresh_my_subgroups()
        old_members = set(self.view.members) if self.view is not None else set()
        for gone in sorted(old_members - set(view.members)):
            self._out.append(Disconnect(gone))
        self.view = view
        self.rows = [None] * view.num_members
        self.rows[view.rank_of(self.id)] = row
        self.failed = set()
        self.active_leader = self.is_leader()
        self.takeover_pending = False
        self.last_heard = {m: self.now for m in view.members}
        self.next_heartbeat = self.now
        self.installed.append(view)
        # updates that arrived from members who installed before us
        pending, self.buffered = self.buffered, []
        for m in view.members:
            if m != self.id and m not in old_members and view.member_ips_and_ports[view.rank_of(m)] is not None:
                a = view.member_ips_and_ports[view.rank_of(m)]
                assert a is not None
                self._out.append(Connect(m, (a.ip_address, a.sst_port)))
        self._out.append(InstallView(view, allocation))
        self._push(ROW_FIELDS)
        self._log(logging.INFO, "node %d installed view %d: members %s", self.id, view.vid, view.members)
        for vid, sender, fields in pending:
            try:
                self._on_sst(sender, vid, fields)
            except wire.WireError as exc:
                self._log(logging.WARNING, "dropped a bad SST update from node %d: %s", sender, exc)

    def _send_welcome(self, node: int, address: IpAndPorts) -> None:
        assert self.view is not None
        self._out.append(SendToAddress((address.ip_address, address.gms_port), wire.encode(
            wire.WELCOME, self.view.to_bytes(), self.my_row.encode(ROW_FIELDS), self.group_id)))
