"""The GMS channel: short TCP exchanges on ``gms_port`` for join traffic.

Joiners are not members yet, so they have no transport connection: like
Derecho's ``gms_listener``, a node accepts join requests (and sends redirects,
refusals and welcomes) over plain TCP, one length-prefixed frame per
connection. With a cluster key every frame carries a stamp (its sender's
wall-clock time and 8 random bytes) and an HMAC-SHA256 of payload and stamp,
so a process without the key cannot ask to join: its frame is dropped with
one WARNING naming its address ("GMS port: refused a join from
127.0.0.1:40312 (claims node id 5): bad or missing cluster key (...)").
There is no challenge (one frame per connection), so the stamp is what stops
a frame recorded on the network from being sent again: a receiver refuses a
stamp more than ``REPLAY_WINDOW_S`` away from its own clock, and a stamp it
has already accepted within that window. Members' clocks must therefore agree
to within ``REPLAY_WINDOW_S`` (NTP does far better); see docs/security.md.

One background thread accepts and reads; another sends (connect, write,
close), so neither ever blocks the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import socket
import struct
import threading
import time
from typing import Callable

log = logging.getLogger("derecho.viewmanager")

HEADER = struct.Struct("<4sI")
MAGIC = b"DGMS"
MAX_FRAME = 16 << 20
MAC_LEN = 32
STAMP = struct.Struct("<q8s")  # sender's time.time_ns(), 8 random bytes (keyed frames only)
#: a keyed frame whose stamp is further than this from the receiver's clock is refused as a replay
REPLAY_WINDOW_S = 120.0
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 5.0


class GmsChannel:
    def __init__(self, host: str, port: int, on_message: Callable[[bytes], None], key: bytes | None = None):
        self.host = host
        self.port = port
        self.on_message = on_message
        self.key = key
        self._init_replay_guard()
        self._out: queue.Queue[tuple[tuple[str, int], bytes] | None] = queue.Queue(maxsize=10_000)
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise OSError(exc.errno, f"cannot listen on GMS port {host}:{port} ({exc.strerror}); "
                          "another process may use it: pick another DERECHO/gms_port") from None
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept_loop, name=f"gms_listener-{port}", daemon=True),
                         threading.Thread(target=self._send_loop, name=f"gms_sender-{port}", daemon=True)]
        for t in self._threads:
            t.start()

    @classmethod
    def detached(cls, key: bytes | None, on_message: Callable[[bytes], None] | None = None,
                 port: int = 0) -> "GmsChannel":
        """A channel without sockets or threads: frames messages (``_frame``) and reads one frame from a
        given connection (``_read_one``). For tests and the fuzzer."""
        ch = object.__new__(cls)
        ch.host, ch.port, ch.key = "127.0.0.1", port, key
        ch.on_message = on_message if on_message is not None else (lambda data: None)
        ch._init_replay_guard()
        return ch

    def _init_replay_guard(self) -> None:
        self.replay_window_s = REPLAY_WINDOW_S
        self._seen: dict[bytes, float] = {}  # stamps accepted within the window -> when they expire
        self._seen_lock = threading.Lock()

    # ----------------------------------------------------------------- sending
    def send(self, address: tuple[str, int], data: bytes) -> None:
        try:
            self._out.put_nowait((address, data))
        except queue.Full:
            log.warning("GMS send queue full; dropping a message to %s:%d (the peer will retry)", *address)

    def _frame(self, data: bytes, *, now_ns: int | None = None, nonce: bytes | None = None) -> bytes:
        if not self.key:
            return HEADER.pack(MAGIC, len(data)) + data
        signed = data + STAMP.pack(time.time_ns() if now_ns is None else now_ns,
                                   os.urandom(8) if nonce is None else nonce)
        mac = hmac.new(self.key, signed, hashlib.sha256).digest()
        return HEADER.pack(MAGIC, len(signed) + len(mac)) + signed + mac

    def _send_loop(self) -> None:
        while not self._closing.is_set():
            item = self._out.get()
            if item is None:
                return
            address, data = item
            try:
                with socket.create_connection(address, timeout=CONNECT_TIMEOUT) as s:
                    s.sendall(self._frame(data))
                    s.shutdown(socket.SHUT_WR)
            except (OSError, ValueError) as exc:  # ValueError: a host name from a peer that is no host name
                log.debug("GMS message to %s:%s not delivered: %s", address[0], address[1], exc)
            except Exception:  # never let the sender die: no welcome, refusal or redirect would leave again
                log.exception("GMS message to %r not delivered", address)

    # ----------------------------------------------------------------- receiving
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read_one, args=(conn, peer), daemon=True,
                             name=f"gms_reader-{self.port}").start()

    def _read_one(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(READ_TIMEOUT)
            try:
                header = _recv_exact(conn, HEADER.size)
                magic, length = HEADER.unpack(header)
                if magic != MAGIC:
                    log.warning("GMS port: connection from %s:%d sent no GMS frame; closed", *peer)
                    return
                if length > MAX_FRAME:
                    log.warning("GMS port: %s:%d announced a %d-byte frame (limit %d); closed",
                                peer[0], peer[1], length, MAX_FRAME)
                    return
                body = _recv_exact(conn, length)
            except (OSError, EOFError) as exc:
                log.debug("GMS port: incomplete frame from %s:%d: %s", peer[0], peer[1], exc)
                return
        if self.key:
            signed, mac = body[:-MAC_LEN], body[-MAC_LEN:]
            if len(body) < MAC_LEN + STAMP.size or not hmac.compare_digest(
                    mac, hmac.new(self.key, signed, hashlib.sha256).digest()):
                what, claim, why = _describe_unauthenticated(body)
                log.warning("GMS port: refused %s from %s:%d%s: bad or missing cluster key (%s)", what, peer[0],
                            peer[1], claim, why)
                return
            data, stamp = signed[:-STAMP.size], signed[-STAMP.size:]
            why = self._replayed(stamp)
            if why is not None:
                what, claim, _ = _describe_unauthenticated(data)
                log.warning("GMS port: refused %s from %s:%d%s: %s", what, peer[0], peer[1], claim, why)
                return
        else:
            data = body
        self.on_message(data)

    def _replayed(self, stamp: bytes) -> str | None:
        """Why an authentic frame with this stamp must still be refused, or None to accept it."""
        sent_ns, _ = STAMP.unpack(stamp)
        now = time.time()
        skew = sent_ns / 1e9 - now
        if not abs(skew) <= self.replay_window_s:
            return (f"its timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} this node's clock "
                    f"(limit {self.replay_window_s:.0f} s): a replayed frame, or clocks that disagree: synchronize "
                    "the hosts' clocks (NTP)")
        with self._seen_lock:
            if stamp in self._seen:
                return "the same frame was accepted before: a replayed frame"
            if len(self._seen) >= 4096:  # only key holders add entries; forget the expired ones
                self._seen = {k: t for k, t in self._seen.items() if t > now}
            self._seen[stamp] = now + 2 * self.replay_window_s
        return None

    def close(self) -> None:
        self._closing.set()
        try:
            self._out.put_nowait(None)
        except queue.Full:
            pass
        self._listener.close()
        for t in self._threads:
            t.join(timeout=2)


def _describe_unauthenticated(body: bytes) -> tuple[str, str, str]:
    """For the log only: what a frame that failed the key check claims to be, and whether it had a MAC.

    Nothing in it is trusted or acted on: it only names the refused request
    ("a join", " (claims node id 5)") and tells a missing key from a wrong one.
    """
    import msgpack

    for data, why in ((body, "the message carries no MAC: is DERECHO/cluster_key_file set on the sender?"),
                      (body[:-MAC_LEN - STAMP.size],
                       "its MAC does not match: the sender's cluster_key_file holds another key"),
                      (body[:-MAC_LEN],  # a frame of a version without stamps
                       "its MAC does not match: the sender's cluster_key_file holds another key, or it runs an "
                       "older derecho-py (GMS frames now carry a stamp)")):
        try:
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
        except Exception:  # not that layout: try the other
            continue
        if isinstance(msg, list) and msg and isinstance(msg[0], str):
            kind = msg[0]
            if kind == "join":
                who = msg[1] if len(msg) > 1 and isinstance(msg[1], int) and not isinstance(msg[1], bool) else "?"
                return "a join", f" (claims node id {who})", why
            return f"a GMS message ({kind[:20]!r})", "", why
    return "a GMS message", "", "not a membership message"


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
