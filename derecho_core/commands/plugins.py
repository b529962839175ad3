"""``derecho plugins``: what is installed, who provides it, what it registers."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plugins", help="list installed plugins and the names they register",
                       description="List every plugin: distribution, version, kind and registered names.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plugins import get_plugin_system

    system = get_plugin_system()
    infos = system.plugins()
    if args.json:
        out = {"plugins": [i.as_dict() for i in infos],
               "refused": [{"name": k, "reason": v} for k, v in sorted(system.refused.items())]}
        print(json.dumps(out, indent=2))
    else:
        rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "KIND", "NAMES")]
        for info in infos:
            kinds = [(k, v) for k, v in info.registered.items() if v] or [("-", [])]
            for kind, names in kinds:
                rows.append((info.name, info.distribution or "(in-process)", info.version or "-",
                             kind, ", ".join(names) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        if len(rows) == 1:
            print("(no plugins installed: pip install derecho-transport-sockets derecho-allocators "
                  "derecho-storage-file derecho-storage-mem)")
    for name, reason in sorted(system.refused.items()):
        print(f"refused plugin {name}: {reason}", file=sys.stderr)
    return 1 if system.refused else 0
