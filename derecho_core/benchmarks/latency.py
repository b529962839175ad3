"""``derecho bench latency num_nodes sender_selector num_messages delivery_mode``: Derecho's latency_test.

Same group as ``bench bandwidth``; each sender measures the time from handing
a message to ``send`` until its own copy is delivered locally (so, in ORDERED
mode, until every member has it). Per-sender mean and standard deviation in
µs, averaged over senders, appended to ``data_latency``:

    num_nodes sender_selector max_payload_size window_size num_messages delivery_mode avg_latency_us avg_stddev_us

The JSON record also has the median. Baseline in the same run: a plain Python
socket round trip of the same payload between two processes (the floor of
any "everyone has it" notice).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..testing.processes import free_ports
from ._multicast_common import add_arguments as _common_args
from ._multicast_common import run_group, write_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_args(parser)
    parser.add_argument("--samples", action="store_true",
                        help="add every message's latency to the JSON record (samples_us, and the baseline's "
                             "baseline_socket_rtt_samples_us), e.g. to plot a CDF")
    parser.set_defaults(pace=True)


def socket_round_trip_us(size: int, count: int = 2000) -> float:
    return statistics.median(socket_round_trip_samples_us(size, count))


def socket_round_trip_samples_us(size: int, count: int = 2000) -> list[float]:
    """Every round trip (µs) of ``count`` ``size``-byte payloads echoed by another process over TCP."""
    port = free_ports(1)[0]
    echo = subprocess.Popen([sys.executable, "-c",
                             "import socket,sys\n"
                             f"l=socket.socket();l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                             f"l.bind(('127.0.0.1',{port}));l.listen(1);print('ok',flush=True)\n"
                             "c,_=l.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
                             f"n={size}\n"
                             "while True:\n"
                             " b=bytearray()\n"
                             " while len(b)<n:\n"
                             "  d=c.recv(n-len(b))\n"
                             "  if not d: sys.exit(0)\n"
                             "  b+=d\n"
                             " c.sendall(b)\n"], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    echo.stdout.readline()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * size
    samples = []
    for _ in range(count):
        t = time.perf_counter()
        s.sendall(payload)
        got = 0
        while got < size:
            got += len(s.recv(size - got))
        samples.append((time.perf_counter() - t) * 1e6)
    s.close()
    echo.wait(10)
    return samples


def run(args: argparse.Namespace) -> int:
    from ..conf import Conf

    window = args.window or Conf.load(environ={}).get("SUBGROUP/DEFAULT/window_size")
    size = args.size or 10240
    runs = []
    samples: list[float] = []
    for _ in range(args.runs):
        senders = [r for r in run_group(args, size) if r["sender"]]
        for r in senders:
            samples += r.get("latency_samples_us", [])
        runs.append({"mean_us": statistics.fmean(r["latency_mean_us"] for r in senders),
                     "std_us": statistics.fmean(r["latency_std_us"] for r in senders),
                     "p50_us": statistics.fmean(r["latency_p50_us"] for r in senders),
                     "complete": all(r["complete"] for r in senders)})
    rec = {k: statistics.median(r[k] for r in runs) for k in ("mean_us", "std_us", "p50_us")}
    write_line("data_latency", [args.num_nodes, args.sender_selector, size, window, args.num_messages,
                                args.delivery_mode, f"{rec['mean_us']:.2f}", f"{rec['std_us']:.2f}"])
    baseline_samples = None if args.no_baseline else socket_round_trip_samples_us(size)
    baseline = statistics.median(baseline_samples) if baseline_samples else None
    print(f"{args.num_nodes} nodes, selector {args.sender_selector}, {size} B x {args.num_messages}, "
          f"{'ORDERED' if args.delivery_mode == 0 else 'RAW'} over {args.provider}: latency mean "
          f"{rec['mean_us']:.1f} µs (std {rec['std_us']:.1f}), p50 {rec['p50_us']:.1f} µs"
          + (f"; plain socket round trip {baseline:.1f} µs, ratio {rec['p50_us'] / baseline:.1f}" if baseline else ""))
    record = {"benchmark": "latency", "num_nodes": args.num_nodes, "sender_selector": args.sender_selector,
              "num_messages": args.num_messages, "delivery_mode": args.delivery_mode, "size": size,
              "window_size": window, "provider": args.provider, **rec, "runs": runs,
              "baseline_socket_rtt_us": baseline}
    if args.samples:  # every sender's every message, all runs; and every baseline round trip
        record["samples_us"] = samples
        record["baseline_socket_rtt_samples_us"] = [round(x, 1) for x in baseline_samples or []]
    text = json.dumps(record)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if all(r["complete"] for r in runs) else 1
