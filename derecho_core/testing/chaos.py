"""Chaos harness: real member processes on a real (namespaced) network, seeded faults, checked guarantees.

    python -m derecho_core.testing.chaos --scenario kill-restart --seed 7 [--nodes 5] [--duration 20]
        [--shards 1] [--json out.json] [--keep]
    python -m derecho_core.testing.chaos --sweep 200 [--parallel 2] [--duration 12] --json aggregate.json
        [--runs-dir DIR]

Every host is a network namespace joined to the others by a veth and a bridge
(:class:`derecho_core.testing.netns.Hosts`), with one member
(:mod:`derecho_core.testing.chaos_member`) per host. Each member sends a load
of ordered calls (every one with a unique id) and p2p reads of its shard
peers. A fault schedule drawn from ``random.Random(seed)`` then injects the
scenario's faults:

- ``kill-restart``: SIGKILL of random members (never more than a minority at
  once) and restarts with the same id and the same log directory;
- ``leader-kill``: a member killed, then the leader (lowest rank) killed
  while the group is changing view; both restarted;
- ``partition``: a minority cut off (its links down, or moved to a second
  bridge so that the minority still reaches itself), then healed; the
  minority must stop without installing a view; it is restarted after the heal;
- ``hang``: SIGSTOP of a member for longer than the suspicion timeout, then
  SIGCONT: it must be removed and must not corrupt anything; then restarted;
- ``loss``: 5 % random packet loss on every host's outgoing traffic (nftables
  ``numgen random``; this kernel has no ``netem``) and a token-bucket shaper
  (``tbf``) on every link, which adds queueing delay under load; one
  member is killed and restarted midway.

At the end the harness heals every fault, restarts every stopped member, waits
until all are in one view, stops the load, and asks every member for the
digests of its state and log and the ids of every applied call. Checks
(reference DESIGN §5): no acknowledged (or delivered) call missing from, or
out of place in, any survivor's log; identical state and log digests in each
shard; nothing applied twice or invented; no two different views with one
vid; no view installed by a minority (a cut-off or hung member) alone; no
member crashed with an internal error; the group converged. The report is
JSON (``--json``). Everything started is stopped and removed on exit, on
failure, on Ctrl-C and on SIGTERM: processes, namespaces, bridges, nftables
and tc rules (they live in the namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Hosts, _ip, netns_unavailable_reason
from .processes import Member

SCENARIOS = ("kill-restart", "leader-kill", "partition", "hang", "loss")
EXTRA_SCENARIOS = ("transfer-kill",)  # not in the sweep's round-robin (added after the sweep; see docs/chaos.md)
PROGRAM = ["-m", "derecho_core.testing.chaos_member"]
PORTS = {"gms_port": 23580, "state_transfer_port": 28366, "sst_port": 37683, "rdmc_port": 31675,
         "external_port": 32645}  # every host has its own port space
NS_PREFIX = "dch"
SETTINGS = {"DERECHO/heartbeat_ms": 50, "DERECHO/suspicion_timeout_ms": 600, "DERECHO/restart_timeout_ms": 1000,
            "LOGGER/default_log_level": "warning"}
INTERNAL_ERROR_MARKERS = ("Traceback", "caught an error", "raised; the group carries on", " ERROR ", " CRITICAL ")
EXPECTED_STOPS = (" stops (partition): ", " stops (removed): ", " stops (left): ")  # logged at ERROR, but expected


class Abort(Exception):
    """Raised in the main thread by SIGTERM / SIGALRM so that cleanup runs."""


def _raise_abort(signum: int, frame: Any) -> None:
    raise Abort(signal.Signals(signum).name)


def cleanup_stale() -> list[str]:
    """Remove namespaces (and the processes in them) left by a harness that was SIGKILLed."""
    removed = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NS_PREFIX):
            continue
        try:
            pid = int(name[len(NS_PREFIX):].split("x", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sh(cmd: list[str], ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = (["ip", "netns", "exec", ns] if ns else []) + cmd
    out = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed: {out.stderr.strip()}")
    return out


@dataclass
class Node:
    node_id: int
    incarnation: int = 0
    member: Member | None = None
    history: list[Member] = field(default_factory=list)
    state: str = "down"  # down | joining | up | hung | isolated
    since: float = 0.0
    loaded: bool = False
    join_attempts: int = 0

    def alive(self) -> bool:
        return self.member is not None and self.member.proc.poll() is None


class ChaosRun:
    def __init__(self, scenario: str, seed: int, nodes: int = 5, duration: float = 20.0, shards: int = 1,
                 rate: float = 25.0, window: int = 4, p2p_every: int = 5, workdir: Path | None = None,
                 keep: bool = False, log=None) -> None:
        if scenario not in SCENARIOS + EXTRA_SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        self.scenario, self.seed, self.n, self.duration, self.shards = scenario, seed, nodes, duration, shards
        self.rate, self.window, self.p2p_every = rate, window, p2p_every
        self.rng = random.Random(f"{scenario}/{seed}")
        self.keep = keep
        self.own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"chaos-{scenario}-{seed}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = {i: Node(i) for i in range(nodes)}
        self.faults: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.isolations: list[dict[str, Any]] = []  # {"nodes": [...], "start": t, "end": t}
        self.t0 = time.time()
        self.hosts: Hosts | None = None
        self.log = log or (lambda msg: None)
        self.loss_method: str | None = None
        self.hung_not_removed = 0  # a member hung past the suspicion timeout must be removed

    # ------------------------------------------------------------------ helpers
    def now(self) -> float:
        return round(time.time() - self.t0, 3)

    def fault(self, kind: str, **fields: Any) -> None:
        entry = {"t": self.now(), "kind": kind, **fields}
        self.faults.append(entry)
        self.log(f"[{entry['t']:7.2f}] {kind} {fields}")

    def latest_view(self) -> dict[str, Any] | None:
        best = None
        for nd in self.nodes.values():
            if nd.state in ("up",) and nd.alive() and nd.member is not None:
                views = nd.member.views()
                if views and (best is None or views[-1]["vid"] > best["vid"]):
                    best = views[-1]
        return best

    def leader(self) -> int | None:
        view = self.latest_view()
        if view is None:
            return None
        for m in view["members"]:
            if self.nodes[m].state == "up" and self.nodes[m].alive():
                return m
        return None

    def up_nodes(self) -> list[int]:
        return [i for i, nd in self.nodes.items() if nd.state == "up" and nd.alive()]

    def not_up(self) -> list[int]:
        return [i for i, nd in self.nodes.items() if not (nd.state == "up" and nd.alive())]

    def can_lose(self, victims: list[int]) -> bool:
        """Losing ``victims`` (on top of every member not up) keeps a majority and every shard populated."""
        gone = set(self.not_up()) | set(victims)
        if len(gone) > (self.n - 1) // 2:
            return False
        return all(any(i % self.shards == k and i not in gone for i in self.nodes) for k in range(self.shards))

    def settings(self) -> dict[str, Any]:
        return {**SETTINGS, "PERS/file_path": str(self.workdir / "plog")}

    def write_conf(self) -> Path:
        assert self.hosts is not None
        conf = self.workdir / "derecho.cfg"
        sections: dict[str, list[str]] = {}
        for key, value in {"DERECHO/contact_ip": self.hosts.addresses[0],
                           "DERECHO/contact_port": PORTS["gms_port"], **self.settings()}.items():
            section, name = key.rsplit("/", 1)
            sections.setdefault(section, []).append(f"{name} = {value}")
        conf.write_text("".join(f"[{s}]\n" + "\n".join(v) + "\n\n" for s, v in sections.items()))
        return conf

    def start(self, i: int, contact: int | None = None) -> None:
        assert self.hosts is not None
        nd = self.nodes[i]
        if nd.member is not None:
            nd.history.append(nd.member)
        nd.incarnation += 1
        nd.join_attempts += 1
        extra = [f"--incarnation={nd.incarnation}", f"--shards={self.shards}"]
        if contact is not None:
            extra.append(f"--DERECHO/contact_ip={self.hosts.addresses[contact]}")
        nd.member = Member(i, PORTS, self.conf_file, extra, host=self.hosts.addresses[i], netns=self.hosts.hosts[i],
                           program=PROGRAM)
        nd.state, nd.since, nd.loaded = "joining", time.time(), False

    def restart(self, i: int, why: str) -> bool:
        contact = self.leader()
        if contact is None:
            return False
        self.start(i, contact)
        self.fault("restart", node=i, incarnation=self.nodes[i].incarnation, contact=contact, why=why)
        return True

    def kill(self, i: int, why: str = "kill") -> None:
        nd = self.nodes[i]
        if nd.member is not None and nd.alive():
            try:
                os.killpg(nd.member.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                nd.member.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        nd.state, nd.since = "down", time.time()
        self.fault(why, node=i, incarnation=nd.incarnation)

    def poll(self, load: bool = True) -> None:
        """Notice members that became ready (and start their load) or exited."""
        for i, nd in self.nodes.items():
            m = nd.member
            if m is None:
                continue
            if nd.state == "joining":
                if any(e.get("event") == "ready" for e in list(m.events)):
                    nd.state, nd.since = "up", time.time()
                elif m.proc.poll() is not None or time.time() - nd.since > 40:
                    if m.proc.poll() is None:
                        self.kill(i, "kill_stuck_join")
                    nd.state, nd.since = "down", time.time()
                    stop = next((e for e in reversed(m.events) if e.get("event") == "stopped"), {})
                    self.fault("join_failed", node=i, incarnation=nd.incarnation, code=m.proc.returncode,
                               reason=(stop.get("reason") or "".join(m.stderr[-2:]))[:300])
            if nd.state == "up" and load and not nd.loaded and nd.alive():
                m.command(f"load {self.rate} {self.window} {self.p2p_every}")
                nd.loaded = True
            if nd.state in ("up", "isolated") and m.proc.poll() is not None:
                stop = next((e for e in reversed(m.events) if e.get("event") == "stopped"), {})
                nd.state, nd.since = "down", time.time()
                self.fault("exited", node=i, incarnation=nd.incarnation, code=m.proc.returncode,
                           stop=stop.get("kind"), reason=(stop.get("reason") or "")[:200])

    def sleep(self, seconds: float, load: bool = True) -> None:
        end = time.time() + seconds
        while True:
            self.poll(load)
            left = end - time.time()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def wait_until(self, predicate: Any, timeout: float, load: bool = True) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            self.poll(load)
            if predicate():
                return True
            time.sleep(0.05)
        return bool(predicate())

    def rejoin_all(self, why: str, timeout: float = 20.0, load: bool = True) -> bool:
        """Restart every member that is down and wait until all are up."""
        end = time.time() + timeout
        while time.time() < end:
            self.poll(load)
            if all(nd.state == "down" for nd in self.nodes.values()):
                # more than a minority failed at once (e.g. a partition plus a false suspicion): the whole group
                # stopped, as it must; restart it from its logs (total restart, led by the contact, node 0)
                self.fault("total_restart", why=why)
                self.start(0)
                self.sleep(0.2, load)
                for i in range(1, self.n):
                    self.start(i)
                continue
            for i in self.not_up():
                nd = self.nodes[i]
                if nd.state == "down" and time.time() - nd.since > 0.3:
                    self.restart(i, why)
            if not self.not_up():
                return True
            time.sleep(0.1)
        return not self.not_up()

    # ------------------------------------------------------------------ network faults
    def cut(self, victims: list[int], mode: str) -> None:
        assert self.hosts is not None
        for i in victims:
            if mode == "isolate":
                _ip("link", "set", f"b{i}", "down", ns=self.hosts.bridge_ns)
            else:  # split: the minority keeps a bridge of its own
                _ip("link", "set", f"b{i}", "nomaster", ns=self.hosts.bridge_ns)
                _ip("link", "set", f"b{i}", "master", "br1", ns=self.hosts.bridge_ns)
            self.nodes[i].state = "isolated" if self.nodes[i].state == "up" else self.nodes[i].state

    def heal(self, victims: list[int], mode: str) -> None:
        assert self.hosts is not None
        for i in victims:
            if mode == "isolate":
                _ip("link", "set", f"b{i}", "up", ns=self.hosts.bridge_ns)
            else:
                _ip("link", "set", f"b{i}", "nomaster", ns=self.hosts.bridge_ns)
                _ip("link", "set", f"b{i}", "master", "br0", ns=self.hosts.bridge_ns)
                _ip("link", "set", f"b{i}", "up", ns=self.hosts.bridge_ns)
            if self.nodes[i].state == "isolated":
                self.nodes[i].state = "up"

    def add_loss(self, percent: float) -> None:
        assert self.hosts is not None
        for i, ns in enumerate(self.hosts.hosts):
            if shutil.which("nft"):
                _sh(["nft", "add", "table", "inet", "chaos"], ns)
                _sh(["nft", "add", "chain", "inet", "chaos", "out",
                     "{ type filter hook output priority 0; policy accept; }"], ns)
                _sh(["nft", "add", "rule", "inet", "chaos", "out", "oifname", f"e{i}", "numgen", "random", "mod",
                     "1000", "<", str(int(percent * 10)), "drop"], ns)
                self.loss_method = f"nftables numgen random: {percent} % of outgoing packets dropped per host"
            # queueing delay under load (no netem in this kernel): a token bucket on every host's link
            out = _sh(["tc", "qdisc", "add", "dev", f"e{i}", "root", "tbf", "rate", "20mbit", "burst", "32kbit",
                       "latency", "30ms"], ns, check=False)
            if out.returncode != 0:
                self.notes.append(f"tbf unavailable: {out.stderr.strip()}")
        if not shutil.which("nft"):
            self.loss_method = "link flaps (nft not installed)"

    def clear_loss(self) -> None:
        assert self.hosts is not None
        for i, ns in enumerate(self.hosts.hosts):
            _sh(["nft", "delete", "table", "inet", "chaos"], ns, check=False) if shutil.which("nft") else None
            _sh(["tc", "qdisc", "del", "dev", f"e{i}", "root"], ns, check=False)

    # ------------------------------------------------------------------ scenarios
    def pick(self, candidates: list[int], k: int = 1) -> list[int] | None:
        options = [c for c in candidates]
        self.rng.shuffle(options)
        for _ in range(20):
            chosen = sorted(self.rng.sample(options, k)) if len(options) >= k else None
            if chosen and self.can_lose(chosen):
                return chosen
        return None

    def scenario_kill_restart(self, end: float) -> None:
        while time.time() < end - 1.0:
            self.sleep(self.rng.uniform(0.8, 2.5))
            down = [i for i in self.nodes if self.nodes[i].state == "down"]
            if down and (self.rng.random() < 0.5 or not self.pick(self.up_nodes())):
                i = self.rng.choice(down)
                if time.time() - self.nodes[i].since > 0.5:
                    self.restart(i, "scheduled")
            else:
                victim = self.pick(self.up_nodes())
                if victim:
                    self.kill(victim[0])

    def scenario_leader_kill(self, end: float) -> None:
        while time.time() < end - 2.0:
            self.sleep(self.rng.uniform(1.0, 2.0))
            if self.not_up():
                self.rejoin_all("round", timeout=10)
                continue
            leader = self.leader()
            others = [i for i in self.up_nodes() if i != leader]
            first = self.pick(others)
            if leader is None or not first or not self.can_lose([first[0], leader]):
                continue
            self.kill(first[0])
            self.sleep(self.rng.uniform(0.3, 1.1))  # the suspicion timeout is 0.6 s: the view change is under way
            leader_now = self.leader()
            self.kill(leader_now if leader_now is not None else leader, "kill_leader")
            self.sleep(self.rng.uniform(1.5, 3.0))
            self.rejoin_all("after leader kill", timeout=15)

    def scenario_partition(self, end: float) -> None:
        while time.time() < end - 2.0:
            self.sleep(self.rng.uniform(1.0, 2.0))
            if self.not_up():
                self.rejoin_all("round", timeout=10)
                continue
            k = self.rng.choice([1, (self.n - 1) // 2]) if self.n >= 5 else 1
            victims = self.pick(self.up_nodes(), k)
            if not victims:
                continue
            mode = self.rng.choice(["isolate", "split"])
            hold = self.rng.uniform(1.5, 3.0)
            self.cut(victims, mode)
            self.fault("partition", nodes=victims, mode=mode)
            iso = {"nodes": victims, "start": time.time(), "end": None, "kind": "partition"}
            self.isolations.append(iso)
            self.sleep(hold)
            self.heal(victims, mode)
            iso["end"] = time.time()
            self.fault("heal", nodes=victims, mode=mode)
            # the minority stopped (partition) or learns it was removed; a member still running is killed
            if not self.wait_until(lambda vs=victims: all(not self.nodes[v].alive() for v in vs), 8):
                for v in victims:
                    if self.nodes[v].alive():
                        self.notes.append(f"node {v} was still running 8 s after its partition healed")
                        self.kill(v, "kill_after_heal")
            self.rejoin_all("after partition", timeout=15)

    def scenario_hang(self, end: float) -> None:
        while time.time() < end - 2.0:
            self.sleep(self.rng.uniform(1.0, 2.0))
            if self.not_up():
                self.rejoin_all("round", timeout=10)
                continue
            victim = self.pick(self.up_nodes())
            if not victim:
                continue
            v = victim[0]
            nd = self.nodes[v]
            assert nd.member is not None
            hold = self.rng.uniform(1.5, 3.0)
            os.killpg(nd.member.proc.pid, signal.SIGSTOP)
            nd.state = "isolated"
            self.fault("sigstop", node=v, incarnation=nd.incarnation, hold=round(hold, 2))
            iso = {"nodes": [v], "start": time.time(), "end": None, "kind": "hang"}
            self.isolations.append(iso)
            self.sleep(hold)
            os.killpg(nd.member.proc.pid, signal.SIGCONT)
            self.fault("sigcont", node=v, incarnation=nd.incarnation)
            removed = self.wait_until(lambda n=nd: not n.alive(), 8)
            iso["end"] = time.time()
            if not removed:
                self.notes.append(f"node {v} still running 8 s after SIGCONT (hung {hold:.1f} s)")
                self.hung_not_removed += 1
                self.kill(v, "kill_after_hang")
            if nd.state == "isolated":
                nd.state = "down"
            self.rejoin_all("after hang", timeout=15)

    def scenario_transfer_kill(self, end: float) -> None:
        """A member restarts; as soon as its join view is installed, the leader of its shard (the member that
        sends it the state transfer) is killed."""
        while time.time() < end - 2.0:
            self.sleep(self.rng.uniform(1.0, 2.0))
            if self.not_up():
                self.rejoin_all("round", timeout=10)
                continue
            view = self.latest_view()
            if view is None:
                continue
            joiner = self.pick([i for i in self.up_nodes() if i != view["members"][0]])
            if not joiner:
                continue
            j = joiner[0]
            self.kill(j)
            self.sleep(self.rng.uniform(1.0, 2.0))
            observer = next(i for i in self.up_nodes() if i % self.shards == j % self.shards or self.shards == 1)
            vid = self.nodes[observer].member.last_vid()
            self.restart(j, "scheduled")
            self.wait_until(lambda o=observer, v=vid, jj=j: any(
                e["vid"] > v and jj in e["members"] for e in self.nodes[o].member.views()), 15)
            self.sleep(self.rng.uniform(0.0, 0.15))
            view = self.latest_view()
            source = next((m for m in (view or {}).get("members", []) if m % self.shards == j % self.shards
                           and m != j and self.nodes[m].state == "up"), None)
            if source is not None and self.can_lose([source]):
                self.kill(source, "kill_transfer_source")
            self.sleep(self.rng.uniform(1.5, 3.0))
            self.rejoin_all("after transfer kill", timeout=30)

    def scenario_loss(self, end: float) -> None:
        self.add_loss(5.0)
        self.fault("loss", percent=5.0, method=self.loss_method, shaper="tbf 20mbit latency 30ms")
        self.sleep(self.rng.uniform(0.3, 0.5) * (end - time.time()))
        victim = self.pick(self.up_nodes())
        if victim:
            self.kill(victim[0])
            self.sleep(self.rng.uniform(1.0, 2.0))
            self.rejoin_all("after kill under loss", timeout=15)
        self.sleep(max(0.0, end - time.time()))
        self.clear_loss()
        self.fault("loss_cleared")

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"chaos harness unavailable: {reason}")
        cleanup_stale()
        old_term = signal.signal(signal.SIGTERM, _raise_abort)
        old_alarm = signal.signal(signal.SIGALRM, _raise_abort)
        signal.alarm(int(self.duration + 240))
        report: dict[str, Any] = {"scenario": self.scenario, "seed": self.seed, "nodes": self.n,
                                  "shards": self.shards, "duration": self.duration, "workdir": str(self.workdir),
                                  "started": self.t0}
        error = None
        try:
            self.hosts = Hosts(self.n, prefix=f"{NS_PREFIX}{os.getpid()}x{secrets.token_hex(2)}")
            self.hosts.__enter__()
            _ip("link", "add", "br1", "type", "bridge", ns=self.hosts.bridge_ns)
            _ip("link", "set", "br1", "up", ns=self.hosts.bridge_ns)
            self.conf_file = self.write_conf()
            self.start(0)
            # node 0 starts the group; with two shards its one-member view is inadequate (shard 1 is empty), so
            # it is neither ready nor reports a view until an odd node joins: start the others after a moment
            started = time.time()
            if not self.wait_until(lambda: self.nodes[0].state == "up" or (
                    self.shards > 1 and time.time() - started > 1.5 and self.nodes[0].alive()), 30, load=False):
                raise RuntimeError(f"node 0 did not start: {''.join(self.nodes[0].member.stderr[-5:])}")
            for i in range(1, self.n):
                self.start(i, 0)
            if not self.wait_until(lambda: not self.not_up() and all(
                    sorted(self.nodes[i].member.views()[-1]["members"]) == list(range(self.n))
                    for i in self.nodes if self.nodes[i].member.views()), 40, load=False):
                raise RuntimeError("the group did not form: " + "; ".join(
                    f"{i}: {nd.state} {''.join(nd.member.stderr[-3:]) if nd.member else ''}"
                    for i, nd in self.nodes.items()))
            self.fault("formed", view=self.latest_view())
            self.sleep(0.5)  # load starts
            end = time.time() + self.duration
            getattr(self, "scenario_" + self.scenario.replace("-", "_"))(end)
            self.sleep(max(0.0, end - time.time()))
            report.update(self.finish())
        except (Abort, KeyboardInterrupt, Exception) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.log(f"run aborted: {error}")
        finally:
            signal.alarm(0)
            try:
                self.collect(report)
            except Exception as exc:  # never let reporting block the cleanup
                report.setdefault("problems", []).append(f"report collection failed: {exc!r}")
            self.cleanup()
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGALRM, old_alarm)
        if error is not None:
            report["error"] = error
            report.setdefault("problems", []).append(f"run error: {error}")
            report["ok"] = False
        report["elapsed"] = round(time.time() - self.t0, 2)
        return report

    def finish(self) -> dict[str, Any]:
        """Heal, restart, let the group settle, stop the load, take digests."""
        assert self.hosts is not None
        for nd in self.nodes.values():
            if nd.member is not None and nd.alive() and nd.state == "isolated":
                os.killpg(nd.member.proc.pid, signal.SIGCONT)
        for i in range(self.n):
            _ip("link", "set", f"b{i}", "nomaster", ns=self.hosts.bridge_ns)
            _ip("link", "set", f"b{i}", "master", "br0", ns=self.hosts.bridge_ns)
            _ip("link", "set", f"b{i}", "up", ns=self.hosts.bridge_ns)
        self.clear_loss()
        self.fault("end_of_faults")
        everyone = list(range(self.n))

        def converged() -> bool:
            if self.not_up():
                return False
            last = [tuple(sorted(self.nodes[i].member.views()[-1]["members"])) for i in everyone]
            vids = {self.nodes[i].member.views()[-1]["vid"] for i in everyone}
            return len(vids) == 1 and all(m == tuple(everyone) for m in last)

        ok = False
        end = time.time() + 45
        while time.time() < end and not ok:
            self.rejoin_all("final", timeout=max(1.0, end - time.time()), load=False)
            ok = self.wait_until(converged, min(10.0, max(0.5, end - time.time())), load=False)
        out: dict[str, Any] = {"converged": ok}
        if not ok:
            self.notes.append("the group did not converge to one view of every member within 45 s")
        live = self.up_nodes()
        marks = {i: len(self.nodes[i].member.events) for i in live}
        for i in live:
            self.nodes[i].member.command("stop")
        for i in live:
            try:
                self.nodes[i].member.event("stop_done", 90, after=marks[i])
            except TimeoutError:
                self.notes.append(f"node {i} did not stop its load within 90 s")
        # digests: the group is quiet; a replica still delivering catches up in a moment
        digests: dict[int, dict[str, Any]] = {}
        for attempt in range(4):
            self.sleep(0.5 if attempt == 0 else 1.5, load=False)
            digests = {}
            for i in self.up_nodes():
                m = self.nodes[i].member
                mark = len(m.events)
                m.command("digest")
                try:
                    digests[i] = m.event("digest", 30, after=mark)
                except TimeoutError:
                    self.notes.append(f"node {i}: no digest")
            by_shard: dict[int, set[tuple[str, str]]] = defaultdict(set)
            for d in digests.values():
                by_shard[d["shard"]].add((d["state"], d["log"]))
            if all(len(s) == 1 for s in by_shard.values()):
                break
        out["digests"] = digests
        return out

    def collect(self, report: dict[str, Any]) -> None:
        digests: dict[int, dict[str, Any]] = report.pop("digests", {}) or {}
        views: dict[str, list[Any]] = {}
        calls = Counter()
        p2p = Counter()
        completed: list[tuple[dict[str, Any], int]] = []
        persisted_version: dict[int, int] = defaultdict(lambda: -1)
        max_seq: dict[tuple[int, int], int] = {}
        internal: list[str] = []
        tails: dict[str, list[str]] = {}
        for i, nd in self.nodes.items():
            members = nd.history + ([nd.member] if nd.member is not None else [])
            vlist = []
            for inc, m in enumerate(members, start=1):
                evs = list(m.events)
                for e in evs:
                    ev = e.get("event")
                    if ev == "view":
                        vlist.append({"t": round(e["time"] - self.t0, 3), "vid": e["vid"], "members": e["members"],
                                      "incarnation": inc})
                    elif ev == "s":
                        calls["sent"] += 1
                        max_seq[(i, inc)] = max(max_seq.get((i, inc), -1), e["seq"])
                    elif ev == "c":
                        calls[e["st"]] += 1
                        if e["st"] != "failed":
                            completed.append((e, i))
                            if not e.get("agree", True):
                                calls["reply_disagreements"] += 1
                    elif ev == "p":
                        p2p["sent"] += 1
                        p2p[e["st"]] += 1
                    elif ev == "persisted":
                        sh = i % self.shards
                        persisted_version[sh] = max(persisted_version[sh], e["v"])
                    elif ev in ("command_failed", "error"):
                        internal.append(f"node {i} inc {inc}: {e}")
                    elif ev == "stopped" and e.get("kind") == "error":
                        internal.append(f"node {i} inc {inc}: stopped with an error: {e.get('reason')}")
                for line in list(m.stderr):
                    if any(mark in line for mark in INTERNAL_ERROR_MARKERS) and \
                            not any(ok in line for ok in EXPECTED_STOPS):
                        internal.append(f"node {i} inc {inc}: {line.strip()[:300]}")
                if m.proc.returncode not in (None, 0, 3, 5, 7, -9):
                    internal.append(f"node {i} inc {inc}: exit status {m.proc.returncode}")
                if any(x.startswith(f"node {i} inc {inc}:") for x in internal):
                    tails[f"{i}/{inc}"] = [line.rstrip() for line in list(m.stderr)[-60:]]
            views[str(i)] = vlist
        report["views"] = views
        report["views_installed"] = sum(len(v) for v in views.values())
        report["faults"] = self.faults
        report["fault_counts"] = dict(Counter(f["kind"] for f in self.faults
                                              if f["kind"] in ("kill", "kill_leader", "restart", "partition", "sigstop",
                                                               "loss", "heal", "sigcont",
                                                               "kill_transfer_source")))
        report["notes"] = self.notes
        report["loss_method"] = self.loss_method
        for d in digests.values():
            sh = d["shard"]
            persisted_version[sh] = max(persisted_version[sh], d.get("frontier") or -1)
        delivered = [c for c, _ in completed]
        calls["delivered"] = len(delivered)  # acked + delivered-with-some-replies-missing
        calls["persisted"] = sum(1 for c in delivered
                                 if c.get("v") is not None and c["v"] <= persisted_version[c["id"][0] % self.shards])
        report["calls"] = {k: calls.get(k, 0) for k in ("sent", "delivered", "acked", "failed", "persisted",
                                                        "reply_disagreements")}
        report["p2p"] = dict(p2p)
        report["final"] = {str(i): {k: d.get(k) for k in ("shard", "n", "chain", "state", "log", "log_len", "version",
                                                          "frontier")} for i, d in digests.items()}
        report["checks"] = self.check(digests, completed, max_seq, views, internal)
        report["internal_errors"] = internal[:50]
        report["stderr_of_failed_members"] = tails
        problems = report.setdefault("problems", [])
        c = report["checks"]
        for key in ("lost_acked", "lost_delivered", "misplaced", "duplicates", "invented", "divergent_replicas",
                    "view_forks", "minority_views", "reply_disagreements", "hung_not_removed"):
            if c.get(key):
                problems.append(f"{key}: {c[key]}")
        if internal:
            problems.append(f"internal errors: {len(internal)}")
        if not report.get("converged", False):
            problems.append("not converged")
        if not digests:
            problems.append("no digests")
        report["ok"] = not problems

    def check(self, digests: dict[int, dict[str, Any]], completed: list[tuple[dict[str, Any], int]],
              max_seq: dict[tuple[int, int], int], views: dict[str, list[Any]], internal: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        by_shard: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
        for i, d in digests.items():
            by_shard[d["shard"]][i] = d
        # identical digests per shard: replicas differing from the most common digest
        divergent = 0
        for reps in by_shard.values():
            counts = Counter((d["state"], d["log"]) for d in reps.values())
            common = counts.most_common(1)[0][1]
            divergent += len(reps) - common
        out["divergent_replicas"] = divergent
        # applied ids per survivor
        positions: dict[int, dict[tuple[int, ...], list[int]]] = {}
        dup = invented = 0
        for i, d in digests.items():
            pos: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for k, ident in enumerate(d.get("applied") or []):
                pos[tuple(ident) if ident else ()].append(k + 1)
            positions[i] = pos
            dup += sum(1 for ps in pos.values() if len(ps) > 1)
            for ident in pos:
                if len(ident) == 3 and ident[2] > max_seq.get((ident[0], ident[1]), -1) + self.window + 1:
                    invented += 1
        out["duplicates"] = dup
        out["invented"] = invented
        lost_acked = lost_delivered = misplaced = 0
        examples: list[str] = []
        for c, _sender in completed:
            ident = tuple(c["id"])
            sh = ident[0] % self.shards
            missing = []
            for i in by_shard.get(sh, {}):
                ps = positions[i].get(ident)
                if not ps:
                    missing.append(i)
                elif c.get("n") is not None and c["n"] not in ps:
                    misplaced += 1
                    if len(examples) < 10:
                        examples.append(f"{list(ident)} acked as n={c['n']} but at {ps} on node {i}")
            if missing:
                lost_delivered += 1
                if c["st"] == "acked":
                    lost_acked += 1
                if len(examples) < 10:
                    examples.append(f"{list(ident)} ({c['st']}, n={c.get('n')}, v={c.get('v')}) missing on {missing}")
        out.update(lost_acked=lost_acked, lost_delivered=lost_delivered, misplaced=misplaced, examples=examples)
        # views: one member list per vid; no view installed by an isolated minority alone
        per_vid: dict[int, set[tuple[int, ...]]] = defaultdict(set)
        installers: dict[tuple[int, tuple[int, ...]], set[int]] = defaultdict(set)
        for node, vlist in views.items():
            for v in vlist:
                key = tuple(v["members"])
                per_vid[v["vid"]].add(key)
                installers[(v["vid"], key)].add(int(node))
        forks = {vid: sorted(list(ms)) for vid, ms in per_vid.items() if len(ms) > 1}
        out["view_forks"] = len(forks)
        out["fork_examples"] = [f"vid {vid}: {ms}" for vid, ms in list(forks.items())[:5]]
        minority = []
        for iso in self.isolations:
            start = iso["start"] - self.t0
            stop = (iso["end"] or time.time()) - self.t0 + 10.0
            inside = set(iso["nodes"])
            for node in inside:
                for v in views.get(str(node), []):
                    if start <= v["t"] <= stop and not (installers[(v["vid"], tuple(v["members"]))] - inside):
                        minority.append(f"node {node} ({iso['kind']} at {start:.2f}) installed vid {v['vid']} "
                                        f"{v['members']} at {v['t']:.2f}, which no majority member installed")
        out["minority_views"] = len(minority)
        out["minority_examples"] = minority[:5]
        out["reply_disagreements"] = sum(1 for c, _ in completed if not c.get("agree", True))
        out["internal_errors"] = len(internal)
        out["hung_not_removed"] = self.hung_not_removed
        return out

    def cleanup(self) -> None:
        for nd in self.nodes.values():
            for m in nd.history + ([nd.member] if nd.member is not None else []):
                if m.proc.poll() is None:
                    try:
                        os.killpg(m.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        if self.hosts is not None:
            self.hosts.__exit__()
        if self.own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------- sweep
def sweep_plan(runs: int, first_seed: int = 1) -> list[tuple[str, int, int]]:
    """``runs`` (scenario, seed, shards) in round-robin order; every 4th round uses two shards."""
    plan = []
    for k in range(runs):
        scenario = SCENARIOS[k % len(SCENARIOS)]
        rnd = k // len(SCENARIOS)
        plan.append((scenario, first_seed + rnd, 2 if rnd % 4 == 3 and scenario != "hang" else 1))
    return plan


def aggregate(reports: list[dict[str, Any]]) -> dict[str, Any]:
    tot: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    per_scenario: dict[str, Counter[str]] = defaultdict(Counter)
    failing = []
    for r in reports:
        c = r.get("checks", {})
        tot["runs"] += 1
        tot["ok"] += bool(r.get("ok"))
        tot["views_installed"] += r.get("views_installed", 0)
        for k in ("lost_acked", "lost_delivered", "misplaced", "duplicates", "invented", "divergent_replicas",
                  "view_forks", "minority_views", "internal_errors", "reply_disagreements", "hung_not_removed"):
            tot[k] += c.get(k, 0) or 0
        tot["not_converged"] += not r.get("converged", False)
        tot["run_errors"] += "error" in r
        tot["total_restarts"] += sum(1 for f in r.get("faults", []) if f.get("kind") == "total_restart")
        faults.update(r.get("fault_counts", {}))
        calls.update({k: v for k, v in r.get("calls", {}).items()})
        calls.update({f"p2p_{k}": v for k, v in r.get("p2p", {}).items()})
        s = per_scenario[r.get("scenario", "?")]
        s["runs"] += 1
        s["ok"] += bool(r.get("ok"))
        if not r.get("ok"):
            failing.append({"scenario": r.get("scenario"), "seed": r.get("seed"), "shards": r.get("shards"),
                            "problems": r.get("problems", []), "notes": r.get("notes", []),
                            "checks": {k: v for k, v in c.items() if v}})
    injected = sum(v for k, v in faults.items() if k in ("kill", "kill_leader", "partition", "sigstop", "loss"))
    return {"totals": dict(tot), "faults_injected": injected, "faults": dict(faults), "calls": dict(calls),
            "per_scenario": {k: dict(v) for k, v in per_scenario.items()}, "failing_runs": failing}


def run_sweep(runs: int, parallel: int, duration: float, nodes: int, runs_dir: Path, first_seed: int,
              deadline: float | None, out_json: Path | None) -> dict[str, Any]:
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = sweep_plan(runs, first_seed)
    reports: list[dict[str, Any]] = []
    running: list[tuple[subprocess.Popen[bytes], Path, float, tuple[str, int, int]]] = []
    started = time.time()
    todo = list(plan)
    stopped_early = False

    def reap(block: bool) -> None:
        for item in list(running):
            proc, path, t, spec = item
            if proc.poll() is None and time.time() - t > duration + 300:
                proc.send_signal(signal.SIGTERM)  # the run cleans up after itself
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    cleanup_stale()
            if proc.poll() is not None:
                running.remove(item)
                try:
                    reports.append(json.loads(path.read_text()))
                except (OSError, json.JSONDecodeError) as exc:
                    reports.append({"scenario": spec[0], "seed": spec[1], "shards": spec[2], "ok": False,
                                    "error": f"no report ({exc})", "problems": [f"no report: {exc}"]})
                r = reports[-1]
                print(f"[{time.time() - started:7.0f}s] {len(reports)}/{runs} {spec[0]} seed={spec[1]} "
                      f"shards={spec[2]} ok={r.get('ok')} {r.get('problems', [])[:3]}", flush=True)
                if out_json is not None:
                    write_aggregate(out_json, reports, runs, duration, nodes, started, partial=True)

    try:
        while todo or running:
            reap(False)
            if deadline is not None and time.time() > deadline and todo:
                stopped_early = True
                todo = []
            while todo and len(running) < parallel:
                scenario, seed, shards = todo.pop(0)
                path = runs_dir / f"{scenario}-{seed}-s{shards}.json"
                cmd = [sys.executable, "-m", "derecho_core.testing.chaos", "--scenario", scenario, "--seed", str(seed),
                       "--nodes", str(nodes), "--duration", str(duration), "--shards", str(shards), "--json", str(path),
                       "--quiet"]
                running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                                path, time.time(), (scenario, seed, shards)))
            time.sleep(0.5)
    finally:
        for proc, _, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _, _ in running:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        cleanup_stale()
    result = write_aggregate(out_json, reports, runs, duration, nodes, started, partial=False,
                             stopped_early=stopped_early)
    return result


def write_aggregate(path: Path | None, reports: list[dict[str, Any]], planned: int, duration: float, nodes: int,
                    started: float, partial: bool, stopped_early: bool = False) -> dict[str, Any]:
    agg = {"planned_runs": planned, "duration_per_run": duration, "nodes": nodes,
           "wall_seconds": round(time.time() - started, 1), "complete": not partial and not stopped_early,
           "stopped_early_by_deadline": stopped_early, **aggregate(reports),
           "runs": [{k: r.get(k) for k in ("scenario", "seed", "shards", "ok", "elapsed", "fault_counts", "calls",
                                           "views_installed", "converged", "loss_method")} for r in reports]}
    if path is not None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(agg, indent=1))
        tmp.replace(path)
    return agg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS + EXTRA_SCENARIOS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of faults (setup and checks add ~15 s)")
    parser.add_argument("--shards", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rate", type=float, default=25.0, help="ordered calls per second per member")
    parser.add_argument("--json", type=Path, help="write the report (or the sweep aggregate) here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) after the run")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--sweep", type=int, metavar="RUNS", help="run RUNS runs round-robin over the scenarios")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path, help="sweep: per-run reports (default: a temporary directory)")
    parser.add_argument("--deadline", type=float, help="sweep: start no run after this many seconds")
    parser.add_argument("--aggregate", type=Path, metavar="DIR",
                        help="aggregate the per-run reports in DIR (a sweep's --runs-dir) into --json")
    args = parser.parse_args(argv)
    if args.aggregate:
        reports = [json.loads(p.read_text()) for p in sorted(args.aggregate.glob("*.json"))]
        agg = write_aggregate(args.json, reports, len(reports), args.duration, args.nodes, time.time(), partial=False)
        print(json.dumps({k: agg[k] for k in ("totals", "faults_injected", "faults", "calls")}, indent=1))
        return 0 if agg["totals"].get("ok", 0) == agg["totals"].get("runs", 0) else 1
    signal.signal(signal.SIGTERM, _raise_abort)
    if args.sweep:
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="chaos-sweep-"))
        deadline = time.time() + args.deadline if args.deadline else None
        try:
            agg = run_sweep(args.sweep, args.parallel, args.duration, args.nodes, runs_dir, args.first_seed,
                            deadline, args.json)
        except (Abort, KeyboardInterrupt):
            print("sweep interrupted", file=sys.stderr)
            return 130
        print(json.dumps({k: agg[k] for k in ("totals", "faults_injected", "faults", "calls")}, indent=1))
        return 0 if agg["totals"].get("ok", 0) == agg["totals"].get("runs", 0) else 1
    if not args.scenario:
        parser.error("--scenario is required (or --sweep)")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = ChaosRun(args.scenario, args.seed, nodes=args.nodes, duration=args.duration, shards=args.shards,
                   rate=args.rate, keep=args.keep, log=log)
    report = run.run()
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    if not args.quiet:
        summary = {k: report.get(k) for k in ("scenario", "seed", "ok", "problems", "calls", "fault_counts",
                                              "views_installed", "converged", "elapsed")}
        summary["checks"] = {k: v for k, v in report.get("checks", {}).items() if not isinstance(v, list)}
        print(json.dumps(summary, indent=1))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
