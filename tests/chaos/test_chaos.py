"""Chaos runs: real members in network namespaces under seeded faults; DESIGN §5 checked after each run.

The short runs are part of ``make test`` when run as root (skipped with the reason otherwise); the sweep of
200+ runs is ``@pytest.mark.slow`` (``make test-long``). See docs/chaos.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from derecho_core.testing.chaos import SCENARIOS, ChaosRun, run_sweep
from derecho_core.testing.netns import netns_unavailable_reason

REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

SAFETY = ("lost_acked", "lost_delivered", "misplaced", "duplicates", "invented", "divergent_replicas", "view_forks",
          "minority_views", "reply_disagreements", "internal_errors")


# pytest-timeout's default (signal) method shares SIGALRM with the harness's own hard limit: use the thread method
@pytest.mark.timeout(170, method="thread")
@pytest.mark.parametrize("scenario", ["kill-restart", "partition", "hang"])
def test_short_chaos_run_keeps_every_guarantee(scenario: str, tmp_path: Path) -> None:
    report = ChaosRun(scenario, seed=1, duration=8, workdir=tmp_path / "work").run()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    checks = report["checks"]
    for key in SAFETY:
        assert checks[key] == 0, (key, checks, report["problems"])
    assert report["ok"], (report["problems"], report["notes"])
    assert report["converged"]
    assert report["calls"]["acked"] > 0 and report["views_installed"] > report["nodes"]
    injected = {f["kind"] for f in report["faults"]}
    assert injected & {"kill", "partition", "sigstop"}, report["faults"]
    digests = {(d["state"], d["log"]) for d in report["final"].values()}
    assert len(report["final"]) == report["nodes"] and len(digests) == 1


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600, method="thread")
def test_sweep_of_200_runs_loses_nothing_and_never_diverges(tmp_path: Path) -> None:
    runs = 40 * len(SCENARIOS)
    agg = run_sweep(runs, parallel=2, duration=10, nodes=5, runs_dir=tmp_path / "runs", first_seed=1,
                    deadline=None, out_json=tmp_path / "aggregate.json")
    totals = agg["totals"]
    assert totals["runs"] == runs >= 200
    for key in ("lost_acked", "lost_delivered", "divergent_replicas", "minority_views", "view_forks",
                "duplicates", "misplaced", "internal_errors"):
        assert totals[key] == 0, (key, agg["failing_runs"][:5])
    assert agg["faults_injected"] >= runs
