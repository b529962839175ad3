"""Raw (unordered) shards push back on senders when a member's application falls behind.

Raw shards deliver on receipt, so their windows count receipts. With ``track_applied`` (an engine
with a listener) a member reports receipt per sender only up to the oldest raw delivery its
application has not finished: a slow handler closes the senders' windows instead of letting
delivered messages pile up in its delivery queue. The final (wedged) status still reports what was
really received, which the ragged trim needs.
"""

from __future__ import annotations

from derecho_core.protocol import wire
from derecho_core.protocol.multicast import ShardMulticast, ShardParams
from derecho_core.view import SubView

WINDOW = 4


def pair(track_applied: bool) -> tuple[ShardMulticast, ShardMulticast]:
    sv = SubView([0, 1], "Raw")
    a = ShardMulticast(1, 0, 0, sv, 0, ShardParams(window_size=WINDOW))
    b = ShardMulticast(1, 0, 0, sv, 1, ShardParams(window_size=WINDOW))
    a.track_applied = b.track_applied = track_applied
    return a, b


def exchange(a: ShardMulticast, b: ShardMulticast, rounds: int = 3) -> None:
    """Run both shards and carry their messages until nothing moves."""
    nodes = {0: a, 1: b}
    for _ in range(rounds):
        for shard in (a, b):
            shard.pump()
            shard.deliver()
            shard.flush()
        for me, shard in nodes.items():
            out, shard.out = shard.out, []
            for to, data in out:
                msg = wire.decode_any(data)
                nodes[to].on_message(me, msg[2], msg[3:])


def test_a_member_that_does_not_finish_its_raw_deliveries_closes_the_senders_window() -> None:
    a, b = pair(track_applied=True)
    for i in range(3 * WINDOW):
        a.submit(b"m%d" % i, False, i)
    exchange(a, b)
    got = b.deliveries
    assert len(got) == WINDOW  # window_size in flight: nothing past what the applications finished
    assert a.next_index == WINDOW and len(a.queue) == 2 * WINDOW
    exchange(a, b)
    assert a.next_index == WINDOW  # still closed: neither application reported anything
    b.deliveries = []
    a.applied_raw(0, got[-1].index)  # the sender's own handler finishes its own messages...
    exchange(a, b)
    assert a.next_index == WINDOW  # ...but b's has not
    b.applied_raw(0, got[-1].index)
    exchange(a, b)
    assert [d.payload for d in b.deliveries] == [b"m%d" % i for i in range(WINDOW, 2 * WINDOW)]
    assert len(a.queue) == WINDOW

def test_without_tracking_raw_windows_open_on_receipt() -> None:
    a, b = pair(track_applied=False)
    for i in range(3 * WINDOW):
        a.submit(b"m%d" % i, False, i)
    exchange(a, b, rounds=6)
    assert len(b.deliveries) == 3 * WINDOW and not a.queue


def test_the_final_status_reports_what_was_really_received() -> None:
    a, b = pair(track_applied=True)
    for i in range(WINDOW):
        a.submit(b"m%d" % i, False, i)
    exchange(a, b)
    assert b.reported_received()[0] == -1  # nothing finished yet
    b.wedge()
    assert b.reported_received() == b.num_received and b.num_received[0] == WINDOW - 1


def test_finishing_deliveries_of_a_sender_that_is_not_one_is_ignored() -> None:
    a, b = pair(track_applied=True)
    b.applied_raw(42, 10)
    assert b.reported_received() == [-1, -1]
