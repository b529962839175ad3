"""Total restart from logs (spec §3.10) with real processes: everyone killed, some missing, stale logs,
a restart leader dying. Members are ``derecho_core.testing.rpc_member`` (a persistent Ledger in one shard
of the whole view, at least two members)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from derecho_core.testing.processes import LocalGroup, Member

PROGRAM = ["-m", "derecho_core.testing.rpc_member", "--min-shard", "2"]


def make_group(tmp_path: Path, **settings: Any) -> LocalGroup:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return LocalGroup(tmp_path, settings={"PERS/file_path": str(tmp_path / "plog"),
                                          "DERECHO/restart_timeout_ms": 1000, **settings}, program=PROGRAM)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalGroup]:
    g = make_group(tmp_path)
    try:
        yield g
    finally:
        g.close()


def start(g: LocalGroup, nodes: list[int], expect: list[int] | None = None, after_vid: int = -1) -> None:
    for i, n in enumerate(nodes):
        g.start(n)
        if i == 0:
            time.sleep(0.2)
    for n in nodes:
        g.members[n].wait_for_view(expect or nodes, 60, after_vid=after_vid)


def kill_all(g: LocalGroup) -> None:
    for m in list(g.members.values()):
        if m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
    for m in list(g.members.values()):
        m.proc.wait(10)


def digest(g: LocalGroup, node: int) -> dict[str, Any]:
    m = g.members[node]
    n = len(m.events)
    m.command("digest")
    return m.event("digest", 60, after=n)


def assert_identical(g: LocalGroup, nodes: list[int]) -> dict[str, Any]:
    ds = {n: digest(g, n) for n in nodes}
    first = ds[nodes[0]]
    for n, d in ds.items():
        assert d["value"] == first["value"] and d["logs"] == first["logs"], (n, d, first)
    return first


@pytest.mark.timeout(240)
def test_all_killed_under_load_restart_in_the_next_vid_with_every_durable_update(group: LocalGroup) -> None:
    start(group, [0, 1, 2])
    leader = group.members[0]
    leader.command("stream 100000")
    leader.wait_for(lambda evs: sum(e.get("event") == "durable" for e in evs) >= 8, 120)
    kill_all(group)  # mid-stream: calls in flight, some delivered but not persisted everywhere
    durable = max(e["n"] for e in leader.events if e.get("event") == "durable")
    last_vid = max(e["vid"] for e in leader.views())
    start(group, [0, 1, 2], after_vid=-1)
    for n in (0, 1, 2):
        view = group.members[n].views()[0]
        assert view["vid"] == last_vid + 1 and sorted(view["members"]) == [0, 1, 2]
    d = assert_identical(group, [0, 1, 2])
    assert d["value"]["n"] >= durable, (d, durable)
    assert d["logs"]["state"][1] == d["value"]["n"]  # one log entry per update, none lost or doubled


@pytest.mark.timeout(240)
def test_restart_with_one_member_missing_then_it_catches_up(group: LocalGroup) -> None:
    start(group, [0, 1, 2])
    group.members[0].command("burst 200")
    group.members[0].event("burst", 60)
    group.members[0].command("persist")
    group.members[0].event("persisted", 60)
    kill_all(group)
    start(group, [0, 1])  # quorum: 2 of 3 once the restart window ends
    for n in (0, 1):
        assert sorted(group.members[n].views()[0]["members"]) == [0, 1]
    group.members[1].command("burst 50")
    group.members[1].event("burst", 60)
    vid = group.members[0].last_vid()
    group.start(2)  # its saved view is older: it joins the running group and receives the tail
    for n in (0, 1, 2):
        group.members[n].wait_for_view([0, 1, 2], 60, after_vid=vid)
    d = assert_identical(group, [0, 1, 2])
    assert d["value"] == {"n": 250, "total": 250}
    # derecho log shows what a restart would start from: the saved view and the group's identity
    out = subprocess.run([sys.executable, "-m", "derecho_core", "log", "--path",
                          str(group.workdir / "plog" / "node2"), "--json", "saved"],
                         capture_output=True, text=True, timeout=60)
    saved = json.loads(out.stdout)["saved"]
    assert saved["vid"] == group.members[2].last_vid() and sorted(saved["members"]) == [0, 1, 2], out


@pytest.mark.timeout(240)
def test_logs_of_another_group_are_refused_until_reset(tmp_path: Path) -> None:
    old = make_group(tmp_path / "old")
    try:
        start(old, [0, 1, 2])
        old.members[0].command("burst 20")
        old.members[0].event("burst", 60)
        old.members[0].command("persist")
        old.members[0].event("persisted", 60)
        kill_all(old)
    finally:
        old.close()
    new = make_group(tmp_path / "new")
    try:
        start(new, [0, 1])
        new.members[0].command("burst 7")
        new.members[0].event("burst", 60)
        # node 2 of the new group finds the old group's logs in its directory
        shutil.copytree(tmp_path / "old" / "plog" / "node2", tmp_path / "new" / "plog" / "node2")
        intruder = new.start(2)
        assert intruder.proc.wait(60) != 0
        err = "".join(intruder.stderr)
        assert "WRONG_GROUP" in err and "PERS/reset = true" in err and str(tmp_path / "new" / "plog") in err, err
        assert new.members[0].last_vid() == new.members[0].views()[-1]["vid"]  # the group carried on
        fresh = Member(2, new.ports_of(2), new.conf_file, ["--PERS/reset=true"], program=PROGRAM)
        new.retired.append(fresh)
        fresh.wait_for_view([0, 1, 2], 60)
        new.members[2] = fresh
        d = assert_identical(new, [0, 1, 2])
        assert d["value"] == {"n": 7, "total": 7}  # the new group's state, none of the old one's
    finally:
        new.close()


@pytest.mark.timeout(240)
def test_a_restart_leader_killed_during_the_restart_is_replaced_by_the_next(tmp_path: Path) -> None:
    g = make_group(tmp_path)
    try:
        start(g, [0, 1, 2])
        ports = {n: g.ports_of(n)["gms_port"] for n in (0, 1, 2)}
        g.members[0].command("burst 30")
        g.members[0].event("burst", 60)
        g.members[0].command("persist")
        g.members[0].event("persisted", 60)
        last_vid = g.members[0].last_vid()
        kill_all(g)
        # restart with two leaders in order, backups on, and a long window so the kill lands inside it
        g.settings.update({"DERECHO/restart_leaders": "127.0.0.1,127.0.0.1",
                           "DERECHO/restart_leader_ports": f"{ports[0]},{ports[1]}",
                           "DERECHO/enable_backup_restart_leaders": "true",
                           "DERECHO/restart_timeout_ms": 1500})
        g.write_conf()
        g.start(0)
        time.sleep(0.3)
        g.start(2)
        time.sleep(0.5)  # node 0 leads the restart, node 2 has joined it, the window is still open
        g.members[0].kill()
        g.start(1)       # node 1 finds leader 0 silent, takes over as the next leader; node 2 follows
        for n in (1, 2):
            view = g.members[n].wait_for_view([1, 2], 90)
            assert view["vid"] == last_vid + 1
        d = assert_identical(g, [1, 2])
        assert d["value"] == {"n": 30, "total": 30}
    finally:
        g.close()
