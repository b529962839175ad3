"""Smoke runs of `derecho bench bandwidth` and `latency`: Derecho's result lines and the JSON record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "derecho_core", "bench", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_bandwidth_writes_derecho_line_and_baseline(tmp_path):
    out = bench(tmp_path, "bandwidth", "3", "0", "200", "0", "--size", "100")
    assert out.returncode == 0, out.stderr[-3000:]
    fields = (tmp_path / "data_derecho_bw").read_text().split()
    assert fields[:6] == ["3", "0", "100", "16", "200", "0"] and float(fields[6]) > 0
    record = json.loads(out.stdout.strip().splitlines()[-1])
    result = record["results"][0]
    assert result["complete"] and result["baseline_socket_GBps"] > 0 and result["ratio"] > 0


@pytest.mark.timeout(300)
def test_latency_one_sender_raw(tmp_path):
    out = bench(tmp_path, "latency", "3", "2", "100", "1", "--size", "64", "--no-baseline")
    assert out.returncode == 0, out.stderr[-3000:]
    fields = (tmp_path / "data_latency").read_text().split()
    assert fields[:6] == ["3", "2", "64", "16", "100", "1"] and float(fields[6]) > 0
