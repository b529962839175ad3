"""``derecho layout``: check a subgroup layout before deploying it.

Runs the allocator on a first view of the given members, then on each view
that follows the given failures and joins (in the order given), and prints
every shard of every subgroup, as a table or as JSON. The layout comes from
the configuration (``[LAYOUT] allocator`` / ``json_layout`` /
``json_layout_file``, as a group would build it) or from a Python object
named ``module:attr`` or ``path/to/file.py:attr`` (a SubgroupInfo or an
allocator callable such as ``DefaultSubgroupAllocator({...})``).

    derecho layout --layout mylayouts:subgroup_info --members 0..11 --fail 3 --join 12
    derecho layout --LAYOUT/json_layout_file=layout.json --types Foo,Bar -n 6 --json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Hashable
from typing import Any

from ..errors import DerechoError, SubgroupProvisioningError


class LayoutCommandError(DerechoError):
    """A bad argument to ``derecho layout``."""


def parse_ids(text: str) -> list[int]:
    """``"0..11"``, ``"0-11"``, ``"1,3,5..7"`` -> node ids (in the order written)."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        for sep in ("..", "-"):
            if sep in part:
                a, _, b = part.partition(sep)
                if not (a.isdigit() and b.isdigit()) or int(a) > int(b):
                    raise LayoutCommandError(f"bad node range {part!r}; write e.g. 0..11")
                out.extend(range(int(a), int(b) + 1))
                break
        else:
            if not part.isdigit():
                raise LayoutCommandError(f"bad node id {part!r}; write ids such as 0..11 or 1,3,5")
            out.append(int(part))
    return out


def parse_change(text: str) -> tuple[list[int], list[int]]:
    """``"-3,-5,+12"``: nodes 3 and 5 leave, 12 joins, in one view change."""
    leavers: list[int] = []
    joiners: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if part[0] not in "+-" or not part[1:].isdigit():
            raise LayoutCommandError(f"bad change {part!r}; write -ID for a failure, +ID for a join")
        (joiners if part[0] == "+" else leavers).append(int(part[1:]))
    return leavers, joiners


class _StepAction(argparse.Action):
    """--fail/--join/--change append one view change each, keeping the order they were given in."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((self.dest, values))
        namespace.steps = steps


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layout", help="show how a subgroup layout allocates members, view after view",
        description="Run the allocator on a first view of --members, then on each view after the --fail, "
                    "--join and --change steps (in order), and print every shard. The layout comes from the "
                    "configuration ([LAYOUT] allocator, json_layout, json_layout_file; --SECTION/key=value "
                    "options apply) or from --layout MODULE:ATTR.",
        usage="derecho layout [--layout MODULE:ATTR] [--types T1,T2,...] (--members IDS | -n N) "
              "[--fail IDS] [--join IDS] [--change -ID,+ID] [--json] [--file F] [--SECTION/key=value ...]")
    p.add_argument("--layout", metavar="MODULE:ATTR",
                   help="a SubgroupInfo or allocator callable: module:attr or path/to/file.py:attr")
    p.add_argument("--allocator", metavar="NAME", help="allocator plugin name (overrides [LAYOUT] allocator)")
    p.add_argument("--types", metavar="T1,T2", help="subgroup types in group order (names); default: the "
                   "layout's own (policy keys, or the JSON type_alias entries)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--members", metavar="IDS", help="first view's members in rank order: 0..11 or 0,1,2,7")
    g.add_argument("-n", "--num-members", type=int, metavar="N", help="first view's members are 0..N-1")
    p.add_argument("--fail", action=_StepAction, metavar="IDS", help="a view change in which these nodes fail")
    p.add_argument("--join", action=_StepAction, metavar="IDS", help="a view change in which these nodes join")
    p.add_argument("--change", action=_StepAction, metavar="-ID,+ID",
                   help="one view change with failures (-ID) and joins (+ID); use --change=-3,+12")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--file", help="group configuration file (default: $DERECHO_CONF_FILE or ./derecho.cfg)")
    p.add_argument("--node-file", help="node configuration file")
    p.set_defaults(func=run, accepts_extra=True, steps=[])


# ---------------------------------------------------------------- the layout
def load_object(spec: str) -> Any:
    """``module:attr`` (the current directory is importable) or ``path/to/file.py:attr``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise LayoutCommandError(f"--layout wants MODULE:ATTR or FILE.py:ATTR, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise LayoutCommandError(f"--layout: no file {target!r}")
        name = "_derecho_layout_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(name, target)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise LayoutCommandError(f"--layout: cannot import {target!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LayoutCommandError(f"--layout: {target!r} has no attribute {attr!r}") from None
    return obj


def _name(t: Hashable) -> str:
    from ..subgroup_info import type_name

    return type_name(t)


def build_layout(args: argparse.Namespace) -> tuple[Any, list[Hashable]]:
    """The SubgroupInfo to run and the types, in group order."""
    from ..conf import Conf
    from ..subgroup_info import SubgroupInfo

    if args.layout:
        if args.extra or args.allocator:
            raise LayoutCommandError("--layout replaces the configuration's layout; drop --allocator and "
                                     f"{' '.join(args.extra) or 'the --SECTION/key options'}")
        obj = load_object(args.layout)
        if isinstance(obj, SubgroupInfo):
            info = obj
        elif callable(obj) and not isinstance(obj, type):
            info = SubgroupInfo(obj, name=args.layout)
        else:
            raise LayoutCommandError(f"--layout {args.layout} is {type(obj).__name__}, not a SubgroupInfo or an "
                                     "allocator callable (types, prev_view, curr_view)")
    else:
        extra = list(args.extra)
        if args.allocator:
            extra.append(f"--LAYOUT/allocator={args.allocator}")
        conf, app_args = Conf.parse_args(extra, config_file=args.file, node_config_file=args.node_file)
        if app_args:
            raise LayoutCommandError(f"unexpected arguments {' '.join(app_args)}")
        info = SubgroupInfo.from_conf(conf)
    known = info.types
    if args.types:
        names = [n.strip() for n in args.types.split(",") if n.strip()]
        if known is None:
            return info, list(names)
        if getattr(info.allocator, "positional", False):
            # A JSON layout serves types by position (Derecho ignores type_alias): the names only label
            # the positions, so a reordering of the aliases would silently swap the layouts.
            aliases = [_name(t) for t in known]
            if len(names) != len(aliases):
                raise LayoutCommandError(f"--types gives {len(names)} types but the layout has {len(aliases)} "
                                         f"entries ({', '.join(aliases)})")
            if sorted(names) == sorted(aliases) and names != aliases:
                raise LayoutCommandError(f"--types {','.join(names)}: the JSON layout serves types by position "
                                         f"and lists them as {', '.join(aliases)}; give the types in that order")
            return info, list(names)
        by_name = {_name(t): t for t in known}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise LayoutCommandError(f"--types: {', '.join(unknown)} not in the layout's types "
                                     f"({', '.join(by_name)})")
        return info, [by_name[n] for n in names]
    if known is None:
        raise LayoutCommandError("this allocator does not say which types it serves: give --types T1,T2,...")
    return info, known


# -------------------------------------------------------------------- output
def _ids_text(ids: list[int]) -> str:
    if len(ids) > 3 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"[{ids[0]}..{ids[-1]}]"
    return "[" + ", ".join(map(str, ids)) + "]"


def view_record(view: Any, error: str | None, prev_vid: int | None) -> dict[str, Any]:
    assigned: set[int] = set()
    subgroups = []
    for t, ids in zip(view.subgroup_type_order, view.subgroup_ids_by_type_id, strict=False):
        for index, sg_id in enumerate(ids):
            shards = []
            for sv in view.subgroup_shard_views[sg_id]:
                assigned.update(sv.members)
                shards.append({"members": sv.members, "senders": sv.senders, "mode": sv.mode.name,
                               "profile": sv.profile, "joined": sv.joined, "departed": sv.departed})
            subgroups.append({"type": _name(t), "index": index, "subgroup_id": sg_id, "shards": shards})
    return {"vid": view.vid, "members": view.members, "joined": view.joined, "departed": view.departed,
            "adequate": view.is_adequately_provisioned, "error": error, "previous_installed_vid": prev_vid,
            "next_unassigned_rank": view.next_unassigned_rank,
            "idle": [m for m in view.members if m not in assigned] if view.is_adequately_provisioned else [],
            "subgroups": subgroups}


def print_table(rec: dict[str, Any]) -> None:
    change = []
    if rec["departed"]:
        change.append(f"failed {', '.join(map(str, rec['departed']))}")
    if rec["joined"]:
        change.append(f"joined {', '.join(map(str, rec['joined']))}")
    print(f"view {rec['vid']}{' (' + '; '.join(change) + ')' if change else ''}: "
          f"{len(rec['members'])} members {_ids_text(rec['members'])}")
    if not rec["adequate"]:
        print(f"  INADEQUATE: {rec['error']}")
        print("  (not installed: the group waits for more members)")
        return
    later = rec["previous_installed_vid"] is not None
    if later and rec["previous_installed_vid"] != rec["vid"] - 1:
        print(f"  (shards compared with view {rec['previous_installed_vid']}, the last one installed)")
    head = ["TYPE", "INDEX", "SUBGROUP", "SHARD", "MODE", "PROFILE", "MEMBERS", "SENDERS"]
    if later:
        head += ["JOINED", "DEPARTED"]
    rows = [head]
    for sg in rec["subgroups"]:
        for shard_num, shard in enumerate(sg["shards"]):
            senders = "all" if shard["senders"] == shard["members"] else _ids_text(shard["senders"])
            row = [sg["type"], str(sg["index"]), str(sg["subgroup_id"]), str(shard_num), shard["mode"],
                   shard["profile"], _ids_text(shard["members"]), senders]
            if later:
                row += [_ids_text(shard["joined"]) if shard["joined"] else "-",
                        _ids_text(shard["departed"]) if shard["departed"] else "-"]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"  next_unassigned_rank {rec['next_unassigned_rank']}; idle: "
          f"{_ids_text(rec['idle']) if rec['idle'] else '(none)'}")


# ----------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from ..view import View, make_next_view

    info, types = build_layout(args)
    members = list(range(args.num_members)) if args.members is None else parse_ids(args.members)
    if not members:
        raise LayoutCommandError("the first view needs at least one member")
    if len(set(members)) != len(members):
        raise LayoutCommandError("--members lists a node twice")
    steps: list[tuple[list[int], list[int]]] = []
    for kind, text in args.steps:
        if kind == "change":
            steps.append(parse_change(text))
        else:
            ids = parse_ids(text)
            steps.append((ids, []) if kind == "fail" else ([], ids))
    records = []
    view = View(0, members, subgroup_type_order=types)
    installed = None  # the last adequate view: an inadequate one is never installed (spec §3.8)
    for step in [None, *steps]:
        if step is not None:
            try:
                view = make_next_view(view, *step)
            except ValueError as exc:
                raise LayoutCommandError(f"view {view.vid + 1}: {exc}") from None
        error = None
        prev_vid = None if installed is None else installed.vid
        try:
            info.allocate(types, installed, view, raise_on_inadequate=True)
            installed = view
        except SubgroupProvisioningError as exc:
            error = str(exc) or "the view is too small for the layout"
        records.append(view_record(view, error, prev_vid))
    if args.json:
        print(json.dumps({"types": [_name(t) for t in types], "views": records}, indent=2))
    else:
        print("types in group order: " + ", ".join(_name(t) for t in types))
        for rec in records:
            print()
            print_table(rec)
    return 0
