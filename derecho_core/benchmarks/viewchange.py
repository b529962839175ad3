"""``derecho bench viewchange``: how fast a group notices a crash, and how fast a node joins.

A group of ``--nodes`` member processes runs on 127.0.0.1. Each of ``--runs``
rounds SIGKILLs one non-leader and measures the time until **every** survivor
has installed the view without it; then restarts it under the same id and
measures the time from the process start until every member has installed
the view with it back (Python's own start-up included), and the admission
part of it: from the moment the new process calls ``Group()`` until every
member has installed the view.

Baselines measured in the same run:

* **tcp-eof**: a child process holding a plain TCP connection is SIGKILLed;
  the time until the parent's blocking ``recv`` returns EOF. This is the
  kernel's part of failure detection, the floor for a crash notice.
* **python-start**: the time for ``python -c "import derecho_core"`` to exit,
  the floor for a join that starts a new process.

Results are medians (and p90) in milliseconds, as a table and a JSON record.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=5, help="group size (default 5)")
    parser.add_argument("--runs", type=int, default=20, help="crash/join rounds (default 20)")
    parser.add_argument("--provider", default="sockets", help="[RDMA] provider to use (default sockets)")
    parser.add_argument("--heartbeat-ms", type=int, default=50)
    parser.add_argument("--suspicion-ms", type=int, default=1000)
    parser.add_argument("--json", dest="json_out", help="also write the JSON record to this file")


def _tcp_eof_ms() -> float:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c",
                              f"import socket,time;s=socket.create_connection(('127.0.0.1',{port}));"
                              "print('ok',flush=True);time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    conn, _ = server.accept()
    assert child.stdout is not None
    child.stdout.readline()
    t0 = time.perf_counter()
    child.kill()
    conn.recv(1)
    elapsed = (time.perf_counter() - t0) * 1000
    child.wait()
    conn.close()
    server.close()
    return elapsed


def _python_start_ms() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import derecho_core"], check=True)
    return (time.perf_counter() - t0) * 1000


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": ordered[0], "max_ms": ordered[-1], "n": len(ordered)}


def run(args: argparse.Namespace) -> int:
    from ..testing.processes import LocalGroup

    if args.nodes < 3:
        print("derecho bench viewchange: --nodes must be at least 3 (a crash needs a surviving majority)",
              file=sys.stderr)
        return 2
    crash_ms: list[float] = []
    join_ms: list[float] = []
    admit_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="derecho-bench-vc-") as tmp:
        group = LocalGroup(Path(tmp), args.provider,
                           settings={"DERECHO/heartbeat_ms": args.heartbeat_ms,
                                     "DERECHO/suspicion_timeout_ms": args.suspicion_ms},
                           extra=["--RDMA/domain=lo"] if args.provider != "sockets" else [])
        try:
            members = {}
            for node in range(args.nodes):
                members[node] = group.start(node)
                members[node].wait_for_view(range(node + 1), timeout=60)
            everyone = list(range(args.nodes))
            for m in members.values():
                m.wait_for_view(everyone, timeout=60)
            for i in range(args.runs):
                victim = 1 + i % (args.nodes - 1)  # never node 0, the leader and contact
                survivors = [n for n in everyone if n != victim]
                vids = {n: members[n].last_vid() for n in survivors}
                t_kill = time.time()
                members[victim].kill()
                times = [members[n].wait_for_view(survivors, timeout=60, after_vid=vids[n])["time"]
                         for n in survivors]
                crash_ms.append((max(times) - t_kill) * 1000)
                t_start = time.time()
                members[victim] = group.start(victim)
                times = [members[n].wait_for(
                    lambda evs, vic=victim, t0=t_start: next((e for e in reversed(evs) if e.get("event") == "view"
                                                  and vic in e["members"] and e["time"] >= t0), None),
                    timeout=60)["time"] for n in everyone]
                join_ms.append((max(times) - t_start) * 1000)
                asked = members[victim].wait_for(
                    lambda evs: next((e for e in evs if e.get("event") == "starting"), None), timeout=60)["time"]
                admit_ms.append((max(times) - asked) * 1000)
                print(f"  run {i + 1:2d}/{args.runs}: crash -> new view on all {len(survivors)} survivors "
                      f"{crash_ms[-1]:7.1f} ms, join {join_ms[-1]:7.1f} ms (of which admission "
                      f"{admit_ms[-1]:6.1f} ms)", flush=True)
        finally:
            group.close()
    eof = [_tcp_eof_ms() for _ in range(5)]
    start = [_python_start_ms() for _ in range(5)]
    record = {
        "benchmark": "viewchange", "nodes": args.nodes, "provider": args.provider, "runs": args.runs,
        "heartbeat_ms": args.heartbeat_ms, "suspicion_timeout_ms": args.suspicion_ms,
        "crash_to_view": _stats(crash_ms), "join": _stats(join_ms), "admission": _stats(admit_ms),
        "baseline_tcp_eof": _stats(eof), "baseline_python_start": _stats(start),
    }
    rows = [("measure", "median ms", "p90 ms", "baseline", "baseline ms", "ratio"),
            ("SIGKILL -> view on every survivor", f"{record['crash_to_view']['median_ms']:.1f}",
             f"{record['crash_to_view']['p90_ms']:.1f}", "tcp-eof", f"{record['baseline_tcp_eof']['median_ms']:.2f}",
             f"{record['crash_to_view']['median_ms'] / max(record['baseline_tcp_eof']['median_ms'], 1e-3):.0f}x"),
            ("join (process start -> view everywhere)", f"{record['join']['median_ms']:.1f}",
             f"{record['join']['p90_ms']:.1f}", "python-start", f"{record['baseline_python_start']['median_ms']:.1f}",
             f"{record['join']['median_ms'] / record['baseline_python_start']['median_ms']:.2f}x"),
            ("  of which admission (Group() -> view everywhere)", f"{record['admission']['median_ms']:.1f}",
             f"{record['admission']['p90_ms']:.1f}", "", "", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    text = json.dumps(record)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0
