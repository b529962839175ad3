"""Per-shard atomic multicast: round-robin total order, stability, nulls, window, raw mode, ragged trim.

A pure state machine (DESIGN §4) following Derecho's MulticastGroup (spec §5):

* senders number their messages 0, 1, 2...; the global order is
  ``seq = index × n_senders + sender_rank``;
* small messages (SMC) go straight to every shard member, many in one
  transport message; large ones (RDMC) are cut into ``block_size`` blocks that
  the members relay to each other along the configured schedule
  (:mod:`derecho_core.protocol.rdmc`);
* every member pushes its receive frontier (``seq_num``, ``num_received``)
  and ``delivered_num`` to the shard, like an SST row;
* ORDERED: a message is delivered once every live shard member has received
  it and everything before it; idle senders send null messages so the round
  robin keeps moving; a sender may have ``window_size`` messages in flight;
* UNORDERED ("Raw"): delivered on receipt in per-sender FIFO order;
* at a view change the shard leader computes the ragged trim (per sender, the
  last message every live member received), members echo it, and everyone
  delivers exactly up to it; a new shard leader reuses a trim already echoed.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..view import Mode, SubView
from . import rdmc, wire

#: message kinds on the multicast channel: [vid, subgroup_id, kind, ...]
DATA = "d"      # [vid, sg, DATA, first_index, [entry, ...]]   entry: [ts, cooked, payload] or [-k] (k nulls)
# RDMC blocks travel on their own channel as a msgpack header followed by the raw block bytes (no copy):
#   header [vid, sg, sender_id, index, ts, cooked, total_len, block_no, n_blocks]; see encode_block
STATUS = "s"    # [vid, sg, STATUS, seq_num, delivered_num, [num_received per sender], final]
TRIM = "t"      # [vid, sg, TRIM, leader_id, [last index per sender]]
ECHO = "e"      # [vid, sg, ECHO, leader_id, [last index per sender]]

INVALID_VERSION = -1


_HEADER_LEN = struct.Struct("<I")


def encode_block_header(vid: int, sg: int, origin: int, index: int, ts: int, cooked: bool, total: int,
                        block: int, n_blocks: int) -> bytes:
    """The framing of an RDMC block: u32 header length, msgpack header; the raw block bytes follow."""
    header = wire.encode(vid, sg, origin, index, ts, cooked, total, block, n_blocks)
    return _HEADER_LEN.pack(len(header)) + header


def decode_block(data: Any) -> tuple[list[Any], memoryview]:
    """Split a block frame into its header fields and a zero-copy view of the block bytes."""
    view = memoryview(data)
    if len(view) < 4:
        raise wire.WireError("truncated RDMC block frame")
    (n,) = _HEADER_LEN.unpack(view[:4])
    if n > 4096 or 4 + n > len(view):
        raise wire.WireError(f"RDMC block header of {n} bytes in a frame of {len(view)}")
    header = wire.decode_any(view[4:4 + n])
    if not isinstance(header, list) or len(header) != 9:
        raise wire.WireError("an RDMC block header must have 9 fields")
    return header, view[4 + n:]


def make_version(vid: int, seq: int) -> int:
    """Derecho's version number: the view id in the high 32 bits, the sequence number in the low."""
    return (vid << 32) | (seq & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message to hand to the application (or the RPC layer) in delivery order."""

    vid: int
    subgroup_id: int
    shard: int
    sender_id: int
    index: int
    seq: int
    version: int
    timestamp_ns: int
    cooked: bool
    payload: bytes


@dataclass(frozen=True)
class ShardParams:
    window_size: int = 16
    max_payload_size: int = 10240
    max_smc_payload_size: int = 10240
    block_size: int = 1 << 20
    rdmc_send_algorithm: str = "binomial_send"


class PayloadTooLarge(ValueError):
    """A payload over ``max_payload_size`` of its shard's profile."""


@dataclass
class _Pending:
    payload: bytes
    cooked: bool
    timestamp_ns: int


@dataclass
class _Partial:
    """An RDMC message being received block by block."""

    ts: int
    cooked: bool
    total: int
    n_blocks: int
    blocks: dict[int, bytes] = field(default_factory=dict)


class ShardMulticast:
    """Multicast in one shard of one subgroup, for one view."""

    def __init__(self, vid: int, subgroup_id: int, shard: int, subview: SubView, my_id: int,
                 params: ShardParams) -> None:
        self.vid = vid
        self.sg = subgroup_id
        self.shard = shard
        self.members = list(subview.members)
        self.mode = subview.mode
        self.senders = subview.senders
        self.n_s = len(self.senders)
        self.my_id = my_id
        self.my_sender_rank = self.senders.index(my_id) if my_id in self.senders else -1
        self.params = params
        self.failed: set[int] = set()
        # sending
        self.next_index = 0
        self.queue: deque[_Pending] = deque()
        self.own: dict[int, _Pending] = {}  # my messages by index, kept until delivered (for re-sending)
        # receiving
        self.received: list[dict[int, tuple[int, bool, bytes] | None]] = [{} for _ in self.senders]
        self.num_received = [-1] * self.n_s
        self.partials: dict[tuple[int, int], _Partial] = {}
        self.seq_num = -1
        self.delivered_num = -1
        # Sequence numbers of deliveries handed to the application that it has not finished yet (only
        # when the engine reports progress, ``track_applied``). STATUS reports delivery up to the one
        # before the oldest of them, so a slow handler or disk closes the senders' windows instead of
        # letting delivered messages pile up in memory.
        self.track_applied = False
        self.unapplied: deque[int] = deque()
        self.raw_delivered = [-1] * self.n_s
        # Raw shards open windows on receipt: with ``track_applied`` STATUS reports receipt per sender
        # only up to the oldest raw delivery the application has not finished (until the final status,
        # which must be the truth for the ragged trim), so a slow handler pushes back there too.
        self.unapplied_raw: list[deque[int]] = [deque() for _ in self.senders]
        # what the other members told us (SST rows)
        self.status: dict[int, tuple[int, int, list[int]]] = {}
        self.final: dict[int, list[int]] = {}
        # view change
        self.wedged = False
        self.trim: tuple[int, list[int]] | None = None        # (leader, per-sender last index) I echoed
        self.echoes: dict[int, tuple[int, list[int]]] = {}
        self.published: tuple[int, list[int]] | None = None
        self.trims_from: dict[int, list[int]] = {}
        self.trim_delivered = False
        # output
        self._data_out: list[list[Any]] = []
        self._data_first = 0
        self._status_dirty = True
        #: (node, bytes) on the multicast channel, or (node, (block header, block view)) for RDMC blocks
        self.out: list[tuple[int, Any]] = []
        self.deliveries: list[Delivery] = []
        self.log: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ helpers
    @property
    def ordered(self) -> bool:
        return self.mode == Mode.ORDERED

    def live_members(self) -> list[int]:
        return [m for m in self.members if m not in self.failed]

    def _others(self) -> list[int]:
        return [m for m in self.members if m != self.my_id and m not in self.failed]

    def _send_all(self, msg: bytes) -> None:
        for m in self._others():
            self.out.append((m, msg))

    def _encode(self, kind: str, *fields: Any) -> bytes:
        return wire.encode(self.vid, self.sg, kind, *fields)

    def shard_leader(self) -> int:
        return next(m for m in self.members if m not in self.failed)

    # ------------------------------------------------------------------ sending
    def submit(self, payload: bytes, cooked: bool, timestamp_ns: int) -> None:
        """Queue a message; it gets an index when the window allows."""
        if self.my_sender_rank < 0:
            raise PermissionError(f"node {self.my_id} is not a sender in subgroup {self.sg} shard {self.shard}")
        if len(payload) > self.params.max_payload_size:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes exceeds max_payload_size = {self.params.max_payload_size} "
                f"of subgroup {self.sg}'s profile; raise SUBGROUP/<PROFILE>/max_payload_size")
        self.queue.append(_Pending(bytes(payload), cooked, timestamp_ns))

    def _window_open(self) -> bool:
        f = self.next_index
        w = self.params.window_size
        if f < w:
            return True
        for m in self.live_members():
            if m == self.my_id:
                delivered, num_received = self.reported_delivered(), self.reported_received()
            else:
                st = self.status.get(m)
                if st is None:
                    return False
                _, delivered, num_received = st
            if self.ordered:
                if delivered < (f - w) * self.n_s + self.my_sender_rank:
                    return False
            elif num_received[self.my_sender_rank] < f - w:
                return False
        return True

    def pump(self) -> None:
        """Assign indices to queued messages while the window allows, and send them."""
        if self.wedged:
            return
        while self.queue and self._window_open():
            p = self.queue.popleft()
            self._emit(self.next_index, p)
            self.next_index += 1

    def _emit(self, index: int, p: _Pending) -> None:
        self.own[index] = p
        if len(p.payload) <= self.params.max_smc_payload_size or len(self._others()) == 0:
            self._append_data(index, [p.timestamp_ns, p.cooked, p.payload])
        else:
            self._flush_data()
            self._send_blocks(index, p)
        self._record(self.my_sender_rank, index, (p.timestamp_ns, p.cooked, p.payload))

    def _append_data(self, index: int, entry: list[Any]) -> None:
        if not self._data_out:
            self._data_first = index
        self._data_out.append(entry)

    def _send_nulls(self, upto_exclusive: int) -> None:
        """Nulls for my indices next_index .. upto_exclusive-1, batched into one entry."""
        k = upto_exclusive - self.next_index
        if k <= 0 or self.wedged:
            return
        if self.queue and self._window_open():
            return  # a real message will advance the round robin instead
        first = self.next_index
        self._append_data(first, [-k])
        for i in range(first, upto_exclusive):
            self._record(self.my_sender_rank, i, None)
        self.next_index = upto_exclusive

    def _flush_data(self) -> None:
        if self._data_out:
            self._send_all(self._encode(DATA, self._data_first, self._data_out))
            self._data_out = []

    def _send_blocks(self, index: int, p: _Pending) -> None:
        bs = self.params.block_size
        n_blocks = max(1, -(-len(p.payload) // bs))
        # every member derives the same schedule from the full member list rotated to the sender; blocks
        # meant for (or relayed through) failed members are lost, and the ragged trim accounts for it
        order = [self.my_id] + [m for m in self.members if m != self.my_id]
        view = memoryview(p.payload)
        for block, target in rdmc.first_sends(self.params.rdmc_send_algorithm, len(order), n_blocks):
            if order[target] not in self.failed:
                self.out.append((order[target], (
                    encode_block_header(self.vid, self.sg, self.my_id, index, p.timestamp_ns, p.cooked,
                                        len(p.payload), block, n_blocks),
                    view[block * bs:(block + 1) * bs])))

    # ------------------------------------------------------------------ receiving
    def on_message(self, sender: int, kind: str, fields: list[Any]) -> None:
        if sender not in self.members or sender in self.failed:
            return
        if kind == DATA:
            self._on_data(sender, fields)
        elif kind == STATUS:
            self._on_status(sender, fields)
        elif kind in (TRIM, ECHO):
            self._on_trim(sender, kind, fields)
        else:
            raise wire.WireError(f"unknown multicast message kind {kind!r}")

    def _on_data(self, sender: int, fields: list[Any]) -> None:
        if len(fields) != 2 or not isinstance(fields[1], list):
            raise wire.WireError("DATA must be [first_index, [entries]]")
        rank = self._sender_rank(sender)
        index = wire.check_int(fields[0], "first index")
        # The window lets a sender's index run at most window_size rounds ahead of what every member
        # (this one included) delivered, and nulls only catch a sender up with such messages. An index
        # far past that is garbage: answering it (or recording a null run to it) would take ages.
        # (raw shards' windows count receipts, ordered ones deliveries: the larger bound covers both)
        limit = max(max(self.seq_num, 0) // max(self.n_s, 1), self.num_received[rank]) \
            + 2 * self.params.window_size + 16
        if index + len(fields[1]) - 1 > limit:
            raise wire.WireError(f"DATA from index {index} reaches past the window (index {limit} at most)")
        for entry in fields[1]:
            if not isinstance(entry, list):
                raise wire.WireError("DATA entry must be a list")
            if len(entry) == 1:
                k = wire.check_int(-entry[0] if isinstance(entry[0], int) else None, "null count", 1, 1 << 31)
                if index + k - 1 > limit:
                    raise wire.WireError(f"a run of {k} nulls from index {index} reaches past the window "
                                         f"(index {limit} at most)")
                for i in range(index, index + k):
                    self._record(rank, i, None)
                index += k
            elif len(entry) == 3 and isinstance(entry[1], bool) and isinstance(entry[2], bytes):
                self._record(rank, index, (wire.check_int(entry[0], "timestamp"), entry[1], entry[2]))
                index += 1
            else:
                raise wire.WireError(f"bad DATA entry {entry!r}")
        self._answer_with_nulls(rank, index - 1)

    def on_block(self, sender: int, fields: list[Any], data: Any) -> None:
        """An RDMC block: ``fields`` from its header (after vid and subgroup), ``data`` a memoryview."""
        if sender not in self.members or sender in self.failed:
            return
        if len(fields) != 7:
            raise wire.WireError("an RDMC block header must have 9 fields")
        origin, index, ts, cooked, total, block, n_blocks = fields
        origin = wire.check_int(origin, "origin")
        index = wire.check_int(index, "index")
        block = wire.check_int(block, "block")
        n_blocks = wire.check_int(n_blocks, "block count", 1, 1 << 24)
        total = wire.check_int(total, "length", 0, self.params.max_payload_size)
        # the sender cuts ``total`` bytes into blocks of block_size (_send_blocks): any other count is garbage,
        # and a huge one would make rdmc.relays compute a schedule of millions of blocks
        if origin not in self.senders or not isinstance(cooked, bool) or block >= n_blocks \
                or n_blocks != max(1, -(-total // self.params.block_size)) or len(data) > self.params.block_size:
            raise wire.WireError("malformed BLOCK")
        rank = self.senders.index(origin)
        if index <= self.num_received[rank] or index in self.received[rank]:
            return
        partial = self.partials.setdefault((rank, index), _Partial(wire.check_int(ts, "timestamp"), cooked,
                                                                   total, n_blocks))
        if block in partial.blocks:
            return
        partial.blocks[block] = data
        # relay along the schedule: the rotated member list puts the origin first
        order = [origin] + [m for m in self.members if m != origin]
        me = order.index(self.my_id)
        for target_rank in rdmc.relays(self.params.rdmc_send_algorithm, len(order), n_blocks, me, block):
            target = order[target_rank]
            if target not in self.failed:
                self.out.append((target, (encode_block_header(self.vid, self.sg, origin, index, partial.ts, cooked,
                                                              total, block, n_blocks), data)))
        if len(partial.blocks) == n_blocks:
            del self.partials[(rank, index)]
            # one block: keep the received memory as it is (the transport hands it over); else one copy
            payload = partial.blocks[0] if n_blocks == 1 else b"".join(partial.blocks[b] for b in range(n_blocks))
            if len(payload) != total:
                raise wire.WireError(f"RDMC message of {len(payload)} bytes announced as {total}")
            self._record(rank, index, (partial.ts, cooked, payload))
            self._answer_with_nulls(rank, index)

    def _sender_rank(self, node: int) -> int:
        if node not in self.senders:
            raise wire.WireError(f"node {node} is not a sender in subgroup {self.sg}")
        return self.senders.index(node)

    def _record(self, rank: int, index: int, entry: tuple[int, bool, bytes] | None) -> None:
        if index <= self.num_received[rank] or index in self.received[rank]:
            return  # a duplicate
        self.received[rank][index] = entry
        n = self.num_received[rank]
        while n + 1 in self.received[rank]:
            n += 1
        if n != self.num_received[rank]:
            self.num_received[rank] = n
            self._status_dirty = True
            self._update_seq_num()

    def _update_seq_num(self) -> None:
        if not self.ordered or self.n_s == 0:
            return
        low = min(self.num_received)
        argmin = self.num_received.index(low)
        seq = (low + 1) * self.n_s + argmin - 1
        if seq != self.seq_num:
            self.seq_num = seq
            self._status_dirty = True

    def _answer_with_nulls(self, rank: int, index: int) -> None:
        """Spec §5.5: an idle sender answers a message with nulls so the round robin advances."""
        me = self.my_sender_rank
        if not self.ordered or me < 0 or rank == me:
            return
        self._send_nulls(index + 1 if me < rank else index)

    def _on_status(self, sender: int, fields: list[Any]) -> None:
        if len(fields) != 4 or not isinstance(fields[2], list) or len(fields[2]) != self.n_s \
                or not isinstance(fields[3], bool):
            raise wire.WireError("STATUS must be [seq_num, delivered_num, [num_received], final]")
        seq = wire.check_int(fields[0], "seq_num", -1)
        delivered = wire.check_int(fields[1], "delivered_num", -1)
        nr = [wire.check_int(x, "num_received", -1) for x in fields[2]]
        self.status[sender] = (seq, delivered, nr)
        if fields[3]:
            self.final[sender] = nr

    # ------------------------------------------------------------------ delivery
    def deliver(self) -> None:
        if self.trim_delivered:
            return
        if self.ordered:
            if self.wedged:
                return  # from here on only the ragged trim delivers (it is computed from the final reports)
            # over every shard member, failed ones included (their last status is frozen): a message
            # delivered here is then within any ragged trim the live members can compute
            stable = self.seq_num
            for m in self.members:
                if m != self.my_id:
                    st = self.status.get(m)
                    stable = min(stable, st[0] if st else -1)
            while self.delivered_num < stable:
                self._deliver_seq(self.delivered_num + 1)
        else:
            for rank in range(self.n_s):
                while self.raw_delivered[rank] < self.num_received[rank]:
                    self.raw_delivered[rank] += 1
                    self._deliver_raw(rank, self.raw_delivered[rank])

    def _deliver_seq(self, seq: int) -> None:
        rank, index = seq % self.n_s, seq // self.n_s
        entry = self.received[rank].pop(index, None)
        self.delivered_num = seq
        self._status_dirty = True
        if rank == self.my_sender_rank:
            self.own.pop(index, None)
        if entry is not None:
            ts, cooked, payload = entry
            self.deliveries.append(Delivery(self.vid, self.sg, self.shard, self.senders[rank], index, seq,
                                            make_version(self.vid, seq), ts, cooked, payload))
            if self.track_applied:
                self.unapplied.append(seq)

    def _deliver_raw(self, rank: int, index: int) -> None:
        entry = self.received[rank].pop(index, None)
        if rank == self.my_sender_rank:
            self.own.pop(index, None)
        if entry is not None:
            ts, cooked, payload = entry
            self.deliveries.append(Delivery(self.vid, self.sg, self.shard, self.senders[rank], index, -1,
                                            INVALID_VERSION, ts, cooked, payload))
            if self.track_applied:
                self.unapplied_raw[rank].append(index)

    # ------------------------------------------------------------------ application progress
    def reported_delivered(self) -> int:
        """What STATUS says this node delivered: up to the application's progress when it is tracked."""
        return self.unapplied[0] - 1 if self.unapplied else self.delivered_num

    def reported_received(self) -> list[int]:
        """What STATUS says this node received per sender: raw shards count only finished deliveries."""
        if self.wedged or not self.track_applied or self.ordered:
            return self.num_received
        return [q[0] - 1 if q else n for q, n in zip(self.unapplied_raw, self.num_received, strict=True)]

    def applied_raw(self, sender: int, index: int) -> None:
        """The application finished the raw deliveries from ``sender`` up to ``index``."""
        if sender not in self.senders:
            return
        q = self.unapplied_raw[self.senders.index(sender)]
        if q and q[0] <= index:
            while q and q[0] <= index:
                q.popleft()
            self._status_dirty = True

    def applied(self, seq: int) -> None:
        """The application finished every delivery of this shard up to ``seq``."""
        before = self.reported_delivered()
        while self.unapplied and self.unapplied[0] <= seq:
            self.unapplied.popleft()
        if self.reported_delivered() != before:
            self._status_dirty = True

    # ------------------------------------------------------------------ status push
    def flush(self) -> None:
        self._flush_data()
        if self._status_dirty:
            self._status_dirty = False
            self._send_all(self._encode(STATUS, self.seq_num, self.reported_delivered(), self.reported_received(),
                                        self.wedged))

    # ------------------------------------------------------------------ view change
    def wedge(self) -> None:
        """Stop sending in this view. The final status tells the shard what this node received."""
        if self.wedged:
            return
        self._flush_data()
        self.wedged = True
        self._status_dirty = True

    def set_failed(self, nodes: Iterable[int]) -> None:
        self.failed |= set(nodes) & set(self.members)

    def ragged_trim_step(self) -> bool:
        """Advance the ragged trim (spec §3.5 steps 6–8); True once this shard delivered up to it."""
        if self.trim_delivered:
            return True
        if not self.wedged:
            return False
        live = self.live_members()
        leader = live[0]
        if leader == self.my_id and self.published is None:
            # a new leader reuses a trim some member already echoed (spec §3.7)
            adopted = next((t for m, t in sorted(self.echoes.items()) if m in live), None)
            if adopted is None and self.trim is not None:
                adopted = self.trim
            if adopted is None:
                finals = {m: self.final.get(m) for m in live if m != self.my_id}
                if any(v is None for v in finals.values()):
                    return False
                trim = list(self.num_received)
                for nr in finals.values():
                    assert nr is not None
                    trim = [min(a, b) for a, b in zip(trim, nr)]
                adopted = (self.my_id, trim)
            self.published = (self.my_id, list(adopted[1]))
            self._send_all(self._encode(TRIM, self.my_id, self.published[1]))
            self._echo(self.published)
        offered = self.trims_from.get(leader)
        if leader != self.my_id and offered is not None:
            self._echo((leader, offered))  # follow the current shard leader's trim
        if self.trim is None:
            return False
        for m in live:
            if m == self.my_id:
                continue
            echo = self.echoes.get(m)
            if echo is None or echo[1] != self.trim[1]:
                return False
        self._deliver_upto(self.trim[1])
        self.trim_delivered = True
        return True

    def _echo(self, trim: tuple[int, list[int]]) -> None:
        if self.trim is not None and self.trim[1] == trim[1]:
            return
        self.trim = (trim[0], list(trim[1]))
        self._send_all(self._encode(ECHO, trim[0], self.trim[1]))

    def _on_trim(self, sender: int, kind: str, fields: list[Any]) -> None:
        if len(fields) != 2 or not isinstance(fields[1], list) or len(fields[1]) != self.n_s:
            raise wire.WireError(f"{kind} must be [leader, [last index per sender]]")
        leader = wire.check_int(fields[0], "trim leader")
        trim = [wire.check_int(x, "trim index", -1) for x in fields[1]]
        # a trim is a minimum over the live members' receipts, this node's included: one beyond what this
        # node received is garbage (delivering up to it would also walk every sequence number in between)
        if any(t > nr for t, nr in zip(trim, self.num_received, strict=True)):
            raise wire.WireError(f"{kind} {trim} goes beyond what this node received {self.num_received}")
        if kind == ECHO:
            self.echoes[sender] = (leader, trim)
        else:
            self.trims_from[sender] = trim

    def _deliver_upto(self, trim: list[int]) -> None:
        """Deliver every received message within the trim, in seq order (spec §5.7)."""
        if not self.ordered:
            for rank in range(self.n_s):
                while self.raw_delivered[rank] < trim[rank]:
                    self.raw_delivered[rank] += 1
                    self._deliver_raw(rank, self.raw_delivered[rank])
            return
        if self.n_s == 0:
            return
        last = max(t * self.n_s + r for r, t in enumerate(trim))
        for seq in range(self.delivered_num + 1, last + 1):
            rank, index = seq % self.n_s, seq // self.n_s
            if index <= trim[rank]:
                self._deliver_seq(seq)
        self.delivered_num = max(self.delivered_num, last)

    def undelivered_own(self) -> list[_Pending]:
        """My messages not delivered in this view (to be re-sent in the next one), in order."""
        return [self.own[i] for i in sorted(self.own) if self.own[i] is not None] + list(self.queue)


class ViewMulticast:
    """Every shard this node belongs to in one view."""

    def __init__(self, view: Any, my_id: int, params_for: Any) -> None:
        self.vid = view.vid
        self.my_id = my_id
        self.shards: dict[int, ShardMulticast] = {}
        for sg, shards in enumerate(view.subgroup_shard_views):
            for shard_num, sv in enumerate(shards):
                if my_id in sv.members:
                    self.shards[sg] = ShardMulticast(view.vid, sg, shard_num, sv, my_id, params_for(sv.profile))

    def on_message(self, sender: int, data: Any) -> None:
        msg = wire.decode_any(data)
        if not isinstance(msg, list) or len(msg) < 3:
            raise wire.WireError("multicast message must be [vid, subgroup, kind, ...]")
        vid = wire.check_int(msg[0], "vid")
        sg = wire.check_int(msg[1], "subgroup id")
        if vid != self.vid:
            return
        shard = self.shards.get(sg)
        if shard is None:
            return
        if not isinstance(msg[2], str):
            raise wire.WireError("multicast kind must be a string")
        shard.on_message(sender, msg[2], msg[3:])

    def on_block(self, sender: int, header: list[Any], data: memoryview) -> None:
        vid = wire.check_int(header[0], "vid")
        sg = wire.check_int(header[1], "subgroup id")
        shard = self.shards.get(sg) if vid == self.vid else None
        if shard is not None:
            shard.on_block(sender, header[2:], data)

    def step(self) -> None:
        for shard in self.shards.values():
            shard.pump()
            shard.deliver()

    def flush(self) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for shard in self.shards.values():
            shard.flush()
            out.extend(shard.out)
            shard.out = []
        return out

    def take_deliveries(self) -> list[Delivery]:
        out: list[Delivery] = []
        for shard in self.shards.values():
            out.extend(shard.deliveries)
            shard.deliveries = []
        return out

    def wedge(self) -> None:
        for shard in self.shards.values():
            shard.wedge()

    def set_failed(self, nodes: Iterable[int]) -> None:
        for shard in self.shards.values():
            shard.set_failed(nodes)

    def ragged_trim_done(self) -> bool:
        done = True
        for shard in self.shards.values():
            done = shard.ragged_trim_step() and done
        return done

