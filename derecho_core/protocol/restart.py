"""Total restart (spec §3.10): the restart leader's bookkeeping, quorum rule and restart view.

When every member of a group with persistent state went down, each comes
back with its last installed view and how far each of its shard logs is
persisted. The restart leader gathers them, waits in windows of
``restart_timeout_ms`` until the quorum rule holds (a majority of the newest
view's members, a member of every shard, an adequate restart view), and then
forms the restart view: the newest view's vid + 1, its members that came back
(in rank order), then newcomers.

Which member ships each shard's state: the one with the longest persisted
log. Every member's log is a prefix of it, because a message is delivered
only once every member of the shard has received it, and the delivered
sequences of a shard are prefixes of one sequence (DESIGN §5). So the other
members need only the tail, and the restart view marks them ``joined`` in that
shard so the ordinary state transfer ships it. Derecho saves ragged trims to
truncate to; with prefix logs the longest log is the trim, and every member
already truncates to what it persisted before it receives the tail.

Pure: no clocks, sockets or files; ``now`` comes in, a view comes out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SubgroupProvisioningError
from ..view import IpAndPorts, View
from . import wire


@dataclass
class RestartInfo:
    """What a restarting node brings: its group's identity, its last view, its persisted versions."""

    group_id: str
    view: View
    #: ``"subgroup/shard"`` -> the latest version persisted in every field of that shard's log
    persisted: dict[str, int] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {"group": self.group_id, "view": self.view.to_bytes(), "persisted": dict(self.persisted)}

    @classmethod
    def decode(cls, raw: Any, type_order: list[Any]) -> RestartInfo:
        if not isinstance(raw, dict) or not isinstance(raw.get("group"), str) \
                or not isinstance(raw.get("view"), bytes) or not isinstance(raw.get("persisted"), dict):
            raise wire.WireError("restart info must be {group: str, view: bytes, persisted: {str: int}}")
        try:
            view = View.from_bytes(raw["view"], subgroup_type_order=type_order)
        except (ValueError, TypeError) as exc:
            raise wire.WireError(f"restart info carries a bad view: {exc}") from None
        persisted = {}
        for key, version in raw["persisted"].items():
            if not isinstance(key, str) or key.count("/") != 1:
                raise wire.WireError("restart info keys must be 'subgroup/shard'")
            persisted[key] = wire.check_int(version, "persisted version", -1, 1 << 63)
        return cls(raw["group"], view, persisted)


@dataclass
class Candidate:
    node: int
    address: IpAndPorts
    nonce: int
    info: RestartInfo | None  # None: a brand-new node (Derecho issue #252: it joins as a newcomer)


Allocate = Callable[[View | None, View], Any]


class RestartCoordinator:
    """The restart leader's side: collect candidates, decide when and with which view to restart."""

    def __init__(self, me: Candidate, timeout_ms: float, now: float, allocate: Allocate | None,
                 type_order: list[Any]) -> None:
        assert me.info is not None
        self.group_id = me.info.group_id
        self.candidates: list[Candidate] = [me]
        self.timeout_ms = timeout_ms
        self.window_end = now + timeout_ms
        self.allocate = allocate
        self.type_order = type_order
        self.last_reason = ""

    def add(self, candidate: Candidate) -> str | None:
        """Record a rejoiner; returns why it is refused (its logs are another group's), else None."""
        if candidate.info is not None and candidate.info.group_id != self.group_id:
            return (f"its logs belong to group {candidate.info.group_id}, but the restarting group is "
                    f"{self.group_id}")
        self.candidates = [c for c in self.candidates if c.node != candidate.node] + [candidate]
        return None

    @property
    def newest(self) -> View:
        return max((c.info.view for c in self.candidates if c.info is not None), key=lambda v: v.vid)

    def decide(self, now: float) -> View | None:
        """The restart view once it may be installed; None while waiting (``last_reason`` says for what)."""
        last = self.newest
        view, reason = self._restart_view(last)
        everyone = {c.node for c in self.candidates} >= set(last.members)
        if view is not None and everyone:
            return view
        if now < self.window_end:
            self.last_reason = reason or "waiting for the rest of the last view's members until the window ends"
            return None
        if view is not None:
            return view
        self.last_reason = reason
        self.window_end = now + self.timeout_ms  # no quorum yet: a new window
        return None

    def _restart_view(self, last: View) -> tuple[View | None, str]:
        back = {c.node for c in self.candidates}
        old = [m for m in last.members if m in back]
        need = len(last.members) // 2 + 1
        if len(old) < need:
            return None, (f"{len(old)} of the {len(last.members)} members of view {last.vid} are back; "
                          f"the restart needs {need}")
        for sg, shards in enumerate(last.subgroup_shard_views):
            for shard, sv in enumerate(shards):
                if sv.members and not any(m in back for m in sv.members):
                    return None, f"no member of subgroup {sg} shard {shard} (of {sv.members}) is back"
        by_node = {c.node: c for c in self.candidates}
        newcomers = [c.node for c in self.candidates if c.node not in last.members]
        members = old + newcomers
        view = View(last.vid + 1, members, member_ips_and_ports=[by_node[m].address for m in members],
                    subgroup_type_order=self.type_order)
        view.next_unassigned_rank = 0
        if self.allocate is not None:
            try:
                self.allocate(last, view)
            except SubgroupProvisioningError as exc:
                return None, f"the restart view would be inadequately provisioned: {exc}"
        self._mark_longest_logs(view, by_node)
        return view, ""

    @staticmethod
    def _mark_longest_logs(view: View, by_node: dict[int, Candidate]) -> None:
        """In each shard, everyone but the longest log's owner is ``joined``: it receives that log's tail."""
        for sg, shards in enumerate(view.subgroup_shard_views):
            for shard, sv in enumerate(shards):
                if not sv.members:
                    continue
                key = f"{sg}/{shard}"
                lengths = {m: _persisted(by_node[m].info, key) for m in sv.members}
                longest = max(sv.members, key=lambda m: (lengths[m], -sv.members.index(m)))
                sv.joined = [m for m in sv.members if m != longest]
                sv.departed = []


def _persisted(info: RestartInfo | None, key: str) -> int:
    return info.persisted.get(key, -1) if info is not None else -1
