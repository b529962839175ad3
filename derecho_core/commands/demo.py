"""``derecho demo NAME``: run one of the example programs as a group of local processes.

An example is a program in the package's ``derecho_core/examples/`` folder that one
node runs (``python derecho_core/examples/NAME.py --node ID --nodes N [--SECTION/key=value ...]``)
and that says how many nodes it wants with a module-level ``DEMO_NODES = N``.
This command starts the N processes on 127.0.0.1, each with its own free ports
(chosen at run time), its own scratch directory (its working directory, with
``PERS/file_path`` and ``PERS/ramdisk_path`` inside) and node 0 as the contact;
it prints every node's output as it comes, each line prefixed by the node id,
and stops them all when they are done, at the timeout, or on Ctrl-C. The exit
status is 0 only if every node exited 0. ``derecho demo --list`` lists the
examples. Extra ``--SECTION/key=value`` options are given to every node, and
so is whatever follows a ``--`` (the example's own options, e.g.
``derecho demo random_messages -- --unordered``).
"""

from __future__ import annotations

import argparse
import ast
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: how long the other nodes may run on after one node failed, before they are stopped (s)
GRACE_AFTER_FAILURE = 5.0
#: pause between starting two nodes, so the contact listens before the others knock
START_GAP = 0.2
#: set for the nodes: exit when standard input closes (the launcher is gone)
WATCH_ENV = "DERECHO_DEMO_EXIT_ON_STDIN_EOF"
PORT_KEYS = ("gms_port", "state_transfer_port", "sst_port", "rdmc_port", "external_port")
#: environment variable listing the nodes' external ports in node order
EXTERNAL_PORTS_ENV = "DERECHO_DEMO_EXTERNAL_PORTS"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run an example program (derecho_core/examples/NAME.py) as a group of local processes",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="derecho demo [--list] NAME [--nodes N] [--provider sockets|tcp] [--timeout S] "
              "[--examples-dir DIR] [--SECTION/key=value ...] [-- EXAMPLE-OPTIONS]")
    p.add_argument("name", nargs="?", metavar="NAME", help="the example to run (see --list)")
    p.add_argument("example_args", nargs="*", metavar="-- EXAMPLE-OPTIONS", help="given to every node")
    p.add_argument("--list", action="store_true", help="list the examples and exit")
    p.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="how many nodes to start (default: the example's DEMO_NODES)")
    p.add_argument("--provider", default="sockets", metavar="PROVIDER",
                   help="transport provider: sockets (default), or a libfabric provider such as tcp")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="stop every node after S seconds and fail (default 120)")
    p.add_argument("--examples-dir", default=None, metavar="DIR",
                   help="where the examples are (default: the examples/ folder inside the installed package)")
    p.set_defaults(func=run, accepts_extra=True)


# ----------------------------------------------------------------------------- finding examples


@dataclass
class Example:
    name: str
    path: Path
    nodes: int
    summary: str


def default_examples_dir() -> Path:
    """The examples shipped inside the package (``derecho_core/examples``, in the wheel too)."""
    from .. import __file__ as package_init

    return Path(package_init).resolve().parent / "examples"


def find_examples(folder: Path) -> dict[str, Example]:
    """Every ``*.py`` in ``folder`` (not starting with ``_``) that assigns an int to ``DEMO_NODES`` at top level."""
    found: dict[str, Example] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        nodes = None
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEMO_NODES"
                                                    for t in stmt.targets):
                value = stmt.value
                if isinstance(value, ast.Constant) and isinstance(value.value, int) and value.value > 0:
                    nodes = value.value
        if nodes is None:
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        found[path.stem] = Example(path.stem, path, nodes, doc[0] if doc else "")
    return found


def _examples(args: argparse.Namespace) -> tuple[Path, dict[str, Example]] | None:
    folder = Path(args.examples_dir) if args.examples_dir else default_examples_dir()
    if not folder.is_dir():
        from .. import __file__ as package_init

        print(f"derecho demo: no examples folder at {folder} (derecho_core is installed at "
              f"{Path(package_init).resolve().parent}, whose examples/ folder holds the shipped ones). "
              "Give --examples-dir DIR to run programs from elsewhere.", file=sys.stderr)
        return None
    return folder, find_examples(folder)


# ----------------------------------------------------------------------------- running


class _NodeProcess:
    """One node: its process (in a process group of its own) and the threads that read its output."""

    def __init__(self, node_id: int, cmd: list[str], cwd: Path, env: dict[str, str],
                 lines: queue.Queue[tuple[int, str, str | None]]) -> None:
        self.node_id = node_id
        # stdin stays an open pipe that is never written: the node sees EOF when this process is gone (even
        # after a SIGKILL) and exits, so no node outlives the demo (derecho_core/examples/_demo_common.py watches it)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                                     start_new_session=True)
        self.readers = [threading.Thread(target=self._pump, args=(stream, kind, lines), daemon=True)
                        for stream, kind in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self.readers:
            t.start()

    def _pump(self, stream: IO[str], kind: str, lines: queue.Queue[tuple[int, str, str | None]]) -> None:
        for line in stream:
            lines.put((self.node_id, kind, line.rstrip("\n")))
        lines.put((self.node_id, kind, None))

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if it is still there a moment later."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports, free now and outside the kernel's ephemeral range.

    Ports from ``bind(0)`` lie inside the ephemeral range, where a node that
    starts first may take one of them as the source port of an outgoing
    connection before the node that was given it listens on it; ports below
    (or above) the range are never handed out that way.
    """
    lo, hi = _ephemeral_range()
    pool = list(range(10000, lo)) if lo - 10000 >= 4 * count else list(range(hi + 1, 65536))
    if len(pool) < 4 * count:  # an odd ephemeral range: fall back to the kernel's choice
        from ..testing.processes import free_ports as kernel_free_ports

        return kernel_free_ports(count, host)
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for port in rng.sample(pool, len(pool)):
            if len(chosen) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            held.append(s)
            chosen.append(port)
    finally:
        for s in held:
            s.close()
    if len(chosen) < count:
        raise OSError(f"found only {len(chosen)} free ports of {count} on {host}")
    return chosen


def node_command(example: Example, node_id: int, nodes: int, contact_port: int, ports: dict[str, int],
                 workdir: Path, provider: str, extra: list[str]) -> list[str]:
    settings = {
        "DERECHO/contact_ip": "127.0.0.1", "DERECHO/contact_port": contact_port, "DERECHO/local_ip": "127.0.0.1",
        **{f"DERECHO/{k}": v for k, v in ports.items()},
        "RDMA/provider": provider, "PERS/file_path": workdir / "plog", "PERS/ramdisk_path": workdir / "volatile",
        "LOGGER/default_log_level": "warning",
    }
    if provider != "sockets":
        settings["RDMA/domain"] = "lo"
    return [sys.executable, "-u", str(example.path), "--node", str(node_id), "--nodes", str(nodes),
            *(f"--{k}={v}" for k, v in settings.items()), *extra]


def _show(node_id: int, kind: str, line: str) -> None:
    prefix = f"[node {node_id}]"
    if kind == "out":
        print(line if line.startswith(prefix) else f"{prefix} {line}", flush=True)
    else:
        print(f"{prefix} (stderr) {line}", flush=True)


def run_example(example: Example, nodes: int, provider: str, timeout: float, extra: list[str]) -> int:
    lines: queue.Queue[tuple[int, str, str | None]] = queue.Queue()
    procs: list[_NodeProcess] = []
    env = {k: v for k, v in os.environ.items() if k not in ("DERECHO_CONF_FILE", "DERECHO_NODE_CONF_FILE")}
    env["PYTHONUNBUFFERED"] = "1"
    env[WATCH_ENV] = "1"
    started = time.monotonic()
    print(f"derecho demo: {example.name} on {nodes} nodes over '{provider}' (timeout {timeout:g} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"derecho-demo-{example.name}-") as tmp:
        chosen = free_ports(len(PORT_KEYS) * nodes)
        ports = [dict(zip(PORT_KEYS, chosen[i * len(PORT_KEYS):(i + 1) * len(PORT_KEYS)])) for i in range(nodes)]
        # every node's external-client port, for examples with a client process (external_client)
        env[EXTERNAL_PORTS_ENV] = ",".join(str(p["external_port"]) for p in ports)
        open_streams = 2 * nodes
        failed_at: float | None = None
        timed_out = interrupted = False
        running: list[int] = []
        try:
            for node_id in range(nodes):
                workdir = Path(tmp) / f"node{node_id}"
                workdir.mkdir()
                cmd = node_command(example, node_id, nodes, ports[0]["gms_port"], ports[node_id], workdir,
                                   provider, extra)
                procs.append(_NodeProcess(node_id, cmd, workdir, env, lines))
                time.sleep(START_GAP)
            deadline = started + timeout
            while open_streams > 0 or any(p.proc.poll() is None for p in procs):
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    running = [p.node_id for p in procs if p.proc.poll() is None]
                    break
                if failed_at is None and any(p.proc.poll() not in (None, 0) for p in procs):
                    failed_at = now
                if failed_at is not None and now - failed_at > GRACE_AFTER_FAILURE:
                    break
                try:
                    node_id, kind, line = lines.get(timeout=0.1)
                except queue.Empty:
                    continue
                if line is None:
                    open_streams -= 1
                else:
                    _show(node_id, kind, line)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            for p in procs:
                p.stop()
            while True:  # whatever was printed before the end
                try:
                    node_id, kind, line = lines.get_nowait()
                except queue.Empty:
                    break
                if line is not None:
                    _show(node_id, kind, line)
    codes = {p.node_id: p.proc.returncode for p in procs}
    elapsed = time.monotonic() - started
    if interrupted:
        print(f"derecho demo: interrupted; stopped {len(procs)} node(s)", file=sys.stderr, flush=True)
        return 130
    if timed_out:
        print(f"derecho demo: {example.name} did not finish within {timeout:g} s; stopped every node "
              f"(still running: {running}; exit status by node {codes})", file=sys.stderr,
              flush=True)
        return 1
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad or len(procs) < nodes:
        print(f"derecho demo: {example.name} failed: exit status by node {codes}", file=sys.stderr, flush=True)
        return 1
    print(f"derecho demo: {example.name}: all {nodes} nodes exited 0 in {elapsed:.1f} s", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    found = _examples(args)
    if found is None:
        return 1
    folder, examples = found
    if args.list or not args.name:
        if not examples:
            print(f"derecho demo: no examples in {folder} (an example defines DEMO_NODES = N)", file=sys.stderr)
            return 1
        width = max(len(n) for n in examples)
        print(f"examples in {folder} (run one with: derecho demo NAME):")
        for ex in examples.values():
            print(f"  {ex.name:<{width}}  {ex.nodes} nodes  {ex.summary}")
        return 0 if args.list else 2
    example = examples.get(args.name.removesuffix(".py"))
    if example is None:
        print(f"derecho demo: no example {args.name!r} in {folder}; there are: {', '.join(examples) or 'none'}",
              file=sys.stderr)
        return 2
    nodes = args.nodes if args.nodes is not None else example.nodes
    if nodes < 1:
        print("derecho demo: --nodes must be at least 1", file=sys.stderr)
        return 2
    # argparse keeps or drops the "--" depending on where it stands: take the example's options from both
    extra = list(args.extra)
    app_args: list[str] = list(args.example_args)
    if "--" in extra:
        cut = extra.index("--")
        extra, app_args = extra[:cut], app_args + extra[cut + 1:]
    unknown = [a for a in extra if not (a.startswith("--") and "/" in a.split("=", 1)[0])]
    if unknown:
        print(f"derecho demo: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    return run_example(example, nodes, args.provider, args.timeout, extra + app_args)
