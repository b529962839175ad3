"""``derecho bench persistence``: append throughput of the file log store, and time queries on 1,000,000 entries.

For entries of 64 B, 1 KB, 64 KB and 1 MB, with ``persist`` every 1, 16 and
256 appends, in the same run and on the same disk:

* **file**: the ``file`` store (checksummed entries, data fsync'd before the
  index record is written);
* **plain**: the same payload bytes written by plain Python to one file
  (``write``, then ``flush`` + ``fdatasync`` at the same cadence): the limit;
* **sqlite**: sqlite3 in WAL mode with ``synchronous=FULL`` (as durable as
  ``persist``), one transaction per sync: what a user would pick instead.

Figures are appends per second and MB/s of payload (10^6 bytes): total
appends over total time of ``--runs`` short slices per system, interleaved
in rotating order, with ratios to both baselines.
Then ``get_by_time`` latency on a log of ``--time-entries`` entries (median
and p99 of single random queries), with sqlite's indexed ``ts <= ?`` query
on the same data as the baseline, and the time to reopen (and verify) that log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

SIZES = (64, 1024, 64 * 1024, 1024 * 1024)
CADENCES = (1, 16, 256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="directory on the disk to measure (default: a temporary one under ./)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="entry sizes in bytes (comma list)")
    parser.add_argument("--cadences", default=",".join(map(str, CADENCES)),
                        help="appends per persist / sync / commit (comma list)")
    parser.add_argument("--seconds", type=float, default=0.08, help="length of one slice of measurement")
    parser.add_argument("--runs", type=int, default=12,
                        help="slices per system and cell, interleaved across the systems in rotating order; "
                             "a rate is total appends / total time (a shared disk's fsync latency comes and "
                             "goes: interleaving exposes every system to the same weather)")
    parser.add_argument("--max-mb", type=float, default=256, help="stop a measurement after this many MB")
    parser.add_argument("--time-entries", type=int, default=1_000_000,
                        help="entries of the log for get_by_time (0: skip)")
    parser.add_argument("--queries", type=int, default=20_000, help="get_by_time queries to time")
    parser.add_argument("--strict-index", action="store_true",
                        help="also measure the file store syncing its index on every persist")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (tiny sizes, few entries)")
    parser.add_argument("--json", dest="json_out", help="also write the JSON record to this file")


# ----------------------------------------------------------------------------- writers


def _file_store(directory: Path, strict: bool) -> Callable[[bytes, int, float, int], tuple[int, float]]:
    from derecho_core.plugins import storage

    store_cls = storage("file").__self__  # the class behind the registered factory

    def run(payload: bytes, cadence: int, seconds: float, max_bytes: int) -> tuple[int, float]:
        log = store_cls(directory, "bench", reset=True, index_sync_interval=0.0 if strict else 1.0)
        n, v = 0, 0
        us = time.time_ns() // 1000
        limit = max(1, max_bytes // max(1, len(payload)))
        append, persist = log.append, log.persist
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(cadence):
                v += 1
                append(v, us + v, payload)
            persist()
            n += cadence
            if n >= limit or time.perf_counter() >= deadline:
                break
        dt = time.perf_counter() - t0
        log.close()
        return n, dt

    return run


def _plain(directory: Path) -> Callable[[bytes, int, float, int], tuple[int, float]]:
    def run(payload: bytes, cadence: int, seconds: float, max_bytes: int) -> tuple[int, float]:
        path = directory / "plain.bin"
        n = 0
        limit = max(1, max_bytes // max(1, len(payload)))
        with open(path, "wb") as f:
            fd = f.fileno()
            write, flush, sync = f.write, f.flush, os.fdatasync
            t0 = time.perf_counter()
            deadline = t0 + seconds
            while True:
                for _ in range(cadence):
                    write(payload)
                flush()
                sync(fd)
                n += cadence
                if n >= limit or time.perf_counter() >= deadline:
                    break
            dt = time.perf_counter() - t0
        path.unlink()
        return n, dt

    return run


def _sqlite(directory: Path) -> Callable[[bytes, int, float, int], tuple[int, float]]:
    def run(payload: bytes, cadence: int, seconds: float, max_bytes: int) -> tuple[int, float]:
        path = directory / "bench.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: the durability of persist()
        db.execute("CREATE TABLE log (version INTEGER PRIMARY KEY, ts INTEGER NOT NULL, data BLOB NOT NULL)")
        insert = "INSERT INTO log VALUES (?, ?, ?)"
        ex = db.execute
        n, v = 0, 0
        us = time.time_ns() // 1000
        limit = max(1, max_bytes // max(1, len(payload)))
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            ex("BEGIN")
            for _ in range(cadence):
                v += 1
                ex(insert, (v, us + v, payload))
            ex("COMMIT")
            n += cadence
            if n >= limit or time.perf_counter() >= deadline:
                break
        dt = time.perf_counter() - t0
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return n, dt

    return run


# ----------------------------------------------------------------------------- time queries


def _time_queries(directory: Path, entries: int, queries: int) -> dict[str, Any]:
    from derecho_core.plugins import storage
    from derecho_core.storage import HLC

    store_cls = storage("file").__self__
    rng = random.Random(1)
    payload = bytes(64)
    us0 = 1_700_000_000_000_000
    stamps = []
    t = us0
    for _ in range(entries):
        t += rng.randint(1, 3)
        stamps.append(t)
    log = store_cls(directory, "bench-time", reset=True)
    t0 = time.perf_counter()
    for v, ts in enumerate(stamps, 1):
        log.append(v, HLC(ts, 0), payload)
        if v % 256 == 0:
            log.persist()
    log.persist()
    build_s = time.perf_counter() - t0
    probes = [rng.randint(stamps[0], stamps[-1]) for _ in range(queries)]

    def timed(fn: Callable[[int], Any]) -> list[float]:
        out = []
        clock = time.perf_counter_ns
        for q in probes:
            a = clock()
            fn(q)
            out.append((clock() - a) / 1000)
        return out

    get_by_time = log.get_by_time
    lat = timed(lambda q: get_by_time(HLC(q, 0)))
    # correctness spot check while we are here
    q = probes[0]
    assert log.get_by_time(q).timestamp.rtc_us <= q
    log.close()
    t0 = time.perf_counter()
    log = store_cls(directory, "bench-time")
    reopen_s = time.perf_counter() - t0
    log.close()
    store_cls(directory, "bench-time", reset=True).close()

    # sqlite baseline: the same rows, an index on ts, "latest at or before"
    path = directory / "time.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE log (version INTEGER PRIMARY KEY, ts INTEGER NOT NULL, data BLOB NOT NULL)")
    db.execute("CREATE INDEX log_ts ON log(ts)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO log VALUES (?, ?, ?)", ((v, ts, payload) for v, ts in enumerate(stamps, 1)))
    db.execute("COMMIT")
    sql = "SELECT version, ts, data FROM log WHERE ts <= ? ORDER BY ts DESC, version DESC LIMIT 1"
    ex = db.execute
    lat_sql = timed(lambda q: ex(sql, (q,)).fetchone())
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "entries": entries, "queries": queries, "build_s": round(build_s, 2), "reopen_s": round(reopen_s, 2),
        "file_median_us": round(statistics.median(lat), 2), "file_p99_us": round(pct(lat, 0.99), 2),
        "sqlite_median_us": round(statistics.median(lat_sql), 2), "sqlite_p99_us": round(pct(lat_sql, 0.99), 2),
    }


# ----------------------------------------------------------------------------- driver


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    cadences = [int(c) for c in args.cadences.split(",") if c]
    seconds, runs, time_entries = args.seconds, args.runs, args.time_entries
    if args.quick:
        sizes, cadences, seconds, runs = [64, 65536], [16], 0.05, 1
        time_entries = min(time_entries, 20_000)
    own_dir = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix=".derecho-bench-", dir=".")) if own_dir else Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    max_bytes = int(args.max_mb * 1e6)
    systems: dict[str, Callable[[bytes, int, float, int], tuple[int, float]]] = {
        "file": _file_store(directory, strict=False),
        "plain": _plain(directory),
        "sqlite": _sqlite(directory),
    }
    if args.strict_index:
        systems["file_strict_index"] = _file_store(directory, strict=True)
    results: list[dict[str, Any]] = []
    try:
        for size in sizes:
            payload = os.urandom(size)
            for cadence in cadences:
                totals: dict[str, list[float]] = {k: [0, 0.0] for k in systems}
                slices: dict[str, list[float]] = {k: [] for k in systems}
                names = list(systems)
                for rnd in range(runs):
                    # interleaved slices in rotating order, so the machine's ups and downs hit all alike
                    for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                        n, dt = systems[name](payload, cadence, seconds, max_bytes)
                        totals[name][0] += n
                        totals[name][1] += dt
                        slices[name].append(round(n / dt, 1))
                row: dict[str, Any] = {"size": size, "persist_every": cadence}
                for name, (count, secs) in totals.items():
                    rate = count / secs
                    row[name] = {"appends_per_s": round(rate, 1), "mb_per_s": round(rate * size / 1e6, 3),
                                 "slice_rates": slices[name]}
                row["file_vs_plain"] = round(row["file"]["appends_per_s"] / row["plain"]["appends_per_s"], 3)
                row["file_vs_sqlite"] = round(row["file"]["appends_per_s"] / row["sqlite"]["appends_per_s"], 3)
                results.append(row)
                print(f"  measured size={size} persist_every={cadence}", file=sys.stderr, flush=True)
        timing = _time_queries(directory, time_entries, args.queries) if time_entries else None
    finally:
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)

    # ---- table
    head = ["size", "persist/N", "file app/s", "file MB/s", "plain app/s", "plain MB/s", "sqlite app/s",
            "sqlite MB/s", "file/plain", "file/sqlite"]
    if args.strict_index:
        head += ["strict app/s", "strict/plain"]
    rows: list[list[str]] = [head]
    for r in results:
        cells = [_size(r["size"]), str(r["persist_every"]),
                 _fmt_rate(r["file"]["appends_per_s"]), f"{r['file']['mb_per_s']:.1f}",
                 _fmt_rate(r["plain"]["appends_per_s"]), f"{r['plain']['mb_per_s']:.1f}",
                 _fmt_rate(r["sqlite"]["appends_per_s"]), f"{r['sqlite']['mb_per_s']:.1f}",
                 f"{r['file_vs_plain']:.2f}", f"{r['file_vs_sqlite']:.2f}"]
        if args.strict_index:
            strict = r["file_strict_index"]["appends_per_s"]
            cells += [_fmt_rate(strict), f"{strict / r['plain']['appends_per_s']:.2f}"]
        rows.append(cells)
    widths = [max(len(line[i]) for line in rows) for i in range(len(head))]
    print(f"persistence: appends (payload MB/s = 10^6 B/s), {runs} interleaved slices of {seconds} s per system, "
          f"directory {directory}")
    for line in rows:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    if timing:
        print(f"get_by_time on {timing['entries']:,} entries: median {timing['file_median_us']} us, "
              f"p99 {timing['file_p99_us']} us (sqlite indexed query: median {timing['sqlite_median_us']} us, "
              f"p99 {timing['sqlite_p99_us']} us); built in {timing['build_s']} s, reopened and verified in "
              f"{timing['reopen_s']} s")

    # ---- the targets, stated against this run
    checks = []
    for r in results:
        if r["persist_every"] == 16 and r["size"] >= 65536:
            mb = r["file"]["mb_per_s"] / r["plain"]["mb_per_s"]
            checks.append((f"{_size(r['size'])} every 16: file >= 80% of plain MB/s", mb >= 0.8, f"{mb:.0%}"))
        if r["persist_every"] == 16 and r["size"] == 64:
            checks.append(("64 B every 16: file >= 2x sqlite appends/s", r["file_vs_sqlite"] >= 2,
                           f"{r['file_vs_sqlite']:.2f}x (plain file itself: "
                           f"{r['plain']['appends_per_s'] / r['sqlite']['appends_per_s']:.2f}x)"))
    if timing and timing["entries"] >= 1_000_000:
        checks.append(("get_by_time median < 50 us on 1M entries", timing["file_median_us"] < 50,
                       f"{timing['file_median_us']} us"))
    for what, ok, got in checks:
        print(f"target {'met    ' if ok else 'NOT met'}  {what}: {got}")
    record = {"benchmark": "persistence", "seconds": seconds, "runs": runs, "results": results,
              "get_by_time": timing, "targets": [{"target": w, "met": ok, "measured": g} for w, ok, g in checks]}
    print("JSON " + json.dumps(record))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/persistence.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
