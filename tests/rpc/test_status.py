"""``derecho status`` against a running 6-member group (two shards of three), as an external client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from derecho_core.testing.processes import LocalGroup


@pytest.mark.timeout(180)
def test_status_shows_the_view_and_every_shards_frontier(tmp_path: Path) -> None:
    g = LocalGroup(tmp_path, settings={"PERS/file_path": str(tmp_path / "plog")},
                   program=["-m", "derecho_core.testing.rpc_member", "--min-shard", "3", "--shards", "2"])
    try:
        g.start(0)
        time.sleep(0.2)
        for n in range(1, 6):
            g.start(n)
        for m in g.members.values():
            m.wait_for_view(range(6), 90)
        for n in range(6):  # every member sends, so both shards have versions
            g.members[n].command("burst 20")
        for n in range(6):
            g.members[n].event("burst", 60)
            g.members[n].command("persist")
            g.members[n].event("persisted", 60)
        contact = f"127.0.0.1:{g.ports_of(0)['external_port']}"
        out = subprocess.run([sys.executable, "-m", "derecho_core", "status", "--contact", contact, "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["vid"] == g.members[0].last_vid() and status["adequately_provisioned"]
        assert sorted(m["id"] for m in status["members"]) == list(range(6)) and not status["unreachable"]
        shards = status["subgroups"][0]["shards"]
        assert len(shards) == 2 and sorted(n for s in shards for n in s["members"]) == list(range(6))
        for shard in shards:
            assert len(shard["members"]) == 3 and shard["mode"] == "ORDERED"
            assert set(shard["progress"]) == {str(n) for n in shard["members"]}
            persisted = [p["persisted"] for p in shard["progress"].values()]
            assert shard["global_persisted"] >= 0 and shard["global_persisted"] <= max(persisted)
            assert all(p["delivered"] >= shard["global_persisted"] for p in shard["progress"].values())
            assert shard["stability_frontier_us"] > 0
        assert status["recent_views"][-1]["vid"] == status["vid"]
        table = subprocess.run([sys.executable, "-m", "derecho_core", "status", "--contact", contact],
                               capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
        assert table.returncode == 0 and f"view {status['vid']}" in table.stdout, table.stdout + table.stderr
        bad = subprocess.run([sys.executable, "-m", "derecho_core", "status", "--contact", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "cannot reach a member at 127.0.0.1:1" in bad.stderr
    finally:
        g.close()
