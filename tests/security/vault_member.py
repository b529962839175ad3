"""A group member for the authentication tests (run as a script by ``test_auth.py``).

``python vault_member.py --file CONF [--members N] [--SECTION/key=value ...]`` starts or joins a
group whose one subgroup is a ``Vault`` with a single shard of every member. It prints JSON lines on
stdout: ``ready`` once the group has N members, ``view`` per installed view, and ``touched`` each
time ``Vault.touch`` runs here (so a test can prove an RPC was, or was never, executed). SIGTERM
makes it leave.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from derecho_core import Conf, Group, SubgroupInfo, ordered, p2p
from derecho_core.view import SubView, View

GROUP: Group | None = None
_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _out:
        print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)


class Vault:
    """A dictionary; ``touch`` records every call that reaches it."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    @ordered
    def put(self, key: str, value: str) -> bool:
        self.items[key] = value
        return True

    @p2p
    def get(self, key: str) -> str | None:
        return self.items.get(key)

    @p2p
    def touch(self, marker: str) -> bool:
        assert GROUP is not None
        emit("touched", marker=marker, caller=GROUP.get_rpc_caller_id())
        return True


def whole_view_shard() -> SubgroupInfo:
    def allocate(types: Any, prev_view: View | None, curr_view: View) -> dict[Any, list[list[SubView]]]:
        return {Vault: [[curr_view.make_subview(curr_view.members)]]}

    return SubgroupInfo(allocate)


def main(argv: list[str] | None = None) -> int:
    global GROUP
    parser = argparse.ArgumentParser()
    parser.add_argument("--file")
    parser.add_argument("--members", type=int, default=1)
    args, rest = parser.parse_known_args(argv)
    conf, _ = Conf.parse_args(rest, config_file=args.file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_view(view: View) -> None:
        emit("view", vid=view.vid, members=list(view.members))

    GROUP = Group([Vault], whole_view_shard(), factories={Vault: lambda reg, sg: Vault()}, conf=conf,
                  view_upcalls=[on_view], join_timeout=30)
    while len(GROUP.get_members()) < args.members and not stop.is_set():
        time.sleep(0.02)
    emit("ready", node=GROUP.get_my_id(), members=GROUP.get_members())
    stop.wait()
    GROUP.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
