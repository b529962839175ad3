"""`derecho bench transport_verbs --quick` runs end to end (numbers are not checked: timing never decides a test)."""

from __future__ import annotations

import argparse
import json

import pytest

from derecho_transport_verbs._testhelpers import requires_tcp

pytestmark = [requires_tcp]


@pytest.mark.timeout(120)
def test_quick_benchmark_runs(tmp_path, capsys):
    bench = pytest.importorskip("derecho_core.benchmarks.transport_verbs")
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    out = tmp_path / "bench.json"
    args = ap.parse_args(["--quick", "--runs", "1", "--iters", "200", "--json", str(out)])
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert "plain-python-sockets" in text and "verbs:tcp" in text
    record = json.loads(out.read_text())
    res = record["results"]
    assert res["verbs:tcp"]["p50_us"] > 0 and res["verbs:tcp RMA"]["stream_1MiB_GBps"] > 0
    assert "ratio_p50_vs_plain" in res["verbs:tcp"]
