"""``derecho member``: run a group member with no replicated objects and report its views.

Handy to try a configuration, to watch joins and failures, and to drive
multi-process tests and the view-change benchmark: every installed view is
printed (``--json``: one JSON object per line), and the exit status says why
the member stopped (0 left, 3 partition, 4 id in use, 5 removed, 6 error).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

EXIT_CODES = {"left": 0, "partition": 3, "id_in_use": 4, "removed": 5, "error": 6}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "member", help="run a group member (no replicated objects) and print every view it installs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="derecho member [--file F] [--node-file F] [--json] [--leave-after S] [--SECTION/key=value ...]")
    p.add_argument("--file", help="group configuration file (default: $DERECHO_CONF_FILE or ./derecho.cfg)")
    p.add_argument("--node-file", help="node configuration file")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--leave-after", type=float, default=None, metavar="S", help="leave gracefully after S seconds")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from ..conf import Conf
    from ..engine import GroupStoppedError
    from ..group import Group

    conf, _ = Conf.parse_args(args.extra, config_file=args.file, node_config_file=args.node_file)
    out_lock = threading.Lock()

    def emit(event: str, **fields: object) -> None:
        with out_lock:
            if args.json:
                print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)
            else:
                print(f"{event}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def on_view(view) -> None:
        emit("view", vid=view.vid, members=list(view.members), joined=list(view.joined),
             departed=list(view.departed), node=conf.get("DERECHO/local_id"))

    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    emit("starting", node=conf.get("DERECHO/local_id"))
    try:
        group = Group(conf=conf, view_upcalls=[on_view])
    except GroupStoppedError as exc:
        emit("stopped", kind=exc.kind, reason=exc.reason)
        print(f"derecho member: {exc.reason}", file=sys.stderr)
        return EXIT_CODES.get(exc.kind, 6)
    deadline = None if args.leave_after is None else time.monotonic() + args.leave_after
    try:
        while not stop_requested.is_set():
            stop = group._engine.stop_reason
            if stop is not None:
                emit("stopped", kind=stop.kind, reason=stop.reason)
                print(f"derecho member: {stop.reason}", file=sys.stderr)
                group._engine.close()
                return EXIT_CODES.get(stop.kind, 6)
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    group.leave()
    emit("stopped", kind="left", reason="left the group")
    return 0
