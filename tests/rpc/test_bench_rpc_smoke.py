"""Smoke run of `derecho bench rpc`: the Derecho and PySyncObj figures in the JSON record, and the data_rpc line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("pysyncobj") is None,
                    reason="pysyncobj is not installed (the baseline of bench rpc; pip install -e '.[bench]')")
def test_bench_rpc_reports_derecho_and_pysyncobj(tmp_path):
    out = subprocess.run([sys.executable, "-m", "derecho_core", "bench", "rpc", "--quick", "--calls", "100",
                          "--latency-calls", "20", "--batched-sync-calls", "1", "--timeout", "120"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "rpc" and record["calls"] == 100 and record["latency_calls"] == 20
    derecho, pso = record["derecho"], record["pysyncobj"]
    assert derecho["complete"] and derecho["consistent"], derecho  # every member replied the same counter value
    assert derecho["calls_per_s"] > 0 and 0 < derecho["p50_us"] <= derecho["p99_us"]
    assert derecho["replies"] == 3 * 100
    assert pso["complete"] and pso["calls_per_s"] > 0 and 0 < pso["p50_us"] <= pso["p99_us"]
    assert pso["batched_p50_us"] > 0
    assert record["ratios"]["pipelined_derecho_over_pysyncobj"] > 0
    assert "derecho ordered_send" in out.stdout and "pysyncobj @replicated" in out.stdout
    fields = (tmp_path / "data_rpc").read_text().split()
    assert fields[:3] == ["3", "100", "100"] and float(fields[3]) > 0 and float(fields[6]) > 0
