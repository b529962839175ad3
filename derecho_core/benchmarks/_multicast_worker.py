"""One process of ``derecho bench bandwidth`` / ``latency`` (not a benchmark of its own)."""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from typing import Any

from derecho_core import Conf, Group, RawObject, SubgroupInfo, SubgroupProvisioningError, SubView, UserMessageCallbacks
from derecho_core.view import Mode


def senders_of(n: int, selector: int) -> list[bool]:
    """Derecho's sender_selector: 0 all, 1 the upper half (ranks > (n-1)/2), 2 the last rank only."""
    if selector == 0:
        return [True] * n
    if selector == 1:
        return [r > (n - 1) // 2 for r in range(n)]
    return [r == n - 1 for r in range(n)]


def layout(n: int, selector: int, mode: Mode) -> SubgroupInfo:
    def allocate(types: Any, prev_view: Any, curr_view: Any) -> dict[Any, list[list[SubView]]]:
        if curr_view.num_members < n:
            raise SubgroupProvisioningError(f"waiting for {n} members, have {curr_view.num_members}")
        members = curr_view.members[:n]
        curr_view.next_unassigned_rank = n
        return {t: [[SubView(members, mode, senders_of(n, selector))]] for t in types}

    return SubgroupInfo(allocate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--selector", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--raw", action="store_true")
    p.add_argument("--pace", action="store_true",
                   help="latency test: keep at most window_size own messages outstanding, and stamp a message "
                        "when it is handed over (as Derecho stamps in the send generator, after the window wait)")
    p.add_argument("--samples", action="store_true",
                   help="also report every own message's latency (latency_samples_us, µs), e.g. for a CDF")
    args, rest = p.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest)
    me = conf.get("DERECHO/local_id")
    size = conf.get("SUBGROUP/DEFAULT/max_payload_size")
    n_senders = sum(senders_of(args.nodes, args.selector))
    total = args.count * n_senders
    delivered = 0
    delivered_bytes = 0
    done = threading.Event()
    # send times of own messages not yet delivered, oldest first: a sender's messages are delivered in the
    # order it sent them (FIFO), while the callback's index also counts the null messages Derecho sends to
    # keep the round-robin order moving, so it is not the sender's own message count
    sent_at: collections.deque[float] = collections.deque()
    latencies: list[float] = []
    own_done = [0]
    own_progress = threading.Event()

    def on_delivery(sg: int, sender: int, index: int, payload: memoryview, version: int) -> None:
        nonlocal delivered, delivered_bytes
        delivered += 1
        delivered_bytes += len(payload)
        if sender == me:
            t = sent_at.popleft() if sent_at else None
            if t is not None:
                latencies.append((time.perf_counter() - t) * 1e6)
            own_done[0] += 1
            own_progress.set()
        if delivered == total:
            done.set()

    group = Group([RawObject], layout(args.nodes, args.selector, Mode.UNORDERED if args.raw else Mode.ORDERED),
                  conf=conf, callbacks=UserMessageCallbacks(global_stability_callback=on_delivery))
    group.barrier_sync(timeout=120)
    rank = group.get_members().index(me)
    is_sender = senders_of(args.nodes, args.selector)[rank]
    payload = b"x" * size
    start = time.perf_counter()
    window = conf.get("SUBGROUP/DEFAULT/window_size")
    if is_sender:
        handle = group.get_subgroup(RawObject)
        for i in range(args.count):
            if args.pace:
                while i - own_done[0] >= window and not done.is_set():
                    own_progress.wait(0.01)
                    own_progress.clear()
            sent_at.append(time.perf_counter())
            handle.send(payload)
    ok = done.wait(600)
    elapsed = time.perf_counter() - start
    result = {
        "event": "result", "node": me, "rank": rank, "sender": is_sender, "complete": ok,
        "delivered": delivered, "seconds": elapsed,
        "bw_GBps": delivered_bytes / elapsed / 1e9, "msgs_per_s": delivered / elapsed,
        "latency_mean_us": statistics.fmean(latencies) if latencies else 0.0,
        "latency_std_us": statistics.stdev(latencies) if len(latencies) > 1 else 0.0,
        "latency_p50_us": statistics.median(latencies) if latencies else 0.0,
    }
    if args.samples:
        result["latency_samples_us"] = [round(x, 1) for x in latencies]
    print(json.dumps(result), flush=True)
    try:
        group.barrier_sync(timeout=60)  # nobody leaves before everyone finished
    except Exception:
        pass
    group._engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
