"""Keyed GMS frames cannot be replayed (docs/security.md).

A join travels as one frame per TCP connection, with no challenge. With a cluster key each frame carries
a stamp (the sender's clock and 8 random bytes) under its MAC; a receiver refuses a stamp more than
``REPLAY_WINDOW_S`` from its own clock and a stamp it already accepted, each with a WARNING naming the
sender's address and what it claimed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from derecho_core.gms_channel import REPLAY_WINDOW_S, GmsChannel
from derecho_core.protocol import wire

KEY = b"k" * 32


def join(node: int) -> bytes:
    return wire.encode(wire.JOIN, node, ["127.0.0.1", 1, 2, 3, 4, 5], 77, None)


def deliver(channel: GmsChannel, frame: bytes) -> None:
    """Feed one frame to ``channel`` as if a peer connected and sent it."""
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (b.sendall(frame), b.shutdown(socket.SHUT_WR)), daemon=True)
    writer.start()
    try:
        channel._read_one(a, ("127.0.0.9", 4242))
    finally:
        writer.join(5)
        b.close()


@pytest.fixture
def receiver() -> tuple[GmsChannel, list[bytes]]:
    got: list[bytes] = []
    return GmsChannel.detached(KEY, got.append), got


def test_a_keyed_frame_is_accepted_once(receiver, caplog) -> None:
    channel, got = receiver
    frame = GmsChannel.detached(KEY)._frame(join(5))
    with caplog.at_level(logging.WARNING, logger="derecho.viewmanager"):
        deliver(channel, frame)
        deliver(channel, frame)  # recorded on the network and sent again
    assert got == [join(5)]
    assert any("refused a join from 127.0.0.9:4242 (claims node id 5): the same frame was accepted before: "
               "a replayed frame" in r.getMessage() for r in caplog.records), caplog.text


def test_a_frame_from_outside_the_window_is_refused(receiver, caplog) -> None:
    channel, got = receiver
    old = time.time_ns() - int((REPLAY_WINDOW_S + 60) * 1e9)
    with caplog.at_level(logging.WARNING, logger="derecho.viewmanager"):
        deliver(channel, GmsChannel.detached(KEY)._frame(join(6), now_ns=old))
    assert got == []
    assert any("refused a join from 127.0.0.9:4242 (claims node id 6): its timestamp is 180 s behind this node's "
               "clock" in r.getMessage() and "NTP" in r.getMessage() for r in caplog.records), caplog.text


def test_fresh_frames_of_the_same_message_are_each_accepted(receiver) -> None:
    # a joiner retries its JOIN: each retry is a new frame with a new stamp
    channel, got = receiver
    sender = GmsChannel.detached(KEY)
    for _ in range(3):
        deliver(channel, sender._frame(join(7)))
    assert got == [join(7)] * 3


def test_a_changed_stamp_breaks_the_mac(receiver, caplog) -> None:
    channel, got = receiver
    frame = bytearray(GmsChannel.detached(KEY)._frame(join(8)))
    frame[-33] ^= 1  # the last byte of the stamp
    with caplog.at_level(logging.WARNING, logger="derecho.viewmanager"):
        deliver(channel, bytes(frame))
    assert got == []
    assert "bad or missing cluster key" in caplog.text


def test_without_a_key_frames_carry_no_stamp() -> None:
    got: list[bytes] = []
    deliver(GmsChannel.detached(None, got.append), GmsChannel.detached(None)._frame(join(9)))
    assert got == [join(9)]
    assert len(GmsChannel.detached(None)._frame(join(9))) == 8 + len(join(9))
