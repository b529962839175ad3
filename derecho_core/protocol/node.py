"""One node's whole protocol: membership plus multicast, still pure (events in, actions out).

The engine and the simulator both drive this class. It multiplexes the layers
on the transport (one leading byte names the layer), hands membership's wedge
and install decisions to the multicast layer, holds the view change until the
ragged trim is delivered, buffers multicast traffic that arrives for a view
this node has not installed yet, and re-sends this node's undelivered
messages in the next view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..view import View
from . import wire
from .events import (
    Action,
    Event,
    InstallView,
    Log,
    Received,
    Send,
    WedgeView,
)
from .membership import Membership
from .multicast import Delivery, PayloadTooLarge, ShardParams, ViewMulticast, decode_block
from .progress import LocalProgress, ProgressTracker

CH_MEMBERSHIP = b"M"
CH_MULTICAST = b"C"
CH_BLOCK = b"K"
CH_PROGRESS = b"G"
MAX_EARLY = 100_000  # multicast messages held for a view not installed yet


@dataclass(frozen=True, slots=True)
class SendRequest:
    """The application multicasts ``payload`` in subgroup ``subgroup_id`` (raw send or an RPC)."""

    subgroup_id: int
    payload: bytes
    cooked: bool = False
    timestamp_ns: int = 0
    tag: Any = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Deliver a multicast message to the application (in delivery order)."""

    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Applied:
    """The application finished the deliveries of subgroup ``subgroup_id`` in view ``vid`` up to ``seq``."""

    vid: int
    subgroup_id: int
    seq: int
    #: raw (unordered) deliveries finished: (sender node id, last index) pairs
    raw: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SendRejected:
    tag: Any
    error: Exception


class NodeProtocol:
    """Membership and multicast of one node. ``params_for(profile)`` gives a profile's :class:`ShardParams`."""

    def __init__(self, membership: Membership, params_for: Callable[[str], ShardParams] | None = None, *,
                 track_applied: bool = False) -> None:
        #: the application reports finished deliveries (:class:`Applied`): windows wait for it
        self.track_applied = track_applied
        self.membership = membership
        self.params_for = params_for or (lambda profile: ShardParams())
        self.multicast: ViewMulticast | None = None
        self._early: list[tuple[int, int, Any]] = []  # (vid, sender, (is_block, data))
        self._out: list[Action] = []
        self.progress = ProgressTracker(membership.id)
        membership.ready_to_install = self._ready_to_install

    @property
    def view(self) -> View | None:
        return self.membership.view

    # ------------------------------------------------------------------ entry points
    def start_new_group(self, now: float) -> list[Action]:
        return self._after(self.membership.start_new_group(now), now)

    def start_join(self, contact: tuple[str, int], now: float) -> list[Action]:
        return self._after(self.membership.start_join(contact, now), now)

    def next_deadline(self) -> float:
        return self.membership.next_deadline()

    def handle(self, event: Event | SendRequest, now: float) -> list[Action]:
        if isinstance(event, (SendRequest, LocalProgress, Applied)) or (
                isinstance(event, Received) and bytes(event.data[:1]) == CH_PROGRESS):
            return self.handle_many([event], now)
        if isinstance(event, Received):
            data = event.data
            channel = bytes(data[:1])
            if channel == CH_MEMBERSHIP:
                return self._after(self.membership.handle(Received(event.node_id, data[1:]), now), now)
            if channel in (CH_MULTICAST, CH_BLOCK):
                self._on_multicast(event.node_id, data[1:], channel == CH_BLOCK)
                # only a view change in progress can be waiting for the multicast layer (the ragged trim)
                m = self.membership
                busy = m.view is not None and m.stopped is None and m.my_row.wedged
                return self._after(m.poke(now) if busy else [], now)
            self._out.append(Log(logging.WARNING, "dropped a message from node %d on unknown channel %r",
                                 (event.node_id, channel)))
            return self._after([], now)
        return self._after(self.membership.handle(event, now), now)

    def handle_many(self, events: list[Any], now: float) -> list[Action]:
        """Handle a batch of events with one multicast step at the end.

        This is where batching comes from: sends queued together leave in one
        transport message per peer, and one status update covers many receipts.
        """
        actions: list[Action] = []
        poke = False
        for event in events:
            if isinstance(event, SendRequest):
                self._submit(event)
            elif isinstance(event, Applied):
                mc = self.multicast
                shard = mc.shards.get(event.subgroup_id) if mc is not None and mc.vid == event.vid else None
                if shard is not None:
                    if event.seq >= 0:
                        shard.applied(event.seq)
                    for sender, index in event.raw:
                        shard.applied_raw(sender, index)
            elif isinstance(event, LocalProgress):
                sends, changed = self.progress.local(event)
                self._out.extend(Send(node, CH_PROGRESS + data) for node, data in sends)
                self._out.extend(changed)
            elif isinstance(event, Received) and bytes(event.data[:1]) == CH_PROGRESS:
                try:
                    self._out.extend(self.progress.on_message(event.node_id, event.data[1:]))
                except wire.WireError as exc:
                    self._out.append(Log(logging.WARNING, "dropped a bad progress report from node %d: %s",
                                         (event.node_id, exc)))
            elif isinstance(event, Received) and bytes(event.data[:1]) in (CH_MULTICAST, CH_BLOCK):
                self._on_multicast(event.node_id, event.data[1:], bytes(event.data[:1]) == CH_BLOCK)
                poke = True
            elif isinstance(event, Received) and bytes(event.data[:1]) == CH_MEMBERSHIP:
                actions.extend(self.membership.handle(Received(event.node_id, event.data[1:]), now))
            elif isinstance(event, Received):
                self._out.append(Log(logging.WARNING, "dropped a message from node %d on unknown channel %r",
                                     (event.node_id, bytes(event.data[:1]))))
            else:
                actions.extend(self.membership.handle(event, now))
        m = self.membership
        if poke and m.view is not None and m.stopped is None and m.my_row.wedged:
            actions.extend(m.poke(now))
        return self._after(actions, now)

    # ------------------------------------------------------------------ multicast in
    def _on_multicast(self, sender: int, data: Any, block: bool = False) -> None:
        try:
            if block:
                header, payload = decode_block(data)
                vid = wire.check_int(header[0], "vid")
            else:
                msg = wire.decode_any(data)
                if not isinstance(msg, list) or len(msg) < 3:
                    raise wire.WireError("multicast message must be [vid, subgroup, kind, ...]")
                vid = wire.check_int(msg[0], "vid")
            mc = self.multicast
            if mc is None or vid > mc.vid:
                if len(self._early) < MAX_EARLY:
                    self._early.append((vid, sender, (block, data)))
                return
            if vid < mc.vid:
                return
            if block:
                mc.on_block(sender, header, payload)
            else:
                mc.on_message(sender, data)
        except wire.WireError as exc:
            self._out.append(Log(logging.WARNING, "dropped a bad multicast message from node %d: %s",
                                 (sender, exc)))

    def _submit(self, req: SendRequest) -> None:
        mc = self.multicast
        shard = mc.shards.get(req.subgroup_id) if mc is not None else None
        if shard is None:
            self._out.append(SendRejected(req.tag, LookupError(
                f"node {self.membership.id} is not a member of subgroup {req.subgroup_id} in the current view")))
            return
        try:
            shard.submit(req.payload, req.cooked, req.timestamp_ns)
        except (PayloadTooLarge, PermissionError) as exc:
            self._out.append(SendRejected(req.tag, exc))

    # ------------------------------------------------------------------ glue
    def _ready_to_install(self, vid: int) -> bool:
        mc = self.multicast
        if mc is None or mc.vid != vid:
            return True
        mc.set_failed(self.membership.failed_nodes())
        return mc.ragged_trim_done()

    def _after(self, actions: list[Action], now: float) -> list[Action]:
        """Interleave the multicast layer's work with membership's actions, in a safe order."""
        out: list[Action] = []
        for action in actions:
            if isinstance(action, Send):
                out.append(Send(action.node_id, CH_MEMBERSHIP + action.data))
            elif isinstance(action, WedgeView):
                if self.multicast is not None and self.multicast.vid == action.vid:
                    self.multicast.wedge()
                    out.extend(self._drain_multicast())
                out.append(action)
            elif isinstance(action, InstallView):
                out.extend(self._drain_multicast())  # the old view's last deliveries come first
                out.append(action)
                self._install(action.view)
            else:
                out.append(action)
        failed = self.membership.failed_nodes()
        if failed:
            out.extend(self.progress.set_failed(failed))
        if self.multicast is not None:
            self.multicast.set_failed(failed)
            self.multicast.step()
            out.extend(self._drain_multicast())
        out.extend(self._out)
        self._out = []
        return out

    def _drain_multicast(self) -> list[Action]:
        mc = self.multicast
        if mc is None:
            return []
        out: list[Action] = [Deliver(d) for d in mc.take_deliveries()]
        for node, data in mc.flush():
            if isinstance(data, tuple):  # an RDMC block: header and a view of the bytes, sent without a copy
                out.append(Send(node, (CH_BLOCK + data[0], data[1])))  # type: ignore[arg-type]
            else:
                out.append(Send(node, CH_MULTICAST + data))
        return out

    def _install(self, view: View) -> None:
        old = self.multicast
        resend: dict[int, list[Any]] = {}
        if old is not None:
            for sg, shard in old.shards.items():
                resend[sg] = shard.undelivered_own()
        self.progress.install(view)
        self.multicast = ViewMulticast(view, self.membership.id, self.params_for) \
            if view.subgroup_shard_views else None
        mc = self.multicast
        if mc is not None:
            for shard in mc.shards.values():
                shard.track_applied = self.track_applied
            for sg, pending in resend.items():
                shard = mc.shards.get(sg)
                if shard is not None and shard.my_sender_rank >= 0:
                    shard.queue.extend(pending)
                elif pending:
                    self._out.append(Log(logging.WARNING, "%d undelivered message(s) of subgroup %d dropped: "
                                         "node %d is no sender there in view %d", (len(pending), sg,
                                                                                  self.membership.id, view.vid)))
            early, self._early = self._early, []
            for _vid, sender, (block, data) in early:
                self._on_multicast(sender, data, block)  # now this view's, or kept for a later one
        else:
            self._early = []
