"""``derecho bench bandwidth num_nodes sender_selector num_messages delivery_mode``: Derecho's bandwidth_test.

Starts ``num_nodes`` member processes on 127.0.0.1 in one subgroup/one shard
(sender_selector: 0 all send, 1 half, 2 one; delivery_mode: 0 ORDERED, 1 raw).
Each sender multicasts ``num_messages`` payloads of ``max_payload_size``
bytes; every node counts deliveries until all arrived. The average delivered
GB/s per node is appended to ``data_derecho_bw`` as Derecho does:

    num_nodes sender_selector max_payload_size window_size num_messages delivery_mode avg_bw

Baseline in the same run: plain Python sockets, each sender writing the same
bytes to each of the other N−1 processes. ``--sweep 100,1000,10240,102400,1048576``
runs several sizes and plots both to ``bandwidth_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ._multicast_common import add_arguments as _common_args
from ._multicast_common import plot, run_baseline, run_group, write_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_args(parser)


def measure(args: argparse.Namespace, size: int) -> dict:
    runs = []
    for _ in range(args.runs):
        results = run_group(args, size)
        runs.append({"avg_bw_GBps": statistics.fmean(r["bw_GBps"] for r in results),
                     "avg_msgs_per_s": statistics.fmean(r["msgs_per_s"] for r in results),
                     "complete": all(r["complete"] for r in results)})
    rec = {"size": size,
           "avg_bw_GBps": statistics.median(r["avg_bw_GBps"] for r in runs),
           "avg_msgs_per_s": statistics.median(r["avg_msgs_per_s"] for r in runs),
           "complete": all(r["complete"] for r in runs), "runs": runs}
    if not args.no_baseline:
        base = [run_baseline(args.num_nodes, args.sender_selector, args.num_messages, size)
                for _ in range(args.runs)]
        rec["baseline_socket_GBps"] = statistics.median(base)
        rec["ratio"] = rec["avg_bw_GBps"] / rec["baseline_socket_GBps"]
    return rec


def run(args: argparse.Namespace) -> int:
    from ..conf import Conf

    window = args.window or Conf.load(environ={}).get("SUBGROUP/DEFAULT/window_size")
    sizes = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.size or 10240]
    records = []
    for size in sizes:
        rec = measure(args, size)
        records.append(rec)
        write_line("data_derecho_bw", [args.num_nodes, args.sender_selector, size, window, args.num_messages,
                                       args.delivery_mode, f"{rec['avg_bw_GBps']:.6f}"])
        base = (f"; plain sockets {rec['baseline_socket_GBps']:.4f} GB/s, ratio {rec['ratio']:.3f}"
                if "ratio" in rec else "")
        print(f"{args.num_nodes} nodes, selector {args.sender_selector}, {size} B x {args.num_messages}, "
              f"{'ORDERED' if args.delivery_mode == 0 else 'RAW'} over {args.provider}: "
              f"{rec['avg_bw_GBps']:.4f} GB/s per node, {rec['avg_msgs_per_s']:.0f} msgs/s per node{base}"
              f"{'' if rec['complete'] else ' (INCOMPLETE)'}", flush=True)
    record = {"benchmark": "bandwidth", "num_nodes": args.num_nodes, "sender_selector": args.sender_selector,
              "num_messages": args.num_messages, "delivery_mode": args.delivery_mode, "window_size": window,
              "provider": args.provider, "results": records}
    if len(sizes) > 1:
        series = {"derecho-py": [r["avg_bw_GBps"] for r in records]}
        if not args.no_baseline:
            series["plain sockets"] = [r["baseline_socket_GBps"] for r in records]
        problem = plot(Path("bandwidth_sweep.png"), sizes, series, "GB/s delivered per node",
                       f"{args.num_nodes} nodes, selector {args.sender_selector}, {args.provider}")
        print(problem or "plot: bandwidth_sweep.png")
    text = json.dumps(record)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if all(r["complete"] for r in records) else 1
