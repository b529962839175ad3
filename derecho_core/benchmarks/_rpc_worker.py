"""One member process of ``derecho bench rpc`` (not a benchmark of its own).

Every process joins a group with one subgroup (type :class:`Counter`) of one
shard holding all ``--nodes`` members. The member of rank ``--client-rank``
then, on its subgroup handle:

1. makes ``--warmup`` calls one at a time (not measured);
2. **pipelined**: issues ``--calls`` ``ordered_send("put_bytes", b"x" * size)``
   without waiting, then collects every reply of every call (one per
   member); calls/s = calls / (last reply − first send);
3. **latency**: ``--latency-calls`` calls one at a time, each until all
   members replied; p50/p99 in µs.

It checks that the members' replies to each call agree (ordered: the same
counter value everywhere) and that the values rise by one per call, then
prints one JSON line. All members meet at a barrier before leaving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from derecho_core import Conf, Group, SubgroupInfo, SubgroupProvisioningError, SubView, ordered
from derecho_core.view import Mode


class Counter:
    """The replicated type of the benchmark."""

    def __init__(self) -> None:
        self.value = 0
        self.bytes = 0

    @ordered
    def add(self, n: int) -> int:
        self.value += n
        return self.value

    @ordered
    def put_bytes(self, data: bytes) -> int:
        """Count one call and its bytes; the count is the reply."""
        self.value += 1
        self.bytes += len(data)
        return self.value


def layout(n: int) -> SubgroupInfo:
    """One Counter subgroup, one shard of the first ``n`` members (ORDERED, every member a sender)."""

    def allocate(types: Any, prev_view: Any, curr_view: Any) -> dict[Any, list[list[SubView]]]:
        if curr_view.num_members < n:
            raise SubgroupProvisioningError(f"waiting for {n} members, have {curr_view.num_members}")
        members = curr_view.members[:n]
        curr_view.next_unassigned_rank = n
        return {t: [[SubView(members, Mode.ORDERED, [True] * n)]] for t in types}

    return SubgroupInfo(allocate)


def _replies(results: Any, timeout: float) -> dict[int, Any]:
    futures = results.get(timeout)
    return {node: f.result(timeout) for node, f in futures.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def client(group: Group, args: argparse.Namespace) -> dict[str, Any]:
    handle: Any = group.get_subgroup(Counter)
    n = args.nodes
    payload = b"x" * args.size
    timeout = args.timeout
    problems: list[str] = []
    last = 0

    def check(replies: dict[int, Any]) -> None:
        nonlocal last
        values = set(replies.values())
        if len(replies) != n or len(values) != 1:
            problems.append(f"replies {replies} (expected one equal value from each of {n} members)")
            return
        value = values.pop()
        if value != last + 1:
            problems.append(f"counter went {last} -> {value}")
        last = value

    for _ in range(args.warmup):
        check(_replies(handle.ordered_send("put_bytes", payload), timeout))

    # pipelined: every call issued before any reply is collected
    start = time.perf_counter()
    pending = [handle.ordered_send("put_bytes", payload) for _ in range(args.calls)]
    issued = time.perf_counter()
    replies = 0
    for results in pending:
        got = _replies(results, timeout)
        replies += len(got)
        check(got)
    elapsed = time.perf_counter() - start
    pending.clear()

    samples = []
    for _ in range(args.latency_calls):
        t = time.perf_counter()
        got = _replies(handle.ordered_send("put_bytes", payload), timeout)
        samples.append((time.perf_counter() - t) * 1e6)
        check(got)
    ordered_samples = sorted(samples)
    return {
        "pipelined": {"calls": args.calls, "replies": replies, "seconds": elapsed,
                      "issue_seconds": issued - start, "calls_per_s": args.calls / elapsed},
        "latency": {"calls": args.latency_calls,
                    "p50_us": statistics.median(ordered_samples) if samples else 0.0,
                    "p99_us": percentile(ordered_samples, 0.99) if samples else 0.0,
                    "mean_us": statistics.fmean(ordered_samples) if samples else 0.0},
        "final_value": last, "problems": problems[:5], "consistent": not problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--latency-calls", type=int, required=True)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--client-rank", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one call's replies")
    args, rest = p.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest)
    me = conf.get("DERECHO/local_id")
    group = Group([Counter], layout(args.nodes), conf=conf)
    rc = 0
    try:
        group.barrier_sync(timeout=120)
        rank = group.get_members().index(me)
        result: dict[str, Any] = {"event": "result", "node": me, "rank": rank, "client": rank == args.client_rank}
        if rank == args.client_rank:
            try:
                result.update(client(group, args))
                result["complete"] = result["consistent"]
            except Exception as exc:  # reported in the JSON line; the parent fails the run
                result.update(complete=False, error=repr(exc))
        else:
            result["complete"] = True
        rc = 0 if result["complete"] else 1
        print(json.dumps(result), flush=True)
        try:
            group.barrier_sync(timeout=900)  # nobody leaves before the client finished
        except Exception:
            pass
    finally:
        group._engine.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
