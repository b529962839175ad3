"""A group member with a persistent replicated ``Ledger``, driven by commands on stdin (RPC tests).

``python -m derecho_core.testing.rpc_member --file CONF [--min-shard N] [--SECTION/key=value ...]``
joins (or starts) a group whose one subgroup is a single shard of every
member (at least ``--min-shard``), prints a JSON line per installed view, and
then runs one command per stdin line, answering with a JSON line:

- ``burst N``: N pipelined ``ordered_send("add", 1)``, then every reply
  collected: per replying node the count of values, NodeRemovedFromGroupError
  and other errors;
- ``pad P``: make the ``pad`` field P bytes (each later version appends it, to
  grow the log);
- ``digest``: digests of the object state and of every log, the latest version,
  and the state transfers this node sent;
- ``persist``: wait until this node's last call is persisted on every member;
- ``stream N``: N calls kept in flight, every 25th awaited until globally persisted and
  reported as ``durable`` with the counter value it returned;
- ``leave``: leave the group and exit 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


class Ledger:
    """A counter with a log: every ordered update is a new version of both fields."""

    def __init__(self, registry: PersistentRegistry) -> None:
        self.state: Persistent[dict[str, int]] = Persistent(lambda: {"n": 0, "total": 0}, registry, "state")
        self.pad: Persistent[bytes] = Persistent(bytes, registry, "pad")
        self.calls_seen = 0  # a plain attribute: travels in the snapshot, not in a log

    delay_s = 0.0  # --handler-delay-ms: a slow replica (its replies lag behind the others')

    @ordered
    def add(self, x: int) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        st = dict(self.state.value)
        st["n"] += 1
        st["total"] += x
        self.state.value = st
        self.calls_seen += 1
        return st["n"]

    @ordered
    def set_pad(self, size: int) -> int:
        self.pad.value = b"p" * size
        return size

    @p2p
    def read(self) -> dict[str, int]:
        return dict(self.state.value)


def whole_view_shard(min_size: int, shards: int = 1) -> SubgroupInfo:
    """One subgroup of the whole view, in ``shards`` shards of consecutive ranks (at least ``min_size`` each)."""
    def allocate(types: Any, prev_view: View | None, curr_view: View) -> dict[Any, list[list[SubView]]]:
        from ..errors import SubgroupProvisioningError

        m = curr_view.members
        if len(m) < min_size * shards:
            raise SubgroupProvisioningError(f"{shards} Ledger shard(s) need {min_size} members each")
        size = len(m) // shards
        parts = [m[i * size:(i + 1) * size] if i < shards - 1 else m[i * size:] for i in range(shards)]
        return {Ledger: [[curr_view.make_subview(part) for part in parts]]}

    return SubgroupInfo(allocate)


def log_digest(field: Persistent[Any]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for entry in field.log:
        h.update(entry.version.to_bytes(8, "little", signed=True))
        h.update(bytes(entry.data))
        n += 1
    return h.hexdigest()[:16], n


def main(argv: list[str] | None = None) -> int:
    from ..group import Group

    parser = argparse.ArgumentParser()
    parser.add_argument("--file")
    parser.add_argument("--min-shard", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--handler-delay-ms", type=float, default=0.0)
    args, rest = parser.parse_known_args(argv)
    Ledger.delay_s = args.handler_delay_ms / 1000.0
    conf, _ = Conf.parse_args(rest, config_file=args.file)
    # members of one test share a config file; each keeps its logs in its own directory, as separate hosts would
    node_id = conf.get("DERECHO/local_id")
    conf = Conf.load(config_file=args.file, argv=rest, overrides={
        "PERS/file_path": f"{conf.get('PERS/file_path')}/node{node_id}"})
    lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        with lock:
            print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)

    def on_view(view: View) -> None:
        emit("view", vid=view.vid, members=list(view.members))

    group = Group([Ledger], whole_view_shard(args.min_shard, args.shards), factories={Ledger: lambda reg, sg: Ledger(reg)},
                  conf=conf, view_upcalls=[on_view], join_timeout=60)
    emit("ready", node=group.get_my_id())
    last = None
    for line in sys.stdin:
        cmd, *params = line.split()
        handle = group.get_subgroup(Ledger)
        if cmd == "burst":
            results = [handle.ordered_send("add", 1) for _ in range(int(params[0]))]
            last = results[-1] if results else last
            counts: dict[int, dict[str, int]] = {}
            for r in results:
                for node, fut in r.get(120).items():
                    c = counts.setdefault(node, {"ok": 0, "removed": 0, "other": 0})
                    try:
                        fut.result(120)
                        c["ok"] += 1
                    except NodeRemovedFromGroupError:
                        c["removed"] += 1
                    except Exception as exc:  # reported, so the test can say what went wrong
                        c["other"] += 1
                        emit("error", error=repr(exc))
            emit("burst", replies={str(k): v for k, v in counts.items()})
        elif cmd == "stream":
            # continuous load: calls in flight all the time; every 25th is awaited until persisted on every
            # member and reported as durable (the test kills the group at some point in this loop)
            window: list[Any] = []
            for _ in range(int(params[0])):
                window.append(handle.ordered_send("add", 1))
                if len(window) >= 25:
                    r = window[-1]
                    n = max(f.result(60) for f in r.get(60).values())
                    r.await_global_persistence(60)
                    emit("durable", n=n, version=r.version)
                    window = []
            emit("streamed")
        elif cmd == "pad":
            r = handle.ordered_send("set_pad", int(params[0]))
            last = r
            r.values(120)
            emit("pad", size=int(params[0]))
        elif cmd == "persist":
            if last is not None:
                last.await_global_persistence(120)
            emit("persisted", frontier=handle.get_global_persistence_frontier())
        elif cmd == "digest":
            obj: Ledger = handle.get_ref()
            logs = {name: log_digest(f) for name, f in (("state", obj.state), ("pad", obj.pad))}
            state = hashlib.sha256(json.dumps([obj.state.value, len(obj.pad.value), obj.calls_seen]).encode())
            emit("digest", state=state.hexdigest()[:16], value=obj.state.value, calls_seen=obj.calls_seen,
                 logs=logs, version=handle.get_current_version(), transfers=group.rpc.transfers)
        elif cmd == "leave":
            group.leave()
            emit("left")
            return 0
    group.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
