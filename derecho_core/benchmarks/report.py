"""``derecho bench report``: run the benchmark set, write one Markdown page with tables and plots.

Every measurement is a ``derecho bench NAME`` subprocess (its own interpreter,
a timeout each, its JSON record collected with ``--json``), and each figure is
shown next to the baseline that benchmark measured in the same run:

* ``transport``: ping-pong latency and streaming bandwidth per transport
  (sockets, libfabric tcp), against plain Python sockets and ``fi_pingpong``;
* ``persistence``: appends/s and MB/s per entry size and persist cadence of
  the file log store, against an fsync'd plain file and sqlite; get_by_time;
* ``bandwidth``: a sweep over message sizes per transport (3 nodes, all send),
  and for large messages (RDMC) per ``rdmc_send_algorithm`` (4 nodes, one
  sender), each point against plain sockets carrying the same bytes;
* ``latency``: every message's latency (a CDF) per transport, against a
  plain socket round trip of the same payload;
* ``viewchange``: crash to new view, and join, against TCP EOF and Python
  start-up;
* ``rpc``: ordered_send calls/s and p50, against PySyncObj.

The page is ``DIR/index.md`` (default ``bench-report/``) with the machine
(CPU, cores, RAM, Python, date, git commit); the PNG plots are next to it
(matplotlib: ``pip install -e '.[bench]'``), with ``results.json`` (every
record) and ``log.txt`` (every benchmark's output). ``--quick`` uses tiny
counts, a smoke run of a minute or two whose figures are not worth quoting;
the full run takes 10-15 minutes. ``--runs N`` repeats the transport,
bandwidth, latency and rpc measurements N times (medians); persistence and
viewchange keep their own sample counts. ``derecho bench all`` leaves this
command out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: ``derecho bench all`` skips this module (commands/bench.py): the report runs the other benchmarks itself
IN_ALL = False

PARTS = ("transport", "persistence", "bandwidth", "latency", "viewchange", "rpc")
PLOTS = ("bandwidth_transports.png", "bandwidth_rdmc.png", "latency_cdf.png", "persistence.png", "rpc.png")
TRANSPORT_LABELS = {"sockets": "sockets", "tcp": "libfabric tcp"}
MB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """Counts of one kind of run (full or --quick)."""

    runs: int  # repetitions of transport, bandwidth, latency, rpc (medians)
    transport: tuple[str, ...]
    persistence: tuple[str, ...]
    bw_nodes: int
    bw_sizes: tuple[int, ...]
    bw_volume: int  # bytes each sender multicasts per size (count = volume / size, clamped)
    bw_counts: tuple[int, int]
    rdmc_nodes: int
    rdmc_sizes: tuple[int, ...]
    rdmc_volume: int
    rdmc_counts: tuple[int, int]
    latency_nodes: int
    latency_messages: int
    viewchange: tuple[str, ...]
    rpc: tuple[str, ...]
    timeout: float  # seconds one benchmark subprocess may take (persistence, viewchange, rpc, transport: x3)


FULL = Profile(
    runs=3, transport=(), persistence=(),
    bw_nodes=3, bw_sizes=(100, 1024, 10240, 102400, MB, 4 * MB), bw_volume=64_000_000, bw_counts=(32, 5000),
    rdmc_nodes=4, rdmc_sizes=(256 * 1024, MB, 4 * MB, 16 * MB), rdmc_volume=256_000_000, rdmc_counts=(16, 1000),
    latency_nodes=3, latency_messages=1000, viewchange=("--nodes", "5", "--runs", "20"), rpc=(), timeout=240.0)
QUICK = Profile(
    runs=1, transport=("--quick",), persistence=("--quick",),
    bw_nodes=3, bw_sizes=(1024, 102400), bw_volume=2_000_000, bw_counts=(8, 300),
    rdmc_nodes=3, rdmc_sizes=(256 * 1024, 2 * MB), rdmc_volume=4_000_000, rdmc_counts=(4, 16),
    latency_nodes=3, latency_messages=100, viewchange=("--nodes", "3", "--runs", "2"), rpc=("--quick",),
    timeout=120.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench-report", metavar="DIR",
                        help="where to write index.md, the plots, results.json and log.txt (default bench-report/)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts: a smoke run of a minute or two, not figures to quote")
    parser.add_argument("--runs", type=int, default=None, metavar="N",
                        help="repetitions of the transport, bandwidth, latency and rpc measurements (medians; "
                             "default 3, 1 with --quick)")
    parser.add_argument("--only", default="", metavar="A,B",
                        help="comma list of the parts to run: " + ", ".join(PARTS) + " (default: all)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds one benchmark subprocess may take before it is stopped and reported "
                             "(default 240, 120 with --quick; three times that for transport, persistence, "
                             "viewchange and rpc)")
    parser.add_argument("--from-results", metavar="FILE",
                        help="measure nothing: write the page and plots again from an earlier report's "
                             "results.json (e.g. after changing the plots)")


# ----------------------------------------------------------------------------- the plan


@dataclass
class Step:
    part: str
    key: str  # file stem of its JSON record, unique
    label: str
    bench: str
    argv: list[str]
    timeout: float
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    problem: str | None = None
    seconds: float = 0.0


def _count(size: int, volume: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], volume // size))


def _size(n: int) -> str:
    for unit, scale in (("MB", MB), ("KB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def plan(profile: Profile, parts: list[str], runs: int, timeout: float, transports: list[str]) -> list[Step]:
    steps: list[Step] = []
    r = ["--runs", str(runs)]
    if "transport" in parts:
        steps.append(Step("transport", "transport", "transport ping-pong and streaming", "transport",
                          [*profile.transport, *r, "--providers", ",".join(transports)], 3 * timeout))
    if "persistence" in parts:
        steps.append(Step("persistence", "persistence", "persistence appends and get_by_time", "persistence",
                          list(profile.persistence), 3 * timeout))
    if "bandwidth" in parts:
        for t in transports:
            for size in profile.bw_sizes:
                count = _count(size, profile.bw_volume, profile.bw_counts)
                steps.append(Step("bandwidth", f"bandwidth-{t}-{size}", f"bandwidth {t} {_size(size)}", "bandwidth",
                                  [str(profile.bw_nodes), "0", str(count), "0", "--size", str(size),
                                   "--provider", t, *r], timeout, {"transport": t, "size": size}))
        from ..conf import RDMC_SEND_ALGORITHMS

        for algorithm in RDMC_SEND_ALGORITHMS:
            for size in profile.rdmc_sizes:
                count = _count(size, profile.rdmc_volume, profile.rdmc_counts)
                steps.append(Step("bandwidth", f"rdmc-{algorithm}-{size}", f"bandwidth {algorithm} {_size(size)}",
                                  "bandwidth",
                                  [str(profile.rdmc_nodes), "2", str(count), "0", "--size", str(size),
                                   "--set", f"SUBGROUP/DEFAULT/rdmc_send_algorithm={algorithm}", *r],
                                  timeout, {"algorithm": algorithm, "size": size}))
    if "latency" in parts:
        for t in transports:
            steps.append(Step("latency", f"latency-{t}", f"latency {t}", "latency",
                              [str(profile.latency_nodes), "0", str(profile.latency_messages), "0", "--provider", t,
                               "--samples", *r], timeout, {"transport": t}))
    if "viewchange" in parts:
        steps.append(Step("viewchange", "viewchange", "view changes", "viewchange", list(profile.viewchange),
                          3 * timeout))
    if "rpc" in parts:
        steps.append(Step("rpc", "rpc", "rpc against PySyncObj", "rpc", [*profile.rpc, *r], 3 * timeout))
    return steps


# ----------------------------------------------------------------------------- running


def _run_step(step: Step, work: Path, log: Any) -> None:
    """Run one benchmark as a subprocess in ``work``; its record (or the problem) lands on ``step``."""
    json_name = f"{step.key}.json"
    (work / json_name).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "derecho_core", "bench", step.bench, *step.argv, "--json", json_name]
    log.write(f"\n===== {step.label}: derecho bench {step.bench} {' '.join(step.argv)}\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    out_path = work / f"{step.key}.out"
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        # a session of its own: a timeout stops the benchmark and every worker it started
        proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(step.timeout)
        except BaseException as exc:  # the timeout, or Ctrl-C: nothing of the benchmark may outlive the report
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            code = None
    step.seconds = time.monotonic() - t0
    text = out_path.read_text(errors="replace")
    for line in text.splitlines():  # the JSON records are in results.json: keep the log readable
        log.write((line if len(line) <= 1000 else f"[{len(line)} characters: a JSON record, see results.json]")
                  + "\n")
    log.write(f"----- {step.label}: {'timed out' if code is None else f'exit {code}'} after {step.seconds:.1f} s\n")
    log.flush()
    try:
        step.record = json.loads((work / json_name).read_text())
    except (OSError, ValueError):
        step.record = None
    if code is None:
        step.problem = f"stopped after its {step.timeout:.0f} s timeout"
    elif step.record is None:
        tail = " / ".join(x.strip() for x in text.strip().splitlines()[-3:])[-400:]
        step.problem = f"exit {code} without a JSON record: {tail}"
    elif code != 0:
        step.problem = f"exit {code} (incomplete or failed measurements; see log.txt)"


# ----------------------------------------------------------------------------- the machine


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def machine() -> dict[str, Any]:
    import derecho_core

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    src = Path(derecho_core.__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], src)
    dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], src)) if commit else None
    try:
        from .. import plugins

        dists = sorted({f"{p.distribution} {p.version}" for p in plugins.plugins() if p.distribution})
    except Exception:  # noqa: BLE001 - the machine description must not fail the report
        dists = []
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_bytes": ram,
        "python": f"{platform.python_implementation()} {platform.python_version()}", "os": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "derecho_core": derecho_core.__version__, "plugins": dists,
        "git_commit": commit, "git_dirty": dirty, "loadavg_start": _loadavg(),
        "fi_pingpong": shutil.which("fi_pingpong") is not None,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- numbers and tables


def _f(x: Any, spec: str = ".1f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{format(x, spec)}{unit}"


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _x(r: float | None) -> str:
    return "n/a" if r is None else (f"{r:.2f}×" if r < 10 else f"{r:.0f}×")


def _table(head: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ----------------------------------------------------------------------------- sections


class Report:
    def __init__(self, steps: list[Step], out: Path, quick: bool, runs: int, parts: list[str],
                 transports: list[str]) -> None:
        self.steps, self.out, self.quick, self.runs, self.parts = steps, out, quick, runs, parts
        self.transports = transports
        self.plots: dict[str, str] = {}  # file -> problem ("" when written)
        self.headlines: list[list[str]] = []

    def of(self, part: str) -> list[Step]:
        return [s for s in self.steps if s.part == part]

    def headline(self, what: str, value: Any, unit: str, spec: str, baseline: str, base: Any,
                 better: str) -> None:
        self.headlines.append([what, _f(value, spec, unit), baseline, _f(base, spec, unit),
                               _x(_ratio(value, base)), better])

    def _plot(self, name: str, draw: Any) -> list[str]:
        """Draw ``name`` with ``draw(plt) -> Figure``; the Markdown that shows it (or says why not)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.plots[name] = "matplotlib is not installed (pip install -e '.[bench]')"
            return [f"*(plot {name} skipped: {self.plots[name]})*", ""]
        try:
            fig = draw(plt)
            fig.tight_layout()
            fig.savefig(self.out / name, dpi=110)
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
            plt.close("all")
            self.plots[name] = f"{type(exc).__name__}: {exc}"
            return [f"*(plot {name} failed: {self.plots[name]})*", ""]
        self.plots[name] = ""
        return [f"![{name[:-4].replace('_', ' ')}]({name})", ""]

    def _not_measured(self, part: str) -> list[str] | None:
        if part not in self.parts:
            return [f"*Not run (`--only` left out {part}).*", ""]
        steps = self.of(part)
        if not steps:
            return ["*Nothing to measure.*", ""]
        if all(s.record is None for s in steps):
            return [f"*No result: {steps[0].problem or 'no record'} (see [log.txt](log.txt)).*", ""]
        return None

    # ---- transport
    def transport(self) -> list[str]:
        lines = ["## Transports: ping-pong and streaming", ""]
        missing = self._not_measured("transport")
        if missing:
            return lines + missing
        rec = self.of("transport")[0].record or {}
        res = rec.get("results", {})
        base = res.get("plain-python-sockets", {})
        streams = [s["size"] for s in rec.get("streams", [])]
        lines += [f"Two processes on 127.0.0.1: 64-byte ping-pong ({rec.get('iters')} round trips; one-way latency "
                  "= round trip / 2) and back-to-back streams of "
                  + ", ".join(f"{s['count']} × {_size(s['size'])}" for s in rec.get("streams", []))
                  + f"; medians of {rec.get('runs')} interleaved runs. Baseline: plain blocking Python sockets "
                  "(same framing, TCP_NODELAY), and libfabric's own `fi_pingpong -p tcp` (a mean; its bandwidth "
                  "is a ping-pong, not a stream). Ratios are to plain sockets: below 1 is faster for latency, "
                  "above 1 is faster for bandwidth.", ""]
        head = ["transport", "p50 µs", "p99 µs", "p50 × plain"]
        for s in streams:
            head += [f"{_size(s)} GB/s", "× plain"]
        rows = []
        for name, m in res.items():
            if name == "fi_pingpong-tcp":
                continue
            label = "plain Python sockets (baseline)" if name == "plain-python-sockets" else \
                f"derecho-py {TRANSPORT_LABELS.get(name, name)}"
            row = [label, _f(m.get("p50_us")), _f(m.get("p99_us")), _x(_ratio(m.get("p50_us"), base.get("p50_us")))]
            for s in streams:
                k = f"stream_{s // MB}MiB_GBps"
                row += [_f(m.get(k), ".2f"), _x(_ratio(m.get(k), base.get(k)))]
            rows.append(row)
        fi = res.get("fi_pingpong-tcp")
        if fi:
            row = ["fi_pingpong -p tcp (libfabric limit)", _f(fi.get("p50_us")) + " (mean)", "",
                   _x(_ratio(fi.get("p50_us"), base.get("p50_us")))]
            row += ["", ""] * len(streams)
            if streams and fi.get("pingpong_1MiB_GBps") is not None:
                row[4] = _f(fi["pingpong_1MiB_GBps"], ".2f") + " (ping-pong)"
            rows.append(row)
        lines += _table(head, rows)
        for p, e in rec.get("errors", {}).items():
            lines += [f"*{p}: not measured: {e}*", ""]
        for name in self.transports:
            m = res.get(name)
            if m:
                label = TRANSPORT_LABELS.get(name, name)
                self.headline(f"transport {label}: 64 B one-way latency p50", m.get("p50_us"), " µs", ".1f",
                              "plain Python sockets", base.get("p50_us"), "lower")
                if streams:
                    k = f"stream_{streams[-1] // MB}MiB_GBps"
                    self.headline(f"transport {label}: {_size(streams[-1])} stream", m.get(k), " GB/s", ".2f",
                                  "plain Python sockets", base.get(k), "higher")
        return lines

    # ---- bandwidth
    def bandwidth(self) -> list[str]:
        lines = ["## Multicast bandwidth", ""]
        missing = self._not_measured("bandwidth")
        if missing:
            return lines + missing
        steps = self.of("bandwidth")
        by_t = [s for s in steps if "transport" in s.meta]
        by_a = [s for s in steps if "algorithm" in s.meta]
        nodes = next((s.record.get("num_nodes") for s in by_t if s.record), "?")
        lines += [f"`derecho bench bandwidth`: {nodes} member processes in one subgroup (one shard), every member "
                  "sends, ORDERED delivery; GB/s (10^9 B/s) delivered per node, until every message arrived "
                  "everywhere. Messages up to `max_smc_payload_size` (10 KB) travel by SMC, larger ones by RDMC. "
                  "Baseline in the same run: plain Python sockets, each sender writing the same bytes to each "
                  "other process (one process per node).", ""]
        lines += self._plot("bandwidth_transports.png", lambda plt: self._bw_figure(plt, by_t, "transport"))
        lines += self._bw_table(by_t, "transport", "transport")
        big = next((s.meta["size"] for s in sorted(by_t, key=lambda s: -s.meta["size"]) if s.record
                    and s.meta["size"] <= MB), None)
        for t in self.transports:
            rec = self._bw_point(by_t, "transport", t, big) if big else None
            if rec:
                self.headline(f"multicast {TRANSPORT_LABELS.get(t, t)}, {nodes} nodes all sending, {_size(big)}",
                              rec.get("avg_bw_GBps"), " GB/s", ".3f", "plain Python sockets",
                              rec.get("baseline_socket_GBps"), "higher")
        if by_a:
            nodes_a = next((s.record.get("num_nodes") for s in by_a if s.record), "?")
            lines += ["### Large messages per RDMC algorithm", "",
                      f"{nodes_a} member processes over sockets, one sender (sender_selector 2), ORDERED; "
                      "`SUBGROUP/DEFAULT/rdmc_send_algorithm` set per row, default block size (1 MB). Baseline: "
                      "the sender writing the same bytes to each other process over plain sockets.", ""]
            lines += self._plot("bandwidth_rdmc.png", lambda plt: self._bw_figure(plt, by_a, "algorithm"))
            lines += self._bw_table(by_a, "algorithm", "rdmc_send_algorithm")
            largest = max((s.meta["size"] for s in by_a if s.record), default=None)
            rec = self._bw_point(by_a, "algorithm", "binomial_send", largest) if largest else None
            if rec:
                self.headline(f"multicast {_size(largest)} from one sender to {nodes_a - 1 if isinstance(nodes_a, int) else '?'}"
                              ", RDMC binomial_send (the default)", rec.get("avg_bw_GBps"), " GB/s", ".3f",
                              "plain Python sockets", rec.get("baseline_socket_GBps"), "higher")
        return lines

    @staticmethod
    def _bw_point(steps: list[Step], key: str, value: str, size: int) -> dict[str, Any] | None:
        for s in steps:
            if s.meta[key] == value and s.meta["size"] == size and s.record and s.record.get("results"):
                return s.record["results"][0]  # type: ignore[no-any-return]
        return None

    def _bw_table(self, steps: list[Step], key: str, title: str) -> list[str]:
        rows = []
        for s in steps:
            res = (s.record or {}).get("results") or [{}]
            r = res[0]
            if s.record is None:
                rows.append([TRANSPORT_LABELS.get(s.meta[key], s.meta[key]), _size(s.meta["size"]), s.argv[2],
                             f"not measured: {_short(s.problem)}", "", "", ""])
                continue
            rows.append([TRANSPORT_LABELS.get(s.meta[key], s.meta[key]), _size(s.meta["size"]), s.argv[2],
                         _f(r.get("avg_bw_GBps"), ".3g") + ("" if r.get("complete") else " (incomplete)"),
                         _f(r.get("avg_msgs_per_s"), ",.0f"), _f(r.get("baseline_socket_GBps"), ".3g"),
                         _x(r.get("ratio"))])
        return _table([title, "message", "messages per sender", "derecho-py GB/s per node", "msgs/s per node",
                       "plain sockets GB/s", "× plain"], rows)

    def _bw_figure(self, plt: Any, steps: list[Step], key: str) -> Any:
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        values = list(dict.fromkeys(s.meta[key] for s in steps))
        base: dict[int, list[float]] = {}
        for v in values:
            pts = [(s.meta["size"], s.record["results"][0]) for s in steps
                   if s.meta[key] == v and s.record and s.record.get("results")]
            if not pts:
                continue
            label = f"derecho-py over {TRANSPORT_LABELS.get(v, v)}" if key == "transport" else v
            ax.plot([p[0] for p in pts], [p[1]["avg_bw_GBps"] for p in pts], marker="o", label=label)
            for size, r in pts:
                if r.get("baseline_socket_GBps"):
                    base.setdefault(size, []).append(r["baseline_socket_GBps"])
        if base:
            sizes = sorted(base)
            ax.plot(sizes, [statistics.median(base[s]) for s in sizes], linestyle="--", color="grey", marker=".",
                    label="plain Python sockets (same run)")
        if key == "transport":
            ax.axvline(10240, color="lightgrey", linestyle=":")
            ax.annotate("SMC | RDMC", (10240, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=8,
                        color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("GB/s delivered per node")
        rec = next((s.record for s in steps if s.record), {}) or {}
        what = "all members send" if rec.get("sender_selector") == 0 else "one sender"
        ax.set_title(f"Multicast bandwidth, {rec.get('num_nodes', '?')} nodes, {what}"
                     + (" (per RDMC algorithm)" if key == "algorithm" else " (per transport)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    # ---- latency
    def latency(self) -> list[str]:
        lines = ["## Multicast latency", ""]
        missing = self._not_measured("latency")
        if missing:
            return lines + missing
        steps = [s for s in self.of("latency") if s.record]
        rec0 = steps[0].record or {}
        lines += [f"`derecho bench latency`: {rec0.get('num_nodes')} member processes, every member sends "
                  f"{rec0.get('num_messages')} messages of {_size(rec0.get('size', 0))} (ORDERED, at most "
                  f"`window_size` = {rec0.get('window_size')} of its own outstanding); a message's latency is the "
                  "time from `send` until the sender's own copy is delivered, i.e. every member has it. Every "
                  "message of every sender of every run is a sample. Baseline in the same run: a plain Python "
                  "socket round trip of the same payload between two processes, the floor of any \"everyone "
                  "has it\" notice.", ""]
        lines += self._plot("latency_cdf.png", lambda plt: self._latency_figure(plt, steps))
        rows = []
        for s in self.of("latency"):
            r = s.record
            if r is None:
                rows.append([TRANSPORT_LABELS.get(s.meta["transport"], s.meta["transport"]),
                             f"not measured: {_short(s.problem)}"] + [""] * 7)
                continue
            xs = r.get("samples_us") or []
            base = r.get("baseline_socket_rtt_samples_us") or []
            rows.append([f"derecho-py over {TRANSPORT_LABELS.get(r['provider'], r['provider'])}", str(len(xs)),
                         _f(_pct(xs, 0.5), ",.0f"), _f(_pct(xs, 0.9), ",.0f"), _f(_pct(xs, 0.99), ",.0f"),
                         _f(r.get("mean_us"), ",.0f"), _f(_pct(base, 0.5)), _f(_pct(base, 0.99)),
                         _x(_ratio(_pct(xs, 0.5), _pct(base, 0.5)))])
            self.headline(f"multicast latency {TRANSPORT_LABELS.get(r['provider'], r['provider'])}, "
                          f"{r.get('num_nodes')} nodes, {_size(r.get('size', 0))}, p50", _pct(xs, 0.5), " µs",
                          ",.0f", "plain socket round trip", _pct(base, 0.5), "lower")
        lines += _table(["", "samples", "p50 µs", "p90 µs", "p99 µs", "mean µs", "socket RTT p50 µs",
                         "socket RTT p99 µs", "p50 × RTT"], rows)
        return lines

    def _latency_figure(self, plt: Any, steps: list[Step]) -> Any:
        fig, ax = plt.subplots(figsize=(7.5, 4.6))

        def cdf(xs: list[float], **kw: Any) -> None:
            s = sorted(xs)
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], **kw)

        base: list[float] = []
        for s in steps:
            r = s.record or {}
            if r.get("samples_us"):
                cdf(r["samples_us"], label=f"derecho-py over {TRANSPORT_LABELS.get(r['provider'], r['provider'])}")
            base += r.get("baseline_socket_rtt_samples_us") or []
        if base:
            cdf(base, label="plain socket round trip (same run)", linestyle="--", color="grey")
        r0 = steps[0].record or {}
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs)")
        ax.set_ylabel("fraction of messages")
        ax.set_title(f"Latency CDF: {r0.get('num_nodes')} nodes all sending {_size(r0.get('size', 0))}, ORDERED")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center", bbox_to_anchor=(0.42, 0.5))
        return fig

    # ---- persistence
    def persistence(self) -> list[str]:
        lines = ["## Persistence", ""]
        missing = self._not_measured("persistence")
        if missing:
            return lines + missing
        rec = self.of("persistence")[0].record or {}
        res = rec.get("results", [])
        lines += ["`derecho bench persistence`: appends to the `file` log store (checksummed entries, data "
                  "fsync'd before the index), `persist()` every N appends, on the disk of the report's folder. "
                  "Baselines in the same run, same payloads, same cadence: a plain file written by Python and "
                  "`fdatasync`'d (the limit), and sqlite3 in WAL mode with `synchronous=FULL`, one transaction "
                  f"per sync (what one would pick instead). Total appends over total time of {rec.get('runs')} "
                  f"interleaved slices of {rec.get('seconds')} s per system.", ""]
        lines += self._plot("persistence.png", lambda plt: self._persistence_figure(plt, res))
        rows = []
        for r in res:
            rows.append([_size(r["size"]), str(r["persist_every"]),
                         _f(r["file"]["appends_per_s"], ",.0f"), _f(r["file"]["mb_per_s"], ",.1f"),
                         _f(r["plain"]["appends_per_s"], ",.0f"), _f(r["plain"]["mb_per_s"], ",.1f"),
                         _f(r["sqlite"]["appends_per_s"], ",.0f"), _f(r["sqlite"]["mb_per_s"], ",.1f"),
                         _x(r.get("file_vs_plain")), _x(r.get("file_vs_sqlite"))])
        lines += _table(["entry", "persist every", "file appends/s", "file MB/s", "fsync'd file appends/s",
                         "fsync'd file MB/s", "sqlite appends/s", "sqlite MB/s", "file × fsync'd file",
                         "file × sqlite"], rows)
        t = rec.get("get_by_time")
        if t:
            lines += [f"`get_by_time` on a log of {t['entries']:,} entries ({t['queries']:,} random single "
                      "queries), against sqlite's indexed `ts <= ?` query on the same rows:", ""]
            lines += _table(["", "median µs", "p99 µs"],
                            [["file store get_by_time", _f(t["file_median_us"], ".2f"), _f(t["file_p99_us"], ".2f")],
                             ["sqlite (baseline)", _f(t["sqlite_median_us"], ".2f"), _f(t["sqlite_p99_us"], ".2f")]])
            lines += [f"The log was built in {t['build_s']} s and reopened (and verified) in {t['reopen_s']} s.", ""]
        for r in res:
            if r["persist_every"] == 16 and r["size"] == 64:
                self.headline("persistence 64 B entries, persist every 16", r["file"]["appends_per_s"],
                              " appends/s", ",.0f", "sqlite (WAL, synchronous=FULL)", r["sqlite"]["appends_per_s"],
                              "higher")
        big = [r for r in res if r["persist_every"] == 16 and r["size"] >= 65536]
        if big:
            r = big[0]
            self.headline(f"persistence {_size(r['size'])} entries, persist every 16", r["file"]["mb_per_s"],
                          " MB/s", ",.1f", "fsync'd plain file", r["plain"]["mb_per_s"], "higher")
        if t:
            self.headline(f"get_by_time on {t['entries']:,} entries, median", t["file_median_us"], " µs", ".2f",
                          "sqlite indexed query", t["sqlite_median_us"], "lower")
        return lines

    @staticmethod
    def _persistence_figure(plt: Any, res: list[dict[str, Any]]) -> Any:
        cadences = sorted({r["persist_every"] for r in res})
        fig, axes = plt.subplots(1, len(cadences), figsize=(4.2 * len(cadences) + 1, 4.4), squeeze=False,
                                 sharey=True)
        names = (("file", "derecho-py file store", {}),
                 ("plain", "fsync'd plain file", {"linestyle": "--", "color": "grey"}),
                 ("sqlite", "sqlite WAL, synchronous=FULL", {"linestyle": ":", "color": "tab:red"}))
        for ax, c in zip(axes[0], cadences):
            rows = sorted((r for r in res if r["persist_every"] == c), key=lambda r: r["size"])
            for key, label, style in names:
                ax.plot([r["size"] for r in rows], [r[key]["mb_per_s"] for r in rows], marker="o", label=label,
                        **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("entry size (bytes)")
            ax.set_title(f"persist every {c} append{'s' if c > 1 else ''}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("MB/s of payload (durable)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Persistence: append throughput per entry size")
        return fig

    # ---- view changes
    def viewchange(self) -> list[str]:
        lines = ["## View changes", ""]
        missing = self._not_measured("viewchange")
        if missing:
            return lines + missing
        rec = self.of("viewchange")[0].record or {}
        lines += [f"`derecho bench viewchange`: {rec.get('nodes')} member processes over {rec.get('provider')} "
                  f"(heartbeat {rec.get('heartbeat_ms')} ms, suspicion timeout {rec.get('suspicion_timeout_ms')} "
                  f"ms); {rec.get('runs')} rounds each SIGKILL a member, then restart it. Baselines in the same "
                  "run: the time until a plain TCP `recv` sees EOF from a SIGKILLed process (the kernel's part of "
                  "failure detection), and `python -c \"import derecho_core\"` (the floor of a join that starts a "
                  "process).", ""]
        c, j, a = rec.get("crash_to_view", {}), rec.get("join", {}), rec.get("admission", {})
        e, p = rec.get("baseline_tcp_eof", {}), rec.get("baseline_python_start", {})
        lines += _table(["measure", "median ms", "p90 ms", "baseline", "baseline median ms", "ratio"], [
            ["SIGKILL → new view on every survivor", _f(c.get("median_ms")), _f(c.get("p90_ms")), "TCP EOF",
             _f(e.get("median_ms"), ".2f"), _x(_ratio(c.get("median_ms"), e.get("median_ms")))],
            ["join: process start → view everywhere", _f(j.get("median_ms")), _f(j.get("p90_ms")), "Python start-up",
             _f(p.get("median_ms")), _x(_ratio(j.get("median_ms"), p.get("median_ms")))],
            ["of which admission: Group() → view everywhere", _f(a.get("median_ms")), _f(a.get("p90_ms")), "", "",
             ""]])
        self.headline(f"crash → new view on all survivors ({rec.get('nodes')} nodes), median", c.get("median_ms"),
                      " ms", ".1f", "TCP EOF", e.get("median_ms"), "lower")
        self.headline("join (process start → view everywhere), median", j.get("median_ms"), " ms", ".0f",
                      "Python start-up", p.get("median_ms"), "lower")
        return lines

    # ---- rpc
    def rpc(self) -> list[str]:
        lines = ["## RPC: ordered_send against PySyncObj", ""]
        missing = self._not_measured("rpc")
        if missing:
            return lines + missing
        rec = self.of("rpc")[0].record or {}
        d, p = rec.get("derecho") or {}, rec.get("pysyncobj") or {}
        lines += [f"`derecho bench rpc`: {rec.get('num_nodes')} member processes holding a replicated counter; "
                  f"one calls `ordered_send` with a {rec.get('size')}-byte argument: {rec.get('calls'):,} calls "
                  f"pipelined (all replies of all members collected), then {rec.get('latency_calls'):,} one at a "
                  "time (p50/p99). Baseline in the same run: PySyncObj with a `@replicated` counter on "
                  f"{rec.get('num_nodes')} local processes, the client on the leader: pipelined with callbacks "
                  "(default configuration), and `sync=True` calls one at a time with batching off. A PySyncObj "
                  "call returns once the leader applied it (a majority logged it); an ordered_send counts once "
                  f"every member replied. Medians of {rec.get('runs_requested')} run(s).", ""]
        if rec.get("pysyncobj_skipped"):
            lines += [f"*PySyncObj baseline skipped: {rec['pysyncobj_skipped']}*", ""]
        lines += self._plot("rpc.png", lambda plt: self._rpc_figure(plt, d, p))
        lines += _table(["", "pipelined calls/s", "one at a time p50 µs", "p99 µs"], [
            ["derecho-py ordered_send", _f(d.get("calls_per_s"), ",.0f"), _f(d.get("p50_us"), ",.0f"),
             _f(d.get("p99_us"), ",.0f")],
            ["PySyncObj (baseline)", _f(p.get("calls_per_s"), ",.0f"), _f(p.get("p50_us"), ",.0f"),
             _f(p.get("p99_us"), ",.0f")],
            ["derecho-py × PySyncObj", _x(_ratio(d.get("calls_per_s"), p.get("calls_per_s"))),
             _x(_ratio(d.get("p50_us"), p.get("p50_us"))), _x(_ratio(d.get("p99_us"), p.get("p99_us")))]])
        if p.get("batched_p50_us"):
            lines += [f"PySyncObj `sync=True` with its default batching: p50 {p['batched_p50_us'] / 1000:.1f} ms "
                      "a call (its ~0.1 s batching period).", ""]
        if rec.get("calls", 0) < 5000:
            lines += ["*With fewer than 5,000 pipelined calls PySyncObj's figure is bounded by its batching "
                      "period: not a fair comparison (a `--quick` run).*", ""]
        self.headline("rpc ordered_send pipelined", d.get("calls_per_s"), " calls/s", ",.0f", "PySyncObj",
                      p.get("calls_per_s"), "higher")
        self.headline("rpc ordered_send one at a time, p50", d.get("p50_us"), " µs", ",.0f",
                      "PySyncObj (sync, batching off)", p.get("p50_us"), "lower")
        return lines

    @staticmethod
    def _rpc_figure(plt: Any, d: dict[str, Any], p: dict[str, Any]) -> Any:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 4))
        names = ["derecho-py\nordered_send", "PySyncObj"]
        colors = ["tab:blue", "grey"]
        for ax, key, title, fmt in ((a1, "calls_per_s", "pipelined calls/s (higher is better)", "{:,.0f}"),
                                    (a2, "p50_us", "one call at a time, p50 µs (lower is better)", "{:,.0f}")):
            vals = [d.get(key) or 0.0, p.get(key) or 0.0]
            bars = ax.bar(names, vals, color=colors)
            for b, v in zip(bars, vals):
                ax.annotate(fmt.format(v) if v else "n/a", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=9)
            ax.set_title(title, fontsize=10)
            ax.margins(y=0.15)
        fig.suptitle("RPC against PySyncObj (same run)")
        return fig

    # ---- the page
    def page(self, mach: dict[str, Any], seconds: float) -> str:
        sections = [self.transport(), self.bandwidth(), self.latency(), self.persistence(), self.viewchange(),
                    self.rpc()]  # first: they fill self.headlines
        ram = f"{mach['ram_bytes'] / 2 ** 30:.1f} GiB" if mach.get("ram_bytes") else "n/a"
        commit = mach.get("git_commit")
        git = "not a git checkout" if not commit else f"`{commit[:12]}`" + \
            (" (with uncommitted changes)" if mach.get("git_dirty") else "")
        load = mach.get("loadavg_start"), mach.get("loadavg_end")
        samples = [x for x in [*(mach.get("loadavg_1min_after_each_run") or []), *(x[0] for x in load if x)]
                   if x is not None]
        cores = mach.get("usable_cores") or mach.get("cores") or 1
        busy = max(samples, default=0.0) > cores
        lines = ["# Benchmark report", "",
                 f"Written by `derecho bench report{' --quick' if self.quick else ''}` on {mach['date'][:10]}"
                 + (" — **a `--quick` smoke run: tiny counts, not figures to quote.**" if self.quick else
                    f" (full run, repetitions: {self.runs}).")
                 + " Every figure is measured in the same run as its baseline; a ratio is derecho-py's figure "
                   "over the baseline's, so read it with the *better is* column: for a latency below 1× is faster "
                   "than the baseline, for a throughput above 1× is. Sizes: KB and MB are 2^10 and 2^20 bytes; "
                   "rates: MB/s and GB/s are 10^6 and 10^9 bytes per second.", "",
                 ]
        if busy:
            lines += [f"**A busy machine:** the 1-minute load average reached {max(samples):.1f} on {cores} "
                      "cores during this run, so the benchmarks shared the CPU with other work. Their figures and "
                      "baselines were measured side by side under the same load, but absolute figures are lower "
                      "(latencies higher) and noisier than on a quiet machine.", ""]
        lines += ["## Machine", ""]
        lines += _table(["", ""], [
            ["CPU", f"{mach['cpu']}"], ["cores", f"{mach['cores']} ({mach['usable_cores']} usable by this process)"],
            ["RAM", ram], ["Python", mach["python"]], ["OS", mach["os"]],
            ["derecho-core", f"{mach['derecho_core']}, git commit {git}"],
            ["plugins", ", ".join(mach.get("plugins") or []) or "none"],
            ["date (UTC)", mach["date"]], ["duration", f"{seconds / 60:.1f} min"],
            ["load average (1/5/15 min)", f"{_f_load(load[0])} at the start, {_f_load(load[1])} at the end"
             + (f"; 1 min, after each benchmark run: {min(samples):.1f} to {max(samples):.1f}"
                if mach.get("loadavg_1min_after_each_run") else "")],
            ["fi_pingpong (libfabric baseline)", "found" if mach.get("fi_pingpong") else "not on PATH"]],
            text_columns=2)
        lines += ["All processes run on this one machine and talk over 127.0.0.1: the figures compare software "
                  "paths, not networks.", ""]
        lines += ["## Headlines", ""]
        lines += _table(["measure", "baseline (same run)", "derecho-py", "baseline", "ratio", "better is"],
                        [[h[0], h[2], h[1], h[3], h[4], h[5]] for h in self.headlines], text_columns=2) \
            if self.headlines else ["*Nothing was measured.*", ""]
        for s in sections:
            lines += s
        problems = [s for s in self.steps if s.problem]
        if problems:
            lines += ["## Problems", ""]
            lines += [f"* `derecho bench {s.bench} {' '.join(s.argv)}`: {s.problem}" for s in problems]
            lines += [""]
        lines += ["## How this page was made", "",
                  "Each measurement below ran as its own process, in this order (each also given `--json FILE`); "
                  "every record is in [results.json](results.json), every benchmark's output in "
                  "[log.txt](log.txt).", "", "```"]
        lines += [f"derecho bench {s.bench} {' '.join(s.argv)}    # {s.seconds:.0f} s" for s in self.steps]
        lines += ["```", ""]
        return "\n".join(lines)


def _short(problem: str | None) -> str:
    """A table cell's word for a problem told in full under Problems."""
    if problem and problem.startswith("stopped after"):
        return "timed out (see Problems)"
    return "failed (see Problems)"


def _f_load(x: list[float] | None) -> str:
    return "n/a" if not x else " / ".join(f"{v:.2f}" for v in x)


# ----------------------------------------------------------------------------- command


def _results(steps: list[Step], mach: dict[str, Any], quick: bool, runs: int, parts: list[str],
             transports: list[str], seconds: float, plots: dict[str, str]) -> dict[str, Any]:
    return {"benchmark": "report", "quick": quick, "runs": runs, "parts": parts, "transports": transports,
            "machine": mach, "seconds": round(seconds, 1), "plots": plots,
            "steps": [{"part": s.part, "key": s.key, "label": s.label, "bench": s.bench, "argv": s.argv,
                       "meta": s.meta, "timeout": s.timeout, "seconds": round(s.seconds, 1), "problem": s.problem,
                       "record": s.record} for s in steps]}


def _measure(args: argparse.Namespace, out: Path, parts: list[str]) -> tuple[dict[str, Any], int] | None:
    """Run the benchmarks; what results.json holds (without the plots), or None when there is nothing to run."""
    from .. import plugins

    profile = QUICK if args.quick else FULL
    runs = max(1, args.runs if args.runs is not None else profile.runs)
    timeout = args.timeout if args.timeout is not None else profile.timeout
    installed = plugins.names("transport")
    transports = [t for t in ("sockets", "tcp") if t in installed]
    if not transports:
        print("derecho bench report: no transport plugin installed (pip install derecho-transport-sockets)",
              file=sys.stderr)
        return None
    out.mkdir(parents=True, exist_ok=True)
    for name in ("index.md", "results.json", "log.txt", *PLOTS):  # nothing stale from an earlier report
        (out / name).unlink(missing_ok=True)
    work = out / ".work"  # the benchmarks' working directory (persistence measures this disk)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    steps = plan(profile, parts, runs, timeout, transports)
    mach = machine()
    t0 = time.monotonic()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # a core dependency, but never let the bar stop the report
        tqdm = None
    bar = tqdm(total=len(steps), unit="run", desc="bench report", file=sys.stderr, dynamic_ncols=True) \
        if tqdm is not None else None
    try:
        with open(out / "log.txt", "w") as log:
            log.write(f"derecho bench report {'--quick ' if args.quick else ''}--runs {runs}: {len(steps)} "
                      f"benchmark runs, {mach['date']}\n")
            for i, step in enumerate(steps):
                if bar is not None:
                    bar.set_description(f"bench report: {step.label}")
                else:
                    print(f"[{i + 1}/{len(steps)}] {step.label}", file=sys.stderr, flush=True)
                _run_step(step, work, log)
                mach.setdefault("loadavg_1min_after_each_run", []).append((_loadavg() or [None])[0])
                if step.problem:
                    msg = f"{step.label}: {step.problem}"
                    if bar is not None:
                        bar.write(msg, file=sys.stderr)
                    else:
                        print(msg, file=sys.stderr, flush=True)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(work, ignore_errors=True)
    mach["loadavg_end"] = _loadavg()
    results = _results(steps, mach, args.quick, runs, parts, transports, time.monotonic() - t0, {})
    # the measurements first: if drawing fails, --from-results draws again without measuring again
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results, len(steps)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.from_results:
        source = Path(args.from_results)
        results = json.loads(source.read_text())
        out.mkdir(parents=True, exist_ok=True)
        log = source.parent / "log.txt"
        if log.is_file() and not (out / "log.txt").exists():
            shutil.copyfile(log, out / "log.txt")
    else:
        parts = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else list(PARTS)
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            print(f"derecho bench report: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}",
                  file=sys.stderr)
            return 2
        measured = _measure(args, out, parts)
        if measured is None:
            return 1
        results = measured[0]
    steps = [Step(s["part"], s["key"], s["label"], s["bench"], s["argv"], s.get("timeout", 0.0), s.get("meta", {}),
                  s["record"], s["problem"], s["seconds"]) for s in results["steps"]]
    report = Report(steps, out, results["quick"], results["runs"], results["parts"], results["transports"])
    (out / "index.md").write_text(report.page(results["machine"], results["seconds"]))
    results["plots"] = report.plots
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"derecho bench report: {len(steps)} benchmark runs in {results['seconds'] / 60:.1f} min; "
          f"{out / 'index.md'} ({sum(1 for p in report.plots.values() if not p)} plots)")
    width = max((len(h[0]) for h in report.headlines), default=0)
    for h in report.headlines:
        print(f"  {h[0]:<{width}}  {h[1]:>18}  vs {h[2]} {h[3]}: {h[4]} ({h[5]} is better)")
    for name, problem in report.plots.items():
        if problem:
            print(f"plot {name}: {problem}", file=sys.stderr)
    failed = [s for s in steps if s.problem]
    for s in failed:
        print(f"problem: {s.label}: {s.problem}", file=sys.stderr)
    return 1 if failed else 0
