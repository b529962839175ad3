"""One PySyncObj node of ``derecho bench rpc``'s baseline (not a benchmark of its own).

A ``@replicated`` counter on three local processes, run as PySyncObj's users
run it. The parent steps each process over stdin/stdout:

1. it starts the node and prints ``{"event": "ready", "self": ..., "leader": ...}``
   once a leader is elected and this node has caught up;
2. the parent writes ``go`` to the leader's process, which runs the client
   phases on the leader and prints ``{"event": "result", ...}``;
3. the parent writes ``quit`` to every process.

Phases (``--mode``):

* ``default`` (PySyncObj's default configuration, batching on): ``pipelined``
  — ``--calls`` calls with a callback, none waited for, until every callback
  arrived; then ``--sync-calls`` calls with ``sync=True`` (about an
  ``appendEntriesPeriod`` each).
* ``nobatch`` (``appendEntriesUseBatch=False``, what PySyncObj documents for
  single-request latency): ``--sync-calls`` calls with ``sync=True``.

A callback or ``sync=True`` return comes when the leader has applied the
command: a majority (2 of 3) has it in its log, not every replica applied it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated


class Counter(SyncObj):  # type: ignore[misc]
    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf)
        self.value = 0
        self.bytes = 0

    @replicated  # type: ignore[misc]
    def put_bytes(self, data: bytes) -> int:
        self.value += 1
        self.bytes += len(data)
        return self.value


def make_conf(mode: str) -> SyncObjConf:
    if mode == "nobatch":
        # Batching off: a command is appended and sent as soon as it is queued (the pipe notifier wakes the
        # tick thread), and the commit goes out as soon as it is applied. The timing defaults stay.
        return SyncObjConf(appendEntriesUseBatch=False)
    return SyncObjConf()


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def pipelined(obj: Counter, calls: int, payload: bytes, timeout: float) -> dict[str, Any]:
    done = threading.Event()
    state = {"n": 0, "errors": 0}

    def on_result(res: Any, err: int) -> None:  # runs on PySyncObj's tick thread only
        state["n"] += 1
        if err != FAIL_REASON.SUCCESS:
            state["errors"] += 1
        if state["n"] == calls:
            done.set()

    start = time.perf_counter()
    for _ in range(calls):
        obj.put_bytes(payload, callback=on_result)
    complete = done.wait(timeout)
    elapsed = time.perf_counter() - start
    return {"calls": calls, "completed": state["n"], "errors": state["errors"], "seconds": elapsed,
            "calls_per_s": state["n"] / elapsed, "complete": complete and state["errors"] == 0}


def one_at_a_time(obj: Counter, calls: int, payload: bytes) -> dict[str, Any]:
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        obj.put_bytes(payload, sync=True, timeout=10)
        samples.append((time.perf_counter() - t) * 1e6)
    ordered = sorted(samples)
    return {"calls": calls, "p50_us": statistics.median(ordered), "p99_us": percentile(ordered, 0.99),
            "mean_us": statistics.fmean(ordered), "complete": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--self", dest="self_addr", required=True)
    p.add_argument("--partners", required=True, help="comma list of host:port")
    p.add_argument("--mode", choices=("default", "nobatch"), default="default")
    p.add_argument("--calls", type=int, default=20000, help="pipelined calls (default mode)")
    p.add_argument("--sync-calls", type=int, default=10, help="calls made one at a time")
    p.add_argument("--size", type=int, default=100, help="bytes of the argument")
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)

    obj = Counter(args.self_addr, args.partners.split(","), make_conf(args.mode))
    deadline = time.monotonic() + 60
    while not (obj._getLeader() is not None and obj.isReady()):
        if time.monotonic() > deadline:
            print(json.dumps({"event": "error", "error": "no leader after 60 s"}), flush=True)
            obj.destroy()
            return 1
        time.sleep(0.01)
    leader = obj._getLeader()
    print(json.dumps({"event": "ready", "self": args.self_addr, "leader": str(getattr(leader, "address", leader))}),
          flush=True)
    rc = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go":
            payload = b"x" * args.size
            try:
                if not obj._isLeader():
                    raise RuntimeError("this node is no longer the leader")
                for _ in range(args.warmup):
                    obj.put_bytes(payload, sync=True, timeout=10)
                result: dict[str, Any] = {"event": "result", "mode": args.mode, "leader": obj._isLeader()}
                if args.mode == "default":
                    result["pipelined"] = pipelined(obj, args.calls, payload, timeout=300)
                if args.sync_calls:
                    result["sync"] = one_at_a_time(obj, args.sync_calls, payload)
            except Exception as exc:  # reported to the parent, which fails the run
                result = {"event": "error", "error": repr(exc)}
                rc = 1
            print(json.dumps(result), flush=True)
        elif cmd == "quit" or not cmd:
            break
    obj.destroy()
    return rc


if __name__ == "__main__":
    sys.exit(main())
