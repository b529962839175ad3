"""A group member for the chaos harness: a persistent replicated ``ChaosLedger`` under load.

``python -m derecho_core.testing.chaos_member --file CONF [--shards K] [--incarnation I] [--SECTION/key=value ...]``

The subgroup is one ``ChaosLedger`` with ``--shards`` shards; node ``x`` is in
shard ``x % K`` (so a node never moves between shards and a check can compare a
shard's replicas). Every ordered call carries a unique id ``[node, incarnation,
seq]``; the object keeps a counter, a hash chain of every id applied, and the
last id, and each update is a new version in the ``state`` log, so the log
lists every applied call in order.

It prints one JSON line per event (``view``, ``ready``, ``c`` per completed
call, ``p`` per p2p reply, ``persisted``, ``digest``, ``stopped``) and reads
commands on stdin:

- ``load RATE WINDOW P2P_EVERY``: ordered calls at about RATE per second, at
  most WINDOW in flight, and a p2p ``read`` of another shard member every
  P2P_EVERY-th call; every 20th acknowledged call is awaited until persisted
  on every shard member (``persisted`` events);
- ``stop``: stop the load and wait for the calls in flight (``load_stopped``);
- ``digest``: digests of the state and the log, and the id of every applied
  call, in log order;
- ``leave``: leave the group and exit 0.

Exit status: 0 left, 3 partition, 4 id in use, 5 removed, 6 error, 7 join failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import random
import sys
import threading
import time
from typing import Any

from ..conf import Conf
from ..errors import NodeRemovedFromGroupError
from ..persistent import Persistent, PersistentRegistry
from ..rpc.methods import ordered, p2p
from ..subgroup_info import SubgroupInfo
from ..view import SubView, View

EXIT_CODES = {"left": 0, "partition": 3, "id_in_use": 4, "removed": 5, "error": 6}
JOIN_FAILED = 7


class ChaosLedger:
    """A counter and a hash chain of the applied call ids: one log entry per update."""

    def __init__(self, registry: PersistentRegistry) -> None:
        self.state: Persistent[dict[str, Any]] = Persistent(
            lambda: {"n": 0, "chain": "0" * 16, "last": None}, registry, "state")

    @ordered
    def add(self, call_id: list[int]) -> list[Any]:
        st = self.state.value
        chain = hashlib.sha256((st["chain"] + json.dumps(list(call_id))).encode()).hexdigest()[:16]
        self.state.value = {"n": st["n"] + 1, "chain": chain, "last": list(call_id)}
        return [st["n"] + 1, chain]

    @p2p
    def read(self) -> list[Any]:
        st = self.state.value
        return [st["n"], st["chain"]]


def shards_by_id(num_shards: int) -> SubgroupInfo:
    """Shard ``k`` holds the members whose id is ``k`` modulo ``num_shards``, in rank order."""

    def allocate(types: Any, prev_view: View | None, curr_view: View) -> dict[Any, list[list[SubView]]]:
        from ..errors import SubgroupProvisioningError

        shards = [[m for m in curr_view.members if m % num_shards == k] for k in range(num_shards)]
        if any(not s for s in shards):
            raise SubgroupProvisioningError("every ChaosLedger shard needs a member")
        return {ChaosLedger: [[curr_view.make_subview(s) for s in shards]]}

    return SubgroupInfo(allocate)


def main(argv: list[str] | None = None) -> int:
    from ..engine import GroupStoppedError
    from ..group import Group

    parser = argparse.ArgumentParser()
    parser.add_argument("--file")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--join-timeout", type=float, default=25.0)
    args, rest = parser.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest, config_file=args.file)
    me = conf.get("DERECHO/local_id")
    conf = Conf.load(config_file=args.file, argv=rest, overrides={
        "PERS/file_path": f"{conf.get('PERS/file_path')}/node{me}"})
    out_lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields})
        with out_lock:
            print(line, flush=True)

    def on_view(view: View) -> None:
        emit("view", vid=view.vid, members=list(view.members))

    emit("starting", node=me, incarnation=args.incarnation)
    try:
        group = Group([ChaosLedger], shards_by_id(args.shards),
                      factories={ChaosLedger: lambda reg, sg: ChaosLedger(reg)},
                      conf=conf, view_upcalls=[on_view], join_timeout=args.join_timeout)
    except GroupStoppedError as exc:
        emit("stopped", kind=exc.kind, reason=exc.reason, phase="join")
        print(f"chaos_member: {exc.reason}", file=sys.stderr, flush=True)
        return EXIT_CODES.get(exc.kind, 6) if exc.kind != "error" else JOIN_FAILED
    except Exception as exc:  # the contact died or is unreachable: the harness retries later
        emit("stopped", kind="join_failed", reason=repr(exc), phase="join")
        print(f"chaos_member: join failed: {exc!r}", file=sys.stderr, flush=True)
        return JOIN_FAILED
    emit("ready", node=me)
    try:
        handle = group.get_subgroup(ChaosLedger)
    except GroupStoppedError as exc:  # removed (or cut off) right after joining
        emit("stopped", kind=exc.kind, reason=exc.reason, phase="ready")
        print(f"chaos_member: {exc.reason}", file=sys.stderr, flush=True)
        group._engine.close()
        return EXIT_CODES.get(exc.kind, 6)
    stop_load = threading.Event()
    loaders: list[threading.Thread] = []

    def shard_peers() -> list[int]:
        try:
            return [m for m in group.get_members() if m % args.shards == me % args.shards and m != me]
        except Exception:
            return []

    def load(rate: float, window: int, p2p_every: int) -> None:
        slots = threading.Semaphore(window)
        pending: queue.Queue[Any] = queue.Queue()
        rng = random.Random(me * 1000 + args.incarnation)
        done = threading.Event()

        def complete() -> None:
            persisted_every = 20
            acked = 0
            while True:
                item = pending.get()
                if item is None:
                    done.set()
                    return
                kind, ident, qr = item
                try:
                    if kind == "o":
                        try:
                            replies = qr.get(30)
                        except Exception as exc:
                            emit("c", id=ident, st="failed", err=type(exc).__name__)
                            continue
                        values, removed, other = [], 0, 0
                        for fut in replies.values():
                            try:
                                values.append(fut.result(30))
                            except NodeRemovedFromGroupError:
                                removed += 1
                            except Exception:
                                other += 1
                        n = values[0][0] if values else None
                        same = all(v == values[0] for v in values)
                        st = "acked" if values and not removed and not other else "delivered"
                        emit("c", id=ident, st=st, n=n, v=qr.version, replies=len(replies), ok=len(values),
                             removed=removed, other=other, agree=same)
                        if st == "acked":
                            acked += 1
                            if acked % persisted_every == 0:
                                try:
                                    qr.await_global_persistence(10)
                                    emit("persisted", v=qr.version, n=n)
                                except Exception as exc:
                                    emit("persist_failed", v=qr.version, err=type(exc).__name__)
                    else:
                        try:
                            value = qr.get(10)[ident].result(10)
                            emit("p", to=ident, st="ok", n=value[0])
                        except Exception as exc:
                            emit("p", to=ident, st="failed", err=type(exc).__name__)
                finally:
                    if kind == "o":
                        slots.release()

        completer = threading.Thread(target=complete, daemon=True)
        completer.start()
        seq = 0
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = time.monotonic()
        while not stop_load.is_set():
            if not slots.acquire(timeout=0.2):
                continue
            ident = [me, args.incarnation, seq]
            try:
                qr = handle.ordered_send("add", ident)
            except Exception as exc:
                slots.release()
                emit("send_failed", id=ident, err=repr(exc))
                if group._engine.stop_reason is not None:
                    break
                time.sleep(0.1)
                continue
            emit("s", seq=seq)
            pending.put(("o", ident, qr))
            seq += 1
            if p2p_every and seq % p2p_every == 0:
                peers = shard_peers()
                if peers:
                    target = rng.choice(peers)
                    try:
                        pending.put(("p", target, handle.p2p_send(target, "read")))
                    except Exception as exc:
                        emit("p", to=target, st="failed", err=type(exc).__name__)
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    stop_load.wait(delay)
                else:
                    next_at = time.monotonic()
        pending.put(None)
        done.wait(70)
        emit("load_stopped", sent=seq)

    def commands() -> None:
        for line in sys.stdin:
            cmd, *params = line.split() or [""]
            try:
                if cmd == "load":
                    rate, window, every = float(params[0]), int(params[1]), int(params[2])
                    t = threading.Thread(target=load, args=(rate, window, every), daemon=True)
                    loaders.append(t)
                    t.start()
                elif cmd == "stop":
                    stop_load.set()
                    for t in loaders:
                        t.join(80)
                    emit("stop_done")
                elif cmd == "digest":
                    obj: ChaosLedger = handle.get_ref()
                    h = hashlib.sha256()
                    applied = []
                    for entry in obj.state.log:
                        h.update(entry.version.to_bytes(8, "little", signed=True))
                        h.update(bytes(entry.data))
                    for _version, _ts, value in obj.state:
                        applied.append(value["last"])
                    st = obj.state.value
                    emit("digest", shard=me % args.shards, n=st["n"], chain=st["chain"],
                         state=hashlib.sha256(json.dumps(st).encode()).hexdigest()[:16],
                         log=h.hexdigest()[:16], log_len=len(applied), applied=applied,
                         version=handle.get_current_version(),
                         frontier=handle.get_global_persistence_frontier())
                elif cmd == "leave":
                    stop_load.set()
                    group.leave()
                    emit("stopped", kind="left", reason="left")
                    sys.stdout.flush()
                    import os
                    os._exit(0)
            except Exception as exc:
                emit("command_failed", cmd=cmd, err=repr(exc))

    threading.Thread(target=commands, daemon=True).start()
    while True:
        stop = group._engine.stop_reason
        if stop is not None:
            stop_load.set()
            emit("stopped", kind=stop.kind, reason=stop.reason)
            print(f"chaos_member: {stop.reason}", file=sys.stderr, flush=True)
            try:
                group._engine.close()
            finally:
                import os
                os._exit(EXIT_CODES.get(stop.kind, 6))
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
