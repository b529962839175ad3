"""``derecho status``: what a running group is doing, seen from outside as an external client.

    derecho status [--contact HOST:PORT] [--json] [--watch [SECONDS]] [--file CFG] [--SECTION/key=value ...]

Connects to a member's external port (``--contact``, default ``contact_ip`` and
``external_port`` of the configuration), then asks every member for its
status and shows:

- the view id and the members, with their rank and address;
- each subgroup's shards with their members and senders;
- per shard, each member's delivered and persisted versions, and the global
  persistence and stability frontiers;
- the recent view changes.

``--watch`` refreshes it live in the terminal; ``--json`` prints one JSON
document for scripts.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from datetime import datetime, timezone
from typing import Any


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show a running group: view, members, shards and their frontiers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="derecho status [--contact HOST:PORT] [--json] [--watch [S]] [--SECTION/key=value ...]")
    p.add_argument("--contact", help="a member's external-client address, HOST:PORT (default: contact_ip and "
                                     "external_port of the configuration)")
    p.add_argument("--file", help="group configuration file")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until Ctrl-C")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each member (default 5)")
    p.set_defaults(func=run, accepts_extra=True)


def collect(client: Any) -> dict[str, Any]:
    """The group's status: the view from one member, every member's own shards merged in."""
    first = client.status()
    members = [m["id"] for m in first["members"]]
    per_node: dict[int, dict[str, Any]] = {first["node"]: first}
    unreachable: dict[int, str] = {}
    for node in members:
        if node in per_node:
            continue
        try:
            per_node[node] = client.status(node)
        except Exception as exc:  # a member that does not answer is shown as such
            unreachable[node] = str(exc)
    subgroups = first["subgroups"]
    for sg in subgroups:
        for shard in sg["shards"]:
            shard["progress"] = {}
            frontier = stability = -1
            for node in shard["members"]:
                mine = per_node.get(node, {}).get("my_shards", {}).get(str(sg["subgroup_id"]))
                if mine is None:
                    continue
                shard["progress"][str(node)] = {"delivered": mine["latest_version"], "persisted": mine["persisted"]}
                frontier = max(frontier, mine["global_persisted"])
                stability = max(stability, mine["stability_frontier_us"])
            shard["global_persisted"] = frontier
            shard["stability_frontier_us"] = stability
    views = sorted({(v["vid"], tuple(v["members"]), v["time"]) for s in per_node.values()
                    for v in s.get("recent_views", [])})
    recent: dict[int, dict[str, Any]] = {}
    for vid, mem, t in views:
        recent.setdefault(vid, {"vid": vid, "members": list(mem), "time": t})
    return {"vid": first["vid"], "adequately_provisioned": first["adequately_provisioned"],
            "members": first["members"], "subgroups": subgroups, "unreachable": unreachable,
            "recent_views": [recent[v] for v in sorted(recent)][-10:], "asked": sorted(per_node)}


def _version(v: int) -> str:
    return "-" if v < 0 else f"{v >> 32}:{v & 0xFFFFFFFF}"


def _time(us: int) -> str:
    return "-" if us <= 0 else datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def render(status: dict[str, Any]) -> Any:
    """A rich renderable of the status (tables)."""
    from rich.console import Group as RichGroup
    from rich.table import Table

    head = Table(title=f"view {status['vid']}" + ("" if status["adequately_provisioned"] else " (inadequate)"),
                 title_justify="left")
    for col in ("rank", "node", "address", "external port", "state"):
        head.add_column(col)
    for m in status["members"]:
        state = "unreachable" if str(m["id"]) in map(str, status["unreachable"]) else \
            ("failed" if m["failed"] else "ok")
        head.add_row(str(m["rank"]), str(m["id"]), m["address"] or "-", str(m["external_port"] or "-"), state)
    shards = Table(title="subgroups (versions as vid:seq)", title_justify="left")
    for col in ("subgroup", "type", "shard", "mode", "members", "senders", "delivered / persisted by member",
                "global persisted", "stability frontier (UTC)"):
        shards.add_column(col)
    for sg in status["subgroups"]:
        for shard in sg["shards"]:
            progress = " ".join(f"{n}={_version(p['delivered'])}/{_version(p['persisted'])}"
                                for n, p in shard["progress"].items()) or "-"
            shards.add_row(str(sg["subgroup_id"]), f"{sg['type']}[{sg['index']}]", str(shard["shard"]),
                           shard["mode"], str(shard["members"]), str(shard["senders"]), progress,
                           _version(shard["global_persisted"]), _time(shard["stability_frontier_us"]))
    views = Table(title="recent views", title_justify="left")
    for col in ("vid", "members", "installed (UTC)"):
        views.add_column(col)
    for v in status["recent_views"]:
        views.add_row(str(v["vid"]), str(v["members"]), _time(int(v["time"] * 1e6)))
    return RichGroup(head, shards, views)


def run(args: argparse.Namespace) -> int:
    from ..conf import Conf
    from ..errors import DerechoError
    from ..external_client import ExternalGroupClient

    from ..external_client import ExternalClientRefusedError

    conf, _ = Conf.parse_args(args.extra, config_file=args.file)
    top = conf.get("DERECHO/max_node_id")
    contact = None
    if args.contact:
        host, _, port = args.contact.rpartition(":")
        if not host or not port.isdigit():
            print(f"derecho status: --contact must be HOST:PORT, got {args.contact!r}", file=sys.stderr)
            return 2
        contact = (host, int(port))
    try:
        for attempt in range(8):  # a client id of its own, from the top of the id range
            client_conf = conf.with_overrides({"DERECHO/local_id": top - 1 - secrets.randbelow(max(1, top // 4))})
            try:
                client = ExternalGroupClient([], client_conf, contact=contact, timeout=args.timeout)
                break
            except ExternalClientRefusedError as exc:
                if exc.code != "ID_IN_USE" or attempt == 7:
                    raise
    except (DerechoError, OSError) as exc:
        where = args.contact or f"{conf.get('DERECHO/contact_ip')}:{conf.get('DERECHO/external_port')}"
        print(f"derecho status: cannot reach a member at {where}: {exc}", file=sys.stderr)
        return 1
    with client:
        if args.json and not args.watch:
            print(json.dumps(collect(client), indent=2))
            return 0
        from rich.console import Console
        from rich.live import Live

        console = Console()
        if not args.watch:
            console.print(render(collect(client)))
            return 0
        try:
            with Live(render(collect(client)), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(args.watch)
                    try:
                        client.update_view()
                        live.update(render(collect(client)))
                    except DerechoError as exc:
                        live.update(f"[red]no member answered: {exc}[/red]")
        except KeyboardInterrupt:
            return 0
