"""Per-shard persistence and stability frontiers (the SST's ``persisted_num`` and frontier columns).

Each node tells its shard peers how far it has persisted each subgroup and its
local stability frontier (µs: no message it sends later can carry an earlier
timestamp). The shard-wide minimum over live members is the global persistence
frontier and the global stability frontier (spec §5.8, §7.2). Both only grow:
a member that has not reported yet (a joiner mid state transfer) holds them
where they are.

Pure like the rest of ``protocol``: values come in as events, messages go out
as ``(node, bytes)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from . import wire


@dataclass(frozen=True, slots=True)
class LocalProgress:
    """Event: this node persisted ``subgroup_id`` up to ``persisted``; its frontier is ``frontier_us``."""

    subgroup_id: int
    persisted: int
    frontier_us: int


@dataclass(frozen=True, slots=True)
class ShardProgress:
    """Action: the shard-wide frontiers of ``subgroup_id`` grew."""

    subgroup_id: int
    persisted: int
    frontier_us: int


class _Shard:
    def __init__(self, members: list[int]) -> None:
        self.members = members
        self.reports: dict[int, tuple[int, int]] = {}
        self.persisted = -1
        self.frontier_us = 0


class ProgressTracker:
    """Frontiers of every shard this node belongs to, carried across views."""

    def __init__(self, my_id: int) -> None:
        self.my_id = my_id
        self.vid = -1
        self.shards: dict[int, _Shard] = {}
        self.failed: set[int] = set()

    def install(self, view: Any) -> None:
        old = self.shards
        self.vid = view.vid
        self.failed = set()
        self.shards = {}
        for sg, shards in enumerate(view.subgroup_shard_views):
            for sv in shards:
                if self.my_id not in sv.members or sv.mode.name != "ORDERED":
                    continue
                shard = self.shards[sg] = _Shard(list(sv.members))
                before = old.get(sg)
                if before is not None:
                    shard.persisted, shard.frontier_us = before.persisted, before.frontier_us
                    shard.reports = {m: r for m, r in before.reports.items() if m in sv.members}

    def set_failed(self, nodes: Iterable[int]) -> list[ShardProgress]:
        self.failed |= set(nodes)
        return [p for sg in self.shards if (p := self._recompute(sg)) is not None]

    def local(self, event: LocalProgress) -> tuple[list[tuple[int, bytes]], list[ShardProgress]]:
        shard = self.shards.get(event.subgroup_id)
        if shard is None:
            return [], []
        mine = shard.reports.get(self.my_id, (-1, 0))
        report = (max(mine[0], event.persisted), max(mine[1], event.frontier_us))
        if report == mine:
            return [], []
        shard.reports[self.my_id] = report
        msg = wire.encode(self.vid, event.subgroup_id, report[0], report[1])
        out = [(m, msg) for m in shard.members if m != self.my_id and m not in self.failed]
        changed = self._recompute(event.subgroup_id)
        return out, [changed] if changed is not None else []

    def on_message(self, sender: int, data: Any) -> list[ShardProgress]:
        fields = wire.decode_any(data)
        if not isinstance(fields, list) or len(fields) != 4:
            raise wire.WireError("a progress report must be [vid, subgroup id, persisted, frontier]")
        sg = wire.check_int(fields[1], "subgroup id")
        persisted = wire.check_int(fields[2], "persisted", -1)
        frontier = wire.check_int(fields[3], "frontier")
        shard = self.shards.get(sg)
        if shard is None or sender not in shard.members:
            return []  # a report for a view or shard this node no longer shares with the sender
        old = shard.reports.get(sender, (-1, 0))
        shard.reports[sender] = (max(old[0], persisted), max(old[1], frontier))
        changed = self._recompute(sg)
        return [changed] if changed is not None else []

    def _recompute(self, sg: int) -> ShardProgress | None:
        shard = self.shards[sg]
        live = [m for m in shard.members if m not in self.failed]
        if not live or any(m not in shard.reports for m in live):
            return None
        persisted = min(shard.reports[m][0] for m in live)
        frontier = min(shard.reports[m][1] for m in live)
        if persisted <= shard.persisted and frontier <= shard.frontier_us:
            return None
        shard.persisted = max(shard.persisted, persisted)
        shard.frontier_us = max(shard.frontier_us, frontier)
        return ShardProgress(sg, shard.persisted, shard.frontier_us)
