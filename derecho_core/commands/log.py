"""``derecho log``: look inside the persistent logs under ``[PERS] file_path``.

    derecho log list                      every log: entries, versions, times, size
    derecho log show NAME                 its versions with timestamps
    derecho log show NAME --version V     the value at V (or at --time T, --index I), decoded if possible
    derecho log verify [NAME ...]         check every checksum (exit 1 on corruption)
    derecho log saved                     the saved view and group identity a total restart starts from

Logs are opened read-only, without the lock, so a running node's logs can be
inspected; nothing is ever repaired or cut from here. The store is found
through the plugin registry (``file``), not imported: the core imports no plugin.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("log", help="list, show and verify persistent logs",
                       description="Inspect the logs of Persistent fields (read-only).")
    p.add_argument("--path", help="log directory (default: [PERS] file_path of the configuration)")
    p.add_argument("--storage", default="file", help="store plugin whose files to read (default: file)")
    p.add_argument("--json", action="store_true", help="print JSON")
    actions = p.add_subparsers(dest="log_action", metavar="ACTION")

    actions.add_parser("list", help="list the logs under the path")

    show = actions.add_parser("show", help="versions and timestamps of a log, or one value")
    show.add_argument("name", help="log name (as listed)")
    pick = show.add_mutually_exclusive_group()
    pick.add_argument("--version", type=int, help="value at this version (or the latest before it)")
    pick.add_argument("--time", help="value at this time: microseconds since the epoch or ISO 8601")
    pick.add_argument("--index", type=int, help="value at this log index (negative: from the end)")
    show.add_argument("--limit", type=int, default=0, help="show only the last N versions")
    show.add_argument("--pickle", action="store_true",
                      help="also decode pickled values (runs code from the log: only for logs you trust)")
    show.add_argument("-I", "--import-path", action="append", default=[],
                      help="directory to import the value's type from (repeatable)")

    actions.add_parser("saved", help="the saved view and group identity (what a total restart starts from)")

    verify = actions.add_parser("verify", help="check every checksum of the logs (all by default)")
    verify.add_argument("names", nargs="*", help="log names (default: every log under the path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plugins import storage

    factory = storage(args.storage)
    store_cls = getattr(factory, "__self__", None)
    if not (hasattr(store_cls, "list_logs") and hasattr(store_cls, "open_readonly")):
        from ..storage import StorageError

        raise StorageError(f"storage {args.storage!r} keeps no files to inspect")
    directory = Path(args.path) if args.path else Path(_conf_path())
    action = args.log_action or "list"
    if action == "saved":
        return _saved(directory, args)
    if action == "list":
        return _list(store_cls, directory, args)
    if action == "show":
        return _show(store_cls, directory, args)
    return _verify(store_cls, directory, args)


def _conf_path() -> str:
    from ..conf import Conf

    return str(Conf.load().get("PERS/file_path"))


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect the store's recovery warnings to print them in our own words, once."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("derecho.persistence")
    handler, propagate = _Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _resolve(store_cls: Any, directory: Path, name: str) -> str:
    from ..storage import StorageError, safe_log_name

    names = store_cls.list_logs(directory)
    for candidate in (name, safe_log_name(name), name.removesuffix(".data")):
        if candidate in names:
            return candidate
    raise StorageError(f"no log {name!r} under {directory}; logs there: {', '.join(names) or '(none)'}")


def _iso(us: int) -> str:
    try:
        return datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat(timespec="microseconds")
    except (OverflowError, OSError, ValueError):
        return "-"


def _parse_time(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"derecho log: --time wants microseconds since the epoch or ISO 8601, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1_000_000)


def _table(rows: list[tuple[Any, ...]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _summary(log: Any) -> dict[str, Any]:
    n = len(log)
    first = log.get_by_index(log.earliest_index) if n else None
    last = log.get_by_index(-1) if n else None
    return {
        "entries": n,
        "earliest_index": log.earliest_index,
        "earliest_version": first.version if first else None,
        "latest_version": last.version if last else log.latest_version,
        "earliest_time_us": first.timestamp.rtc_us if first else None,
        "latest_time_us": last.timestamp.rtc_us if last else None,
        "data_bytes": getattr(log, "data_bytes", None),
    }


def _list(store_cls: Any, directory: Path, args: argparse.Namespace) -> int:
    from ..storage import StorageError

    out: list[dict[str, Any]] = []
    for base in store_cls.list_logs(directory):
        with _captured_warnings() as warned:
            try:
                log = store_cls.open_readonly(directory, base)
            except StorageError as exc:
                out.append({"name": base, "error": str(exc)})
                continue
        try:
            out.append({"name": base, **_summary(log), "warnings": warned})
        finally:
            log.close()
    saved = saved_state(directory)
    if args.json:
        print(json.dumps({"path": str(directory), "logs": out, "saved": saved}, indent=2))
        return 0
    if saved is not None:
        print(f"saved view {saved['vid']} of group {saved['group']}: members {saved['members']} "
              "(derecho log saved shows it)")
    if not out:
        print(f"no logs under {directory}")
        return 0
    rows: list[tuple[Any, ...]] = [("LOG", "ENTRIES", "VERSIONS", "FIRST TIME", "LAST TIME", "BYTES")]
    for r in out:
        if "error" in r:
            rows.append((r["name"], "ERROR", r["error"], "", "", ""))
            continue
        versions = f"{r['earliest_version']}..{r['latest_version']}" if r["entries"] else f"(empty, last {r['latest_version']})"
        rows.append((r["name"], r["entries"], versions,
                     _iso(r["earliest_time_us"]) if r["entries"] else "-",
                     _iso(r["latest_time_us"]) if r["entries"] else "-", r["data_bytes"]))
    _table(rows)
    return 0


def _value_text(data: bytes, allow_pickle: bool) -> tuple[str, Any]:
    from ..persistent import UndecodableValue, decode_value

    try:
        value = decode_value(data, allow_pickle=allow_pickle)
    except UndecodableValue as exc:
        shown = data[:256].hex(" ")
        more = f" ... ({len(data)} bytes)" if len(data) > 256 else ""
        return f"(not decoded: {exc})\nhex: {shown}{more}", None
    return repr(value), value


def _show(store_cls: Any, directory: Path, args: argparse.Namespace) -> int:
    for p in args.import_path:
        sys.path.insert(0, p)
    base = _resolve(store_cls, directory, args.name)
    with _captured_warnings() as warned:
        log = store_cls.open_readonly(directory, base)
    for w in warned:
        print(f"warning: {w}", file=sys.stderr)
    try:
        if args.version is None and args.time is None and args.index is None:
            entries = list(log)
            if args.limit:
                entries = entries[-args.limit:]
            if args.json:
                print(json.dumps({"name": base, **_summary(log), "entries": [
                    {"index": e.index, "version": e.version, "vid": e.version >> 32, "seq": e.version & 0xFFFFFFFF,
                     "time_us": e.timestamp.rtc_us, "logic": e.timestamp.logic, "bytes": len(e.data)}
                    for e in entries]}, indent=2))
                return 0
            rows: list[tuple[Any, ...]] = [("INDEX", "VERSION", "VID:SEQ", "TIME (UTC)", "HLC", "BYTES")]
            for e in entries:
                rows.append((e.index, e.version, f"{e.version >> 32}:{e.version & 0xFFFFFFFF}",
                             _iso(e.timestamp.rtc_us), str(e.timestamp), len(e.data)))
            if len(rows) == 1:
                print(f"{base}: no entries (latest version {log.latest_version})")
            else:
                _table(rows)
            return 0
        if args.version is not None:
            entry = log.get_by_version(args.version)
        elif args.time is not None:
            entry = log.get_by_time(_parse_time(args.time))
        else:
            entry = log.get_by_index(args.index)
        text, value = _value_text(entry.data, args.pickle)
        if args.json:
            print(json.dumps({"name": base, "index": entry.index, "version": entry.version,
                              "time_us": entry.timestamp.rtc_us, "logic": entry.timestamp.logic,
                              "value": text if value is None else _jsonable(value),
                              "decoded": value is not None}, indent=2, default=repr))
            return 0
        print(f"{base} index {entry.index} version {entry.version} time {_iso(entry.timestamp.rtc_us)} "
              f"(HLC {entry.timestamp}), {len(entry.data)} bytes")
        print(text)
        return 0
    finally:
        log.close()


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _verify(store_cls: Any, directory: Path, args: argparse.Namespace) -> int:
    from ..storage import LogCorruptionError, StorageError

    bases = [_resolve(store_cls, directory, n) for n in args.names] or store_cls.list_logs(directory)
    results: list[dict[str, Any]] = []
    bad = 0
    for base in bases:
        with _captured_warnings() as warned:
            try:
                log = store_cls.open_readonly(directory, base)
            except StorageError as exc:
                bad += 1
                results.append({"name": base, "status": "corrupt", "error": str(exc),
                                "offset": getattr(exc, "offset", None)})
                continue
        try:
            checked = 0
            try:
                for _ in log:  # every entry read back and checked again
                    checked += 1
            except LogCorruptionError as exc:
                bad += 1
                results.append({"name": base, "status": "corrupt", "error": str(exc), "offset": exc.offset})
                continue
            status = "torn-tail" if log.recovery["cut_bytes"] else "ok"
            results.append({"name": base, "status": status, "entries": checked,
                            "latest_version": log.latest_version, "torn_bytes": log.recovery["cut_bytes"],
                            "warnings": warned})
        finally:
            log.close()
    objects = sorted(p.name for p in directory.glob("*.nolog")) if directory.is_dir() else []
    for name in objects:
        from ..storage import load_object

        try:
            load_object(directory, name[: -len(".nolog")])
            results.append({"name": name, "status": "ok"})
        except StorageError as exc:
            bad += 1
            results.append({"name": name, "status": "corrupt", "error": str(exc)})
    if args.json:
        print(json.dumps({"path": str(directory), "results": results, "corrupt": bad}, indent=2))
    else:
        if not results:
            print(f"no logs under {directory}")
        for r in results:
            if r["status"] == "ok":
                extra = f": {r['entries']} entries, checksums good" if "entries" in r else ""
                print(f"OK       {r['name']}{extra}")
            elif r["status"] == "torn-tail":
                print(f"TORN     {r['name']}: {r['entries']} good entries, then {r['torn_bytes']} bytes of a torn "
                      "write (cut with a warning when the log is next opened)")
            else:
                print(f"CORRUPT  {r['name']}: {r['error']}")
    return 1 if bad else 0


SAVED_STATE = "derecho-group"  # Group.SAVED_STATE


def saved_state(directory: Path) -> dict[str, Any] | None:
    """The saved group identity and view under ``directory`` (None if there is none)."""
    import msgpack

    from ..storage import load_object
    from ..view import View

    blob = load_object(directory, SAVED_STATE)
    if blob is None:
        return None
    try:
        saved = msgpack.unpackb(blob)
        view = View.from_bytes(saved["view"])
    except Exception as exc:
        return {"group": "?", "vid": -1, "members": [], "error": f"unreadable saved view: {exc!r}"}
    shards = [[{"members": list(sv.members), "mode": sv.mode.name} for sv in shard_list]
              for shard_list in view.subgroup_shard_views]
    return {"group": str(saved["group"]), "vid": view.vid, "members": list(view.members), "subgroups": shards}


def _saved(directory: Path, args: argparse.Namespace) -> int:
    saved = saved_state(directory)
    if args.json:
        print(json.dumps({"path": str(directory), "saved": saved}, indent=2))
        return 0
    if saved is None:
        print(f"no saved view under {directory}: a node starting here starts or joins a group afresh")
        return 0
    if "error" in saved:
        print(f"{directory}: {saved['error']}")
        return 1
    print(f"group {saved['group']}, saved view {saved['vid']}, members {saved['members']}")
    for sg, shards in enumerate(saved["subgroups"]):
        for n, shard in enumerate(shards):
            print(f"  subgroup {sg} shard {n}: {shard['mode']} {shard['members']}")
    print("A node starting with this directory rejoins its group, or leads or joins a total restart of it "
          "(PERS/reset = true discards it).")
    return 0
