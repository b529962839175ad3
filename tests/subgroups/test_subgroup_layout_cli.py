"""`derecho layout` (issue 5, acceptance 3), run in-process through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from derecho_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
GUIDE_LAYOUT = ROOT / "examples" / "plugins" / "guide_allocator" / "derecho_example_guide_allocator" / "layouts.py"
GUIDE_JSON = json.dumps([
    {"type_alias": "Foo", "layout": [{"min_nodes_by_shard": [3, 3], "max_nodes_by_shard": [3, 3]}]},
    {"type_alias": "Bar", "layout": [{"min_nodes_by_shard": [3], "max_nodes_by_shard": [3]},
                                     {"min_nodes_by_shard": [3], "max_nodes_by_shard": [3]}]},
])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["layout", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def shards_of(view: dict, type_name: str) -> list[list[list[int]]]:
    return [[s["members"] for s in sg["shards"]] for sg in view["subgroups"] if sg["type"] == type_name]


def test_guide_example_table(capsys):
    code, out, _ = run_cli(capsys, "--layout", f"{GUIDE_LAYOUT}:subgroup_info", "--members", "0..11")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith(("  Foo", "  Bar"))]
    # TYPE INDEX SUBGROUP SHARD MODE PROFILE MEMBERS... SENDERS
    got = [(r[0], r[1], r[3], " ".join(r[6:-1])) for r in rows]
    assert got == [("Foo", "0", "0", "[0, 1, 2]"), ("Foo", "0", "1", "[3, 4, 5]"),
                   ("Bar", "0", "0", "[6, 7, 8]"), ("Bar", "1", "0", "[9, 10, 11]")]
    assert "next_unassigned_rank 12; idle: (none)" in out


def test_guide_example_json(capsys):
    code, out, _ = run_cli(capsys, "--layout", f"{GUIDE_LAYOUT}:subgroup_info", "-n", "12", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["types"] == ["Foo", "Bar"]
    (view,) = doc["views"]
    assert shards_of(view, "Foo") == [[[0, 1, 2], [3, 4, 5]]]
    assert shards_of(view, "Bar") == [[[6, 7, 8]], [[9, 10, 11]]]
    assert [sg["subgroup_id"] for sg in view["subgroups"]] == [0, 1, 2]
    assert view["next_unassigned_rank"] == 12 and view["adequate"] and view["idle"] == []


def test_same_layout_from_config_json(capsys):
    # The guide's example as a JSON layout given on the command line ([LAYOUT] json_layout, allocator default).
    code, out, _ = run_cli(capsys, "-n", "12", "--json", f"--LAYOUT/json_layout={GUIDE_JSON}")
    assert code == 0, out
    (view,) = json.loads(out)["views"]
    assert shards_of(view, "Foo") == [[[0, 1, 2], [3, 4, 5]]]
    assert shards_of(view, "Bar") == [[[6, 7, 8]], [[9, 10, 11]]]


def test_layout_file_from_config_file(capsys, tmp_path):
    (tmp_path / "layout.json").write_text(GUIDE_JSON)
    cfg = tmp_path / "derecho.cfg"
    cfg.write_text("[LAYOUT]\njson_layout_file = layout.json\n")
    code, out, _ = run_cli(capsys, "--file", str(cfg), "--types", "A,B", "-n", "12", "--json")
    assert code == 0, out
    (view,) = json.loads(out)["views"]
    # a JSON layout serves types by position: --types names the positions
    assert [sg["type"] for sg in view["subgroups"]] == ["A", "B", "B"]
    assert shards_of(view, "A") == [[[0, 1, 2], [3, 4, 5]]]
    # ... and refuses a reordering of its own aliases, which would swap the layouts silently
    code, _, err = run_cli(capsys, "--file", str(cfg), "--types", "Bar,Foo", "-n", "12")
    assert code == 1 and "serves types by position" in err


def test_failures_and_joins_show_following_views(capsys):
    code, out, _ = run_cli(capsys, "--layout", f"{GUIDE_LAYOUT}:subgroup_info", "--members", "0..12",
                           "--fail", "4", "--join", "13", "--change=-0,-1,-2,-3", "--json")
    assert code == 0
    v0, v1, v2, v3 = json.loads(out)["views"]
    assert v0["idle"] == [12]
    # node 4 fails: idle node 12 replaces it, in Foo shard 1
    assert shards_of(v1, "Foo") == [[[0, 1, 2], [3, 5, 12]]]
    assert v1["subgroups"][0]["shards"][1]["joined"] == [12]
    assert v1["subgroups"][0]["shards"][1]["departed"] == [4]
    assert v1["next_unassigned_rank"] == 12 and v1["idle"] == []
    assert v2["members"][-1] == 13 and v2["idle"] == [13]
    # four failures leave 9 members for 12 places: inadequate, not installed
    assert not v3["adequate"] and "needs at least 12" in v3["error"] and v3["subgroups"] == []


def test_inadequate_is_reported_in_the_table(capsys):
    code, out, _ = run_cli(capsys, "--layout", f"{GUIDE_LAYOUT}:subgroup_info", "-n", "12", "--fail", "0",
                           "--join", "12")
    assert code == 0
    assert "view 1 (failed 0): 11 members" in out and "INADEQUATE" in out
    assert "(shards compared with view 0, the last one installed)" in out


@pytest.mark.parametrize("argv, message", [
    (["-n", "3"], "needs a layout"),                                   # default allocator, no JSON
    (["-n", "3", "--allocator", "nope"], "no allocator 'nope'"),
    (["--layout", "no_such_module_xyz:thing", "-n", "3"], "cannot import"),
    (["--layout", f"{GUIDE_LAYOUT}:Foo", "-n", "3"], "not a SubgroupInfo"),
    (["--layout", f"{GUIDE_LAYOUT}:subgroup_info", "--types", "Baz", "-n", "3"], "Baz not in the layout"),
    (["--layout", f"{GUIDE_LAYOUT}:subgroup_info", "--members", "0..x"], "bad node range"),
    (["--layout", f"{GUIDE_LAYOUT}:subgroup_info", "-n", "12", "--fail", "40"], "not a member"),
])
def test_errors_are_one_clear_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert message in err and err.startswith("derecho layout: error:")


def test_command_line_entry_point():
    out = subprocess.run([sys.executable, "-m", "derecho_core", "layout", "--layout",
                          f"{GUIDE_LAYOUT}:subgroup_info", "--members", "0..11"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "[9, 10, 11]" in out.stdout
