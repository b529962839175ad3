"""Overload runs: one member sends as fast as it can while another is slow; every member's RSS is sampled.

``docs/memory.md`` derives a bound on a member's resident memory; :func:`memory_bound` computes it and
:func:`run_overload` measures a group against it (``tests/overload``). The member program::

    python -m derecho_core.testing.overload --file CONF --members 3 --role sender|slow|idle \\
        [--payload BYTES] [--duration S] [--delay S] [--mode raw|unordered|rpc] [--SECTION/key=value ...]

joins (or starts) a group whose one subgroup is a single ORDERED shard of every member. ``raw`` mode
multicasts through ``RawObject.send`` (delivered to ``global_stability_callback``); ``unordered`` mode
does the same in an UNORDERED (Raw) shard, whose windows count receipts; ``rpc`` mode calls
``Sink.put`` by ``ordered_send`` without waiting for the replies. The ``sender`` sends for
``--duration`` seconds; the ``slow`` member sleeps ``--delay`` seconds in every delivery (a slow
handler; persistence runs on the same delivery thread, so a slow disk behaves the same). Every member
prints JSON lines: ``ready``, then ``progress`` each second with its internal queue lengths (which is
how an unbounded queue is found), ``done`` when the sender stops. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rpc.methods import ordered

__all__ = ["OverloadResult", "memory_bound", "rss_kib", "run_overload", "RssSampler"]

#: bytes of Python objects around one queued or delivered message (Delivery, tuples, closures)
MESSAGE_OVERHEAD = 512
#: one small protocol message (STATUS, heartbeat, SST row, an RDMC block's header and view) as queued
SMALL_MESSAGE = 256
#: one outstanding ordered_send at its caller (PendingResults, a future per shard member, bookkeeping)
PENDING_CALL = 8192
#: allocator slack on the dynamic terms (freed memory glibc keeps, fragmentation), and a fixed allowance
#: for what an idle member does not show (thread stacks touched under load, msgpack buffers, logging)
SLACK = 1.5
FIXED = 16 << 20


def memory_bound(*, baseline: int, window_size: int, max_payload_size: int, shard_size: int, senders: int,
                 sender: bool, max_queued_sends: int, tx_depth: int, max_smc_payload_size: int,
                 block_size: int, max_backlog: int, p2p_window_size: int = 16, max_p2p_request: int = 10240,
                 max_p2p_reply: int = 10240, p2p_callers: int | None = None, ordered_calls: bool = False,
                 recv_buf: int = 256 * 1024, pool_max: int = 160 << 20, pool_min: int = 256 * 1024) -> dict[str, int]:
    """The terms of docs/memory.md's bound on one member's RSS, in bytes, and their ``total``.

    ``baseline``: the RSS of the same member idle in the same group. ``senders``: the shard's
    senders; ``sender``: whether this member sends. ``p2p_callers``: how many nodes send it p2p
    requests (default: the other shard members). ``ordered_calls``: it sends by ``ordered_send``
    (RPC) rather than raw ``send``. One shard; a member of several adds the shard terms per shard.
    """
    w, p, n, s = window_size, max_payload_size, shard_size, senders
    peers = max(0, n - 1)
    rdmc = p > max_smc_payload_size
    copies = 2 if rdmc else 1  # RDMC: the blocks as received, then the message joined from them
    msg = p + MESSAGE_OVERHEAD
    if p2p_callers is None:
        p2p_callers = peers
    terms = {
        "baseline": baseline,
        # Engine.send waits while MAX_QUEUED_SENDS messages are queued (engine inbox + shard queue)
        "send_queue": max_queued_sends * msg if sender else 0,
        # own messages in the window (kept until delivered) and their encoding, shared by the peers' queues
        "own_window": 2 * (w + 1) * msg if sender else 0,
        # received, not yet delivered: a window (+1) per sender
        "received": s * (w + 1) * (copies * p + MESSAGE_OVERHEAD),
        # delivered, not yet run by the delivery thread: a window (+1) per sender, *if* the delivery
        # thread pushes back on the window (docs/memory.md: today it does not)
        "delivery_queue": s * (w + 1) * msg,
        # per peer: the receive buffer, and tx_depth small messages in the transport's send queue
        "transport": peers * (recv_buf + tx_depth * SMALL_MESSAGE),
        # per peer: messages waiting in the engine for room in the transport queue (past MAX_BACKLOG the
        # peer is failed); data in it is counted above, each entry adds at most a small message
        "engine_backlog": peers * max_backlog * SMALL_MESSAGE,
        # recycled receive buffers of large messages (only RDMC blocks of pool_min bytes or more)
        "receive_pool": min(pool_max, s * (w + 1) * p) if rdmc and min(block_size, p) >= pool_min else 0,
        # p2p: requests in and replies out, p2p_window_size per caller
        "p2p": p2p_callers * p2p_window_size * (max_p2p_request + max_p2p_reply + 2 * MESSAGE_OVERHEAD),
        # ordered_send callers keep a PendingResults per call until every shard member replied
        "pending_calls": (max_queued_sends + (s + 2) * (w + 1)) * PENDING_CALL if sender and ordered_calls else 0,
    }
    dynamic = sum(v for k, v in terms.items() if k != "baseline")
    terms["slack"] = int((SLACK - 1) * dynamic) + FIXED
    terms["total"] = baseline + dynamic + terms["slack"]
    return terms


# ----------------------------------------------------------------------------- RSS


def rss_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in KiB (current and peak resident set), from /proc; (0, 0) if gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


class RssSampler:
    """Samples the RSS of some processes every ``interval`` seconds on a thread; peaks from VmHWM too."""

    def __init__(self, pids: dict[int, int], interval: float = 0.1) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples: dict[int, list[tuple[float, int]]] = {k: [] for k in pids}
        self.peak_kib: dict[int, int] = {k: 0 for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        now = time.monotonic()
        for key, pid in self.pids.items():
            rss, hwm = rss_kib(pid)
            if rss:
                self.samples[key].append((now, rss))
                self.peak_kib[key] = max(self.peak_kib[key], rss, hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.sample()  # the last VmHWM: the kernel's own peak, whatever the sampling missed
        self._stop.set()
        self._thread.join(5)


# ----------------------------------------------------------------------------- one run


@dataclass
class OverloadResult:
    duration: float
    payload: int
    window_size: int
    baseline_kib: dict[int, int]
    peak_kib: dict[int, int]
    bound: dict[int, dict[str, int]]
    sent: int
    delivered: dict[int, int]
    progress: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def within_bound(self) -> dict[int, bool]:
        return {n: self.peak_kib[n] * 1024 <= self.bound[n]["total"] for n in self.peak_kib}

    def report(self) -> str:
        lines = [f"overload: {self.duration:.0f} s, payload {self.payload} B, window {self.window_size}, "
                 f"{self.sent} messages sent ({self.sent * self.payload / 2**20 / max(self.duration, 1e-9):.1f} "
                 "MiB/s)"]
        for n in sorted(self.peak_kib):
            b = self.bound[n]
            last = self.progress.get(n, [{}])[-1] if self.progress.get(n) else {}
            queues = {k: v for k, v in last.items() if k.startswith("q_")}
            lines.append(f"  node {n}: baseline {self.baseline_kib[n] / 1024:.1f} MiB, peak RSS "
                         f"{self.peak_kib[n] / 1024:.1f} MiB, bound {b['total'] / 2**20:.1f} MiB "
                         f"({'ok' if self.within_bound()[n] else 'OVER'}); delivered {self.delivered.get(n, 0)}; "
                         f"last queues {queues}")
        return "\n".join(lines)


def _profile(settings: dict[str, Any]) -> dict[str, Any]:
    from ..conf import Conf

    conf = Conf.load(overrides={k: v for k, v in settings.items() if "/" in k}, environ={})
    p = conf.profile("DEFAULT")
    return {"window_size": p["window_size"], "max_payload_size": p["max_payload_size"],
            "max_smc_payload_size": p["max_smc_payload_size"], "block_size": p["block_size"],
            "tx_depth": conf.get("RDMA/tx_depth"), "p2p_window_size": conf.get("DERECHO/p2p_window_size"),
            "max_p2p_request": conf.get("DERECHO/max_p2p_request_payload_size"),
            "max_p2p_reply": conf.get("DERECHO/max_p2p_reply_payload_size")}


def run_overload(workdir: Path, *, duration: float, payload: int = 10240, window_size: int = 16,
                 smc_payload: int | None = None, delay: float = 0.002, mode: str = "raw",
                 stop_cycle: tuple[float, float] | None = None,
                 settings: dict[str, Any] | None = None, members: int = 3, sender: int = 1,
                 slow: int = 2, drain_timeout: float = 0.0) -> OverloadResult:
    """Start ``members`` members (node ``sender`` sends, node ``slow`` is slow), load them, measure.

    ``stop_cycle=(stopped, running)`` also SIGSTOPs the slow member for ``stopped`` seconds out of
    every ``stopped + running`` (keep ``stopped`` under the failure-detection timeouts). After the
    sender stops, waits up to ``drain_timeout`` seconds for every member to deliver everything.
    """
    from ..engine import MAX_BACKLOG, MAX_QUEUED_SENDS
    from .processes import LocalGroup

    settings = {"SUBGROUP/DEFAULT/window_size": window_size, "SUBGROUP/DEFAULT/max_payload_size": payload,
                "SUBGROUP/DEFAULT/max_smc_payload_size": payload if smc_payload is None else smc_payload,
                "SUBGROUP/DEFAULT/max_reply_payload_size": 1024,
                "DERECHO/heartbeat_ms": 100, "DERECHO/suspicion_timeout_ms": 4000,
                "DERECHO/sst_poll_cq_timeout_ms": 4000, **(settings or {})}
    prof = _profile(settings)
    group = LocalGroup(workdir, settings=settings, program=["-m", "derecho_core.testing.overload"])
    # each member's role is on its command line: LocalGroup passes the same extra arguments to all,
    # so start them one by one with their own
    procs = {}
    try:
        for n in range(members):
            role = "sender" if n == sender else "slow" if n == slow else "idle"
            group.extra = ["--members", str(members), "--role", role, "--payload", str(payload),
                           "--duration", str(duration), "--delay", str(delay), "--mode", mode]
            procs[n] = group.start(n)
            time.sleep(0.2)
        for m in procs.values():
            m.event("ready", timeout=60)
        time.sleep(1.0)  # settle: the baseline is an idle member of the formed group
        baseline = {n: rss_kib(m.proc.pid)[0] for n, m in procs.items()}
        sampler = RssSampler({n: m.proc.pid for n, m in procs.items()}).start()
        for m in procs.values():
            m.command("go")
        started = time.monotonic()
        stopped = False
        try:
            while procs[sender].proc.poll() is None:
                if any(e.get("event") == "done" for e in list(procs[sender].events)):
                    break
                if time.monotonic() - started > duration + 60:
                    raise TimeoutError("the sender did not finish")
                if stop_cycle is not None:
                    phase = (time.monotonic() - started) % sum(stop_cycle)
                    want = phase < stop_cycle[0]
                    if want != stopped:
                        os.kill(procs[slow].proc.pid, signal.SIGSTOP if want else signal.SIGCONT)
                        stopped = want
                time.sleep(0.02)
        finally:
            if stopped:
                os.kill(procs[slow].proc.pid, signal.SIGCONT)
        done = next(e for e in procs[sender].events if e.get("event") == "done")
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:  # until every member delivered everything (or drain_timeout)
            last = [[e for e in m.events if e.get("event") == "progress"][-1:] for m in procs.values()]
            if all(p and p[0]["delivered"] >= done["sent"] for p in last):
                break
            time.sleep(0.2)
        time.sleep(1.1)  # the last progress lines
        sampler.stop()
        for n, m in procs.items():
            if m.proc.poll() is not None:
                raise RuntimeError(f"node {n} exited during the run: {''.join(m.stderr[-20:])}")
        progress = {n: [e for e in m.events if e.get("event") == "progress"] for n, m in procs.items()}
        delivered = {n: (p[-1]["delivered"] if p else 0) for n, p in progress.items()}
        bound = {}
        for n in procs:
            bound[n] = memory_bound(
                baseline=baseline[n] * 1024, window_size=prof["window_size"], max_payload_size=prof["max_payload_size"],
                shard_size=members, senders=members, sender=n == sender, max_queued_sends=MAX_QUEUED_SENDS,
                tx_depth=prof["tx_depth"], max_smc_payload_size=prof["max_smc_payload_size"],
                block_size=prof["block_size"], max_backlog=MAX_BACKLOG, p2p_window_size=prof["p2p_window_size"],
                max_p2p_request=prof["max_p2p_request"], max_p2p_reply=prof["max_p2p_reply"],
                ordered_calls=mode == "rpc")
        return OverloadResult(duration=done["seconds"], payload=payload, window_size=prof["window_size"],
                              baseline_kib=baseline, peak_kib=dict(sampler.peak_kib), bound=bound,
                              sent=done["sent"], delivered=delivered, progress=progress,
                              samples=sampler.samples)
    finally:
        group.close()


# ----------------------------------------------------------------------------- the member program


class Sink:
    """``rpc`` mode's replicated type: ``put`` keeps nothing (only the delivery path is measured)."""

    delay = 0.0

    def __init__(self) -> None:
        self.count = 0

    @ordered
    def put(self, blob: bytes) -> int:
        if Sink.delay:
            time.sleep(Sink.delay)
        self.count += 1
        return self.count


def _queues(group: Any) -> dict[str, int]:
    """Lengths of the queues a message may wait in (read without locks: approximate)."""
    eng = group._engine
    q: dict[str, int] = {"q_deliveries": group._deliveries.qsize(), "q_inbox": len(eng._inbox),
                         "q_backlog": sum(len(b) for b in list(eng._backlog.values())),
                         "q_rpc_pending": len(group.rpc._pending)}
    mc = eng.node.multicast
    if mc is not None:
        for shard in list(mc.shards.values()):
            q["q_shard_queue"] = q.get("q_shard_queue", 0) + len(shard.queue)
            q["q_own"] = q.get("q_own", 0) + len(shard.own)
            q["q_received"] = q.get("q_received", 0) + sum(len(r) for r in shard.received)
    try:
        t = eng.transport
        q["q_transport_msgs"] = sum(t.queued(p) for p in t.peers())
    except Exception:  # a transport without queued(): leave it out
        pass
    return q


def main(argv: list[str] | None = None) -> int:
    from .. import Conf, Group, RawObject, SubgroupInfo, SubView, UserMessageCallbacks
    from ..view import Mode

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--role", choices=("sender", "slow", "idle"), default="idle")
    parser.add_argument("--payload", type=int, default=10240)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--delay", type=float, default=0.002)
    parser.add_argument("--mode", choices=("raw", "unordered", "rpc"), default="raw")
    args, rest = parser.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest, config_file=args.file)
    me = conf.get("DERECHO/local_id")
    delay = args.delay if args.role == "slow" else 0.0
    delivered = 0
    out = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        with out:
            print(json.dumps({"event": event, "node": me, "time": time.time(), **fields}), flush=True)

    def on_delivery(sg: int, sender: int, index: int, payload: memoryview, version: int) -> None:
        nonlocal delivered
        if delay:
            time.sleep(delay)
        delivered += 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def entire_view(types: Any, prev_view: Any, curr_view: Any) -> dict[Any, list[list[SubView]]]:
        curr_view.next_unassigned_rank = curr_view.num_members
        mode = Mode.UNORDERED if args.mode == "unordered" else Mode.ORDERED
        return {t: [[SubView(curr_view.members, mode)]] for t in types}

    if args.mode in ("raw", "unordered"):
        group = Group([RawObject], SubgroupInfo(entire_view), conf=conf,
                      callbacks=UserMessageCallbacks(global_stability_callback=on_delivery))
    else:
        Sink.delay = delay
        group = Group([Sink], SubgroupInfo(entire_view), factories={Sink: lambda reg, sg: Sink()}, conf=conf)
    while len(group.get_members()) < args.members and not stop.is_set():
        time.sleep(0.02)
    emit("ready", pid=os.getpid(), members=group.get_members())
    go = threading.Event()

    def read_commands() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()

    threading.Thread(target=read_commands, daemon=True).start()

    def report() -> None:
        while not stop.wait(1.0):
            n = delivered if args.mode != "rpc" else getattr(group.get_subgroup(Sink).get_ref(), "count", 0)
            emit("progress", delivered=n, **_queues(group))

    while not go.wait(0.1):
        if stop.is_set():
            return 0
    threading.Thread(target=report, daemon=True).start()
    if args.role == "sender":
        # a new payload object per message, as an application makes them (one shared object would hide
        # the copies the queues hold)
        sent = 0
        started = time.monotonic()
        if args.mode != "rpc":
            handle = group.get_subgroup(RawObject)
            while time.monotonic() - started < args.duration and not stop.is_set():
                handle.send(b"%015d" % sent + bytes(args.payload - 15))
                sent += 1
        else:
            rpc = group.get_subgroup(Sink)
            size = max(0, args.payload - 96)  # room for the RPC header within max_payload_size
            while time.monotonic() - started < args.duration and not stop.is_set():
                rpc.ordered_send("put", b"%015d" % sent + bytes(size - 15))
                sent += 1
        emit("done", sent=sent, seconds=time.monotonic() - started)
    stop.wait()
    group._engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
