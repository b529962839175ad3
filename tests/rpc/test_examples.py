"""The guide's example programs, each run by ``derecho demo NAME`` as a group of local processes.

Each test starts the example's processes (free ports, a scratch directory per
node), checks that every node exited 0 and that the lines that matter are in
the output: every ``contains`` reply true, the value a non-member read by
p2p, identical logs on every replica, the temporal query answers. About 3 s
per example on a 2-core machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO_TIMEOUT = 60


def demo(tmp_path: Path, *args: str, timeout: float = DEMO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DERECHO_CONF_FILE", "DERECHO_NODE_CONF_FILE")}
    return subprocess.run([sys.executable, "-m", "derecho_core", "demo", "--timeout", str(DEMO_TIMEOUT), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout + 20)


def finished(out: subprocess.CompletedProcess[str], name: str, nodes: int) -> str:
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert f"derecho demo: {name}: all {nodes} nodes exited 0" in out.stdout, out.stdout[-2000:]
    assert "CHECK FAILED" not in out.stdout, out.stdout
    for node in range(nodes):
        assert f"[node {node}] done in " in out.stdout and f"[node {node}] Finished constructing/joining Group" \
            in out.stdout, out.stdout
    return out.stdout


def lines_of(text: str, node: int) -> list[str]:
    prefix = f"[node {node}] "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def layout(text: str) -> tuple[list[int], list[int], list[int]]:
    """Foo, Bar and Cache members as every node printed them (nodes join in any order: ranks vary)."""
    found = set(re.findall(r"Foo members \[(.*)\], Bar members \[(.*)\], Cache members \[(.*)\]", text))
    assert len(found) == 1, found  # every node saw the same layout
    foo, bar, cache = ([int(x) for x in part.split(", ")] for part in found.pop())
    return foo, bar, cache


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_simple_replicated_objects(tmp_path):
    text = finished(demo(tmp_path, "simple_replicated_objects"), "simple_replicated_objects", 6)
    foo, bar, cache = layout(text)
    assert foo == bar == [0, 1, 2] and sorted(cache) == [3, 4, 5]  # Foo and Bar reserve nodes 0-2
    assert text.count("Foo members [0, 1, 2], Bar members [0, 1, 2]") == 6
    # ordered_send(contains) from the third Cache member: one reply per Cache member, every one true
    checker = lines_of(text, cache[2])
    assert sorted(line for line in checker if "contains reply" in line) == [
        f"  contains reply from node {n}: true" for n in (3, 4, 5)]
    assert "Every replica contains Ken: true" in checker
    # p2p_send(get) from node 0, which is not in the Cache subgroup
    assert "  Response: Ken = Birman" in lines_of(text, 0)
    # the reply maps of change_state hold the three Foo members
    for node in (0, 1):
        assert sorted(line for line in lines_of(text, node) if line.startswith("Reply from node")) == [
            f"Reply from node {n} was true" for n in range(3)]
    # ordered reads: the replicas agree
    states = re.findall(r"\[node 2\] Node (\d) says the state is: (-?\d+)", text)
    assert sorted(n for n, _ in states) == ["0", "1", "2"] and len({s for _, s in states}) == 1, text
    assert states[0][1] in ("1", "3")
    logs = re.findall(r"Node \d says the log is: (.*)", text)
    assert len(logs) == 3 and len(set(logs)) == 1 and all(f"Write from {r}..." in logs[0] for r in range(3))
    # p2p_send(read_state) from the second Cache member, which is not in the Foo subgroup
    assert re.fullmatch(r"  Response: [13]", next(line for line in lines_of(text, cache[1])
                                                   if line.startswith("  Response")))


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_overlapping_replicated_objects(tmp_path):
    text = finished(demo(tmp_path, "overlapping_replicated_objects"), "overlapping_replicated_objects", 6)
    foo, bar, cache = layout(text)
    assert foo == bar and sorted(foo + cache) == list(range(6))  # Foo and Bar on the same three nodes
    finder = lines_of(text, cache[0])
    assert "..found!" in finder
    assert sorted(line for line in finder if line.startswith("  Reply from node")) == [
        f"  Reply from node {n}: true" for n in sorted(cache)]
    kens = re.findall(r"Node (\d) had Ken = (\w+)", text)
    assert sorted(int(n) for n, _ in kens) == sorted(cache) and len({v for _, v in kens}) == 1
    assert kens[0][1] in ("Birman", "Woodberry")
    assert sorted(int(n) for n in re.findall(r"Node (\d) says the state is: 3", text)) == sorted(foo)
    response = next(line for line in lines_of(text, cache[1]) if line.startswith("  Response"))
    assert response in ("  Response: 3", "  Response: -1")


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_persistent_typed_subgroup(tmp_path):
    text = finished(demo(tmp_path, "persistent_typed_subgroup"), "persistent_typed_subgroup", 3)
    logs = [next(line for line in lines_of(text, node) if line.startswith("log: ")) for node in range(3)]
    assert len(set(logs)) == 1, logs  # every replica has the same versions with the same values
    values = [entry.split("=")[1] for entry in logs[0].split()[1:]]
    assert len(values) == 4 and values[-3:] == ["3", "3", "7"], logs[0]
    for node in range(3):
        assert "current value *pint = 7" in lines_of(text, node)
        assert any(line.startswith("global persistence frontier ") for line in lines_of(text, node))
    assert "is on disk on every member" in text
    assert "is persisted on every member" in text


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_persistent_temporal_query(tmp_path):
    text = finished(demo(tmp_path, "persistent_temporal_query"), "persistent_temporal_query", 3)
    for node in range(3):
        lines = lines_of(text, node)
        for value in (1, 2, 3):
            assert any(line.startswith(f"get_by_time(t{value}) = {value} (version ") for line in lines), lines
        assert "get_by_time(t0) = (no version yet: InvalidTimestampError)" in lines
        assert "get_by_time(frontier + 1 s) raises VersionNotStableError, as it should" in lines
        assert any(line.startswith("stability frontier ") and "passed t3" in line for line in lines)


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
@pytest.mark.parametrize("mode", ["ordered", "unordered"])
def test_random_messages(tmp_path, mode):
    args = ["random_messages"] + (["--", "--unordered"] if mode == "unordered" else [])
    text = finished(demo(tmp_path, *args), "random_messages", 3)
    for node in range(3):
        lines = lines_of(text, node)
        assert "received 30 messages from 3 senders: 0: 10, 1: 10, 2: 10" in lines
        got = [line for line in lines if line.startswith("sender id ")]
        assert len(got) == 30 and all(re.fullmatch(r"sender id \d: [a-z]{10} \(index \d+, version -?\d+\)", g)
                                      for g in got)
        if mode == "unordered":
            assert all(g.endswith("version -1)") for g in got)
    if mode == "ordered":
        digests = re.findall(r"delivery order digest (\w+)", text)
        assert len(digests) == 3 and len(set(digests)) == 1, digests  # the same order everywhere


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_external_client(tmp_path):
    out = demo(tmp_path, "external_client")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "derecho demo: external_client: all 4 nodes exited 0" in out.stdout and "CHECK FAILED" not in out.stdout
    client = lines_of(out.stdout, 3)
    assert sorted(line for line in client if line.startswith("p2p_send get('Ken')")) == [
        f"p2p_send get('Ken') to node {n}: Birman" for n in (0, 1, 2)]
    assert any(line.startswith("notification: {'from': 0") for line in client), client


@pytest.mark.timeout(60)
def test_demo_list_and_errors(tmp_path):
    out = demo(tmp_path, "--list")
    assert out.returncode == 0, out.stderr
    for name in ("simple_replicated_objects", "overlapping_replicated_objects", "persistent_typed_subgroup",
                 "persistent_temporal_query", "random_messages", "external_client"):
        assert re.search(rf"^  {name} +\d nodes ", out.stdout, re.M), out.stdout
    out = demo(tmp_path, "no_such_example")
    assert out.returncode == 2 and "no example 'no_such_example'" in out.stderr
    out = demo(tmp_path, "--list", "--examples-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and f"no examples folder at {tmp_path / 'nowhere'}" in out.stderr
    # too few nodes: every node refuses, and the demo fails
    out = demo(tmp_path, "simple_replicated_objects", "--nodes", "2")
    assert out.returncode == 1 and "this example needs 6 nodes" in out.stdout
    assert "failed: exit status by node {0: 2, 1: 2}" in out.stderr
