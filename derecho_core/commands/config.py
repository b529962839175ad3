"""``derecho config``: every effective configuration value and where it came from."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "config", help="print the effective configuration and where each value came from",
        description="Print every effective value (defaults, derecho.cfg, derecho_node.cfg, command line). "
                    "Options are --SECTION/key=value; application arguments follow '--'.",
        usage="derecho config [--file F] [--node-file F] [--json] [--SECTION/key=value ...] [-- app-args]")
    p.add_argument("--file", help="group configuration file (default: $DERECHO_CONF_FILE or ./derecho.cfg)")
    p.add_argument("--node-file", help="node configuration file (default: $DERECHO_NODE_CONF_FILE or "
                   "./derecho_node.cfg)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from ..conf import Conf

    conf, app_args = Conf.parse_args(args.extra, config_file=args.file, node_config_file=args.node_file)
    rows = list(conf.items())
    if args.json:
        print(json.dumps({
            "files": [str(f) for f in conf.files],
            "values": {k: {"value": v, "source": s} for k, v, s in rows},
            "app_args": app_args,
        }, indent=2))
        return 0
    print("files: " + (", ".join(str(f) for f in conf.files) or "(none: defaults and command line)"))
    section = None
    width = max(len(k.rsplit("/", 1)[1]) for k, _, _ in rows)
    for key, value, source in rows:
        sec, short = key.rsplit("/", 1)
        if sec != section:
            print(f"\n[{sec}]")
            section = sec
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        if isinstance(shown, bool):
            shown = "true" if shown else "false"
        shown = "" if shown is None else str(shown)
        if "\n" in shown:
            shown = "'" + shown + "'"
        print(f"{short.ljust(width)} = {shown}    # {source}")
    if app_args:
        print("\napplication arguments: " + " ".join(app_args))
    return 0
