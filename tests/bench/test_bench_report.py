"""`derecho bench report --quick`: one Markdown page whose plots exist and are PNGs; `bench all` leaves it out."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"bandwidth_transports.png", "bandwidth_rdmc.png", "latency_cdf.png", "persistence.png", "rpc.png"}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), f"{path.name} is truncated (no IEND chunk)"
    return width, height


@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed: the report's plots need the bench extra "
                           "(pip install -e '.[bench]', or make bench)")
def test_quick_report_writes_a_page_with_valid_pngs(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "derecho_core", "bench", "report", "--quick", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=290)
    log = (out / "log.txt").read_text()[-4000:] if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log
    page = (out / "index.md").read_text()
    assert page.startswith("# Benchmark report")
    for section in ("## Machine", "## Headlines", "## Transports", "## Multicast bandwidth", "## Multicast latency",
                    "## Persistence", "## View changes", "## RPC"):
        assert section in page, section
    assert "## Problems" not in page, page
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page)
    assert set(images) == PLOTS, images
    for name in images:
        assert "/" not in name  # next to index.md: a relative link that works in the docs site too
        width, height = _png_size(out / name)
        assert width > 200 and height > 200, (name, width, height)
    assert not (out / ".work").exists(), "the benchmarks' scratch folder was left behind"

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["machine"]["cores"] >= 1
    records = {s["key"]: s["record"] for s in results["steps"]}
    assert all(records.values()), [k for k, r in records.items() if not r]
    assert {"transport", "persistence", "latency-sockets", "viewchange", "rpc"} <= set(records)
    latency = records["latency-sockets"]
    assert len(latency["samples_us"]) == 3 * latency["num_messages"]  # every message of every sender: the CDF
    assert latency["baseline_socket_rtt_samples_us"]
    assert "derecho bench report" in proc.stdout and "index.md" in proc.stdout


def test_report_is_a_command_but_not_part_of_bench_all() -> None:
    from derecho_core.benchmarks import report
    from derecho_core.cli import build_parser

    assert report.IN_ALL is False
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = commands.choices["bench"]
    names = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    assert "report" in names.choices and "all" in names.choices
    all_help = next(c.help for c in names._choices_actions if c.dest == "all")
    assert "transport" in all_help and "report" not in all_help, all_help


def test_report_refuses_unknown_parts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "derecho_core", "bench", "report", "--only", "transport,nope",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr
    assert not (tmp_path / "r").exists()
