"""``derecho bench persistence --quick`` runs and prints its table and JSON record (timings are not checked)."""

from __future__ import annotations

import json

import pytest

from derecho_core.cli import main


@pytest.mark.timeout(60)
def test_bench_persistence_quick(tmp_path, capsys):
    rc = main(["bench", "persistence", "--quick", "--time-entries", "2000", "--queries", "200",
               "--dir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "file/plain" in out and "file/sqlite" in out and "get_by_time on 2,000 entries" in out
    record = json.loads(out.split("JSON ", 1)[1])
    assert record == json.loads((tmp_path / "out.json").read_text())
    assert {r["size"] for r in record["results"]} == {64, 65536}
    for r in record["results"]:
        assert r["file"]["appends_per_s"] > 0 and r["plain"]["appends_per_s"] > 0 and r["sqlite"]["appends_per_s"] > 0
