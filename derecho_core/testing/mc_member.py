"""A member that multicasts N messages and logs every delivery (multi-process tests and demos).

    python -m derecho_core.testing.mc_member --out deliveries.txt --count 10000 --members 3 \\
        [--size 100] [--raw] [--SECTION/key=value ...]

It joins (or starts) the group, waits for ``--members`` members, runs a
barrier, sends its messages through ``get_subgroup(RawObject).send``, and
writes one line per delivered message: ``sender index version id``. Progress
goes to stdout as JSON lines (ready, sent, delivered_own). It runs until
SIGTERM, so slower peers can finish.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from derecho_core import Conf, Group, RawObject, SubgroupInfo, SubView, UserMessageCallbacks
from derecho_core.view import Mode


def entire_view(mode: Mode) -> SubgroupInfo:
    def allocate(types: Any, prev_view: Any, curr_view: Any) -> dict[Any, list[list[SubView]]]:
        curr_view.next_unassigned_rank = curr_view.num_members
        return {t: [[SubView(curr_view.members, mode)]] for t in types}

    return SubgroupInfo(allocate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--raw", action="store_true")
    args, rest = parser.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest)
    me = conf.get("DERECHO/local_id")
    out = open(args.out, "w", buffering=1 << 16)
    lock = threading.Lock()
    own_delivered = 0
    done_own = threading.Event()

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "node": me, "time": time.time(), **fields}), flush=True)

    def on_delivery(sg: int, sender: int, index: int, payload: memoryview, version: int) -> None:
        nonlocal own_delivered
        msg_id = bytes(payload[:32]).split(b" ", 1)[0].decode()
        with lock:
            out.write(f"{sender} {index} {version} {msg_id}\n")
        if sender == me:
            own_delivered += 1
            if own_delivered == args.count:
                out.flush()
                done_own.set()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    group = Group([RawObject], entire_view(Mode.UNORDERED if args.raw else Mode.ORDERED), conf=conf,
                  callbacks=UserMessageCallbacks(global_stability_callback=on_delivery))
    while len(group.get_members()) < args.members and not stop.is_set():
        time.sleep(0.02)
    group.barrier_sync(timeout=60)
    emit("ready", members=group.get_members())
    handle = group.get_subgroup(RawObject)
    started = time.perf_counter()
    for i in range(args.count):
        handle.send(f"{me}:{i} ".encode().ljust(args.size, b"."))
    emit("sent", seconds=time.perf_counter() - started)
    while not stop.is_set():
        if done_own.wait(0.05):
            emit("delivered_own", seconds=time.perf_counter() - started)
            done_own.clear()
        with lock:
            out.flush()  # so a watcher sees deliveries as they happen
    with lock:
        out.flush()
        out.close()
    group._engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
