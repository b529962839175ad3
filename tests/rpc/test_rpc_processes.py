"""Replicated objects across real processes: replies through a crash, state transfer of log tails.

Each member is ``derecho_core.testing.rpc_member`` (a persistent ``Ledger`` in
one shard of the whole view, at least two members) on 127.0.0.1 with ports
chosen at run time.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from derecho_core.testing.processes import LocalGroup

PROGRAM = ["-m", "derecho_core.testing.rpc_member", "--min-shard", "2"]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalGroup]:
    g = LocalGroup(tmp_path, settings={"PERS/file_path": str(tmp_path / "plog")}, program=PROGRAM)
    try:
        yield g
    finally:
        g.close()


def start_three(g: LocalGroup, slow: int | None = None) -> None:
    g.start(0)
    time.sleep(0.2)
    g.start(1)
    if slow is not None:  # this replica's handler takes 2 ms: when it dies, some calls await its reply
        g.program = PROGRAM + ["--handler-delay-ms", "2"]
    g.start(2)
    g.program = PROGRAM
    for m in g.members.values():
        m.wait_for_view([0, 1, 2], 60)


def digest(g: LocalGroup, node: int) -> dict:
    m = g.members[node]
    n = len(m.events)
    m.command("digest")
    return m.event("digest", 60, after=n)


@pytest.mark.timeout(180)
def test_sigkill_during_a_burst_fails_only_the_dead_replicas_futures(group: LocalGroup) -> None:
    start_three(group, slow=2)
    sender = group.members[0]
    calls = 3000
    sender.command(f"burst {calls}")
    time.sleep(0.3)  # the burst is under way (10,000 calls take seconds here)
    os.killpg(group.members[2].proc.pid, signal.SIGKILL)
    burst = sender.event("burst", 150)["replies"]
    for survivor in ("0", "1"):
        assert burst[survivor] == {"ok": calls, "removed": 0, "other": 0}, burst
    dead = burst.get("2", {"ok": 0, "removed": 0, "other": 0})
    assert dead["other"] == 0 and dead["ok"] + dead["removed"] <= calls
    assert dead["removed"] > 0, f"the kill came after the burst ended: {burst}"
    a, b = digest(group, 0), digest(group, 1)
    assert a["value"] == {"n": calls, "total": calls} and a["state"] == b["state"] and a["logs"] == b["logs"]


def run_tail_transfer(group: LocalGroup, pad: int, before: int, after: int) -> None:
    start_three(group)
    leader = group.members[0]
    leader.command(f"pad {pad}")
    leader.event("pad", 60)
    leader.command(f"burst {before}")
    leader.event("burst", 600)
    leader.command("persist")
    leader.event("persisted", 120)
    full_log_bytes = (before + 1) * pad
    group.members[2].kill()
    leader.wait_for_view([0, 1], 60, after_vid=0)
    n = len(leader.events)
    leader.command(f"burst {after}")
    leader.event("burst", 120, after=n)
    rejoined = group.start(2)  # same id, same log directory: it lacks only what happened while it was away
    for m in group.members.values():
        m.wait_for_view([0, 1, 2], 120, after_vid=1)
    digests = {node: digest(group, node) for node in (0, 1, 2)}
    rejoin_vid = rejoined.views()[0]["vid"]
    sent = [t for t in digests[0]["transfers"] + digests[1]["transfers"]
            if t.get("to") == 2 and t["vid"] == rejoin_vid]
    assert len(sent) == 1, digests
    tail_bytes = sent[0]["bytes"]
    assert tail_bytes < (after + 10) * pad + 100_000, (tail_bytes, full_log_bytes)
    assert tail_bytes < full_log_bytes / 4
    assert digests[2]["transfers"][-1]["vid"] == rejoin_vid
    assert digests[0]["logs"]["pad"][1] == before + after + 1  # one entry per update: the log is as big as said
    log_dir = group.workdir / "plog" / "node0"
    assert sum(f.stat().st_size for f in log_dir.rglob("*pad*")) >= full_log_bytes
    want = {"n": before + after, "total": before + after}
    for node, d in digests.items():
        assert d["value"] == want, (node, d)
        assert d["state"] == digests[0]["state"] and d["logs"] == digests[0]["logs"], (node, d, digests[0])
    assert rejoined.proc.poll() is None


@pytest.mark.timeout(240)
def test_rejoining_member_receives_only_the_log_tail_it_lacks(group: LocalGroup) -> None:
    run_tail_transfer(group, pad=50_000, before=200, after=10)  # a 10 MB log; the tail is about 0.5 MB


@pytest.mark.timeout(900)
def test_rejoining_member_of_a_100_mb_log_receives_only_the_tail(group: LocalGroup) -> None:
    run_tail_transfer(group, pad=100_000, before=1000, after=10)
