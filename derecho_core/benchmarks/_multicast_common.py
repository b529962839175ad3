"""Shared by ``derecho bench bandwidth`` and ``latency``: run N local worker processes, and the socket baseline."""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..testing.processes import free_ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("num_nodes", type=int, nargs="?", default=3, help="processes to start (default 3)")
    parser.add_argument("sender_selector", type=int, nargs="?", default=0, choices=(0, 1, 2),
                        help="0 all nodes send, 1 half of them, 2 one (default 0)")
    parser.add_argument("num_messages", type=int, nargs="?", default=2000, help="messages per sender")
    parser.add_argument("delivery_mode", type=int, nargs="?", default=0, choices=(0, 1),
                        help="0 ORDERED, 1 UNORDERED (raw)")
    parser.add_argument("--size", type=int, default=None,
                        help="payload size (SUBGROUP/DEFAULT/max_payload_size; default 10240)")
    parser.add_argument("--window", type=int, default=None, help="SUBGROUP/DEFAULT/window_size")
    parser.add_argument("--provider", default="sockets", help="[RDMA] provider")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION/key=value",
                        help="any other configuration key for every node, e.g. SUBGROUP/DEFAULT/block_size=262144")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report the median")
    parser.add_argument("--sweep", help="comma list of payload sizes: run each, plot to a PNG")
    parser.add_argument("--json", dest="json_out", help="also write the JSON record to this file")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-socket baseline")


def run_group(args: argparse.Namespace, size: int) -> list[dict[str, Any]]:
    n = args.num_nodes
    ports = [free_ports(5) for _ in range(n)]
    conf = ["--DERECHO/contact_ip=127.0.0.1", f"--DERECHO/contact_port={ports[0][0]}",
            f"--SUBGROUP/DEFAULT/max_payload_size={size}", f"--RDMA/provider={args.provider}",
            "--LOGGER/default_log_level=warning", "--DERECHO/heartbeat_ms=100"]
    if size > 10240:
        conf.append(f"--SUBGROUP/DEFAULT/max_reply_payload_size={max(size, 10240)}")
    if args.window:
        conf.append(f"--SUBGROUP/DEFAULT/window_size={args.window}")
    if args.provider != "sockets":
        conf.append("--RDMA/domain=lo")
    conf += [f"--{item}" for item in getattr(args, "set", [])]
    procs = []
    for node in range(n):
        p = ports[node]
        cmd = [sys.executable, "-m", "derecho_core.benchmarks._multicast_worker", "--nodes", str(n),
               "--selector", str(args.sender_selector), "--count", str(args.num_messages),
               *(["--raw"] if args.delivery_mode == 1 else []), *(["--pace"] if getattr(args, "pace", False) else []),
               *(["--samples"] if getattr(args, "samples", False) else []),
               *conf, f"--DERECHO/local_id={node}",
               f"--DERECHO/gms_port={p[0]}", f"--DERECHO/state_transfer_port={p[1]}", f"--DERECHO/sst_port={p[2]}",
               f"--DERECHO/rdmc_port={p[3]}", f"--DERECHO/external_port={p[4]}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.2)
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("{")), None)
        if line is None:
            raise RuntimeError(f"a worker produced no result (exit {proc.returncode}): {err[-2000:]}")
        results.append(json.loads(line))
    return results


# ----------------------------------------------------------------------------- the socket baseline


def run_baseline(n: int, selector: int, count: int, size: int) -> float:
    """Average per-node delivered GB/s of plain sockets; one process per node (no shared GIL).

    The parent steps the processes through listen -> connect -> send with
    lines on their stdin/stdout, so nobody connects before everyone listens.
    """
    ports = free_ports(n)
    code = "from derecho_core.benchmarks._multicast_common import _baseline_proc; _baseline_proc()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    try:
        for rank, p in enumerate(procs):
            assert p.stdin is not None
            p.stdin.write(json.dumps({"rank": rank, "n": n, "selector": selector, "count": count, "size": size,
                                      "ports": ports}) + "\n")
            p.stdin.flush()
        for phase in ("listening", "connected"):
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline().strip()
                if line != phase:
                    raise RuntimeError(f"baseline process said {line!r}, expected {phase!r}")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(float(p.stdout.readline()))
        return statistics.fmean(results)
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _baseline_proc() -> None:
    from ._multicast_worker import senders_of

    spec = json.loads(sys.stdin.readline())
    n, rank, count, size, ports = spec["n"], spec["rank"], spec["count"], spec["size"], spec["ports"]
    senders = senders_of(n, spec["selector"])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", ports[rank]))
    listener.listen(n)
    print("listening", flush=True)
    sys.stdin.readline()
    outgoing = []
    if senders[rank]:
        for other in range(n):
            if other != rank:
                s = socket.create_connection(("127.0.0.1", ports[other]))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                outgoing.append(s)
    expected = sum(1 for r in range(n) if senders[r] and r != rank)
    incoming = [listener.accept()[0] for _ in range(expected)]
    print("connected", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    total = (expected + (1 if senders[rank] else 0)) * count * size  # a sender delivers its own too

    def drain(sock: socket.socket) -> None:
        buf = bytearray(1 << 20)
        want = count * size
        while want > 0:
            k = sock.recv_into(buf, min(len(buf), want))
            if not k:
                break
            want -= k

    readers = [threading.Thread(target=drain, args=(s,)) for s in incoming]
    for t in readers:
        t.start()
    payload = b"x" * size
    for _ in range(count):
        for s in outgoing:
            s.sendall(payload)
    for t in readers:
        t.join()
    print(total / (time.perf_counter() - start) / 1e9, flush=True)
    for s in outgoing + incoming:
        s.close()
    listener.close()


def write_line(path: str, fields: list[Any]) -> None:
    with open(path, "a") as f:
        f.write(" ".join(str(x) for x in fields) + "\n")


def plot(path: Path, sizes: list[int], series: dict[str, list[float]], ylabel: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or make bench) — no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        ax.plot(sizes, values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("payload size (bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
