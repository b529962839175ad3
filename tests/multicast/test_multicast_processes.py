"""Three real processes multicasting 10,000 messages each, one SIGKILLed mid-stream (multicast acceptance 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from derecho_core.testing.processes import free_ports

COUNT = 10_000


class McMember:
    def __init__(self, node: int, ports: list[int], contact: int, out: Path, extra: list[str]) -> None:
        self.node = node
        self.out = out
        self.events: list[dict] = []
        self.stderr: list[str] = []
        args = [sys.executable, "-m", "derecho_core.testing.mc_member", "--out", str(out), "--count", str(COUNT),
                "--members", "3", f"--DERECHO/local_id={node}", "--DERECHO/contact_ip=127.0.0.1",
                f"--DERECHO/contact_port={contact}", f"--DERECHO/gms_port={ports[0]}",
                f"--DERECHO/state_transfer_port={ports[1]}", f"--DERECHO/sst_port={ports[2]}",
                f"--DERECHO/rdmc_port={ports[3]}", f"--DERECHO/external_port={ports[4]}",
                "--DERECHO/heartbeat_ms=50", "--DERECHO/suspicion_timeout_ms=2000",
                "--LOGGER/default_log_level=warning", *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc.stdout, self.events), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True).start()

    @staticmethod
    def _read(stream, sink):
        for line in stream:
            try:
                sink.append(json.loads(line) if sink is not None and line.startswith("{") else line)
            except json.JSONDecodeError:
                sink.append(line)

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if isinstance(e, dict) and e.get("event") == name:
                    return e
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node {self.node}: no {name!r} within {timeout} s; stderr: {''.join(self.stderr[-20:])}")

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [100, 3000], ids=["smc", "rdmc"])
def test_three_senders_one_killed_mid_stream(tmp_path, size):
    ports = [free_ports(5) for _ in range(3)]
    extra = ["--size", str(size)]
    if size > 1000:  # force RDMC: small SMC limit, 1 KB blocks relayed along the binomial pipeline
        extra += ["--SUBGROUP/DEFAULT/max_smc_payload_size=1000", "--SUBGROUP/DEFAULT/block_size=1024"]
    members = []
    try:
        for node in range(3):
            members.append(McMember(node, ports[node], ports[0][0], tmp_path / f"d{node}.txt", extra))
            time.sleep(0.3)
        for m in members:
            m.wait_event("ready", 60)
        # kill node 2 once the stream is well under way
        deadline = time.monotonic() + 120
        while len(members[2].lines()) < 2000 and time.monotonic() < deadline and members[2].proc.poll() is None:
            time.sleep(0.01)
        members[2].stop(signal.SIGKILL)
        for m in members[:2]:
            m.wait_event("delivered_own", 180)
        # both survivors' messages must all arrive at both survivors
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = [sum(1 for line in m.lines() if line.split()[3].split(":")[0] in ("0", "1"))
                      for m in members[:2]]
            if counts == [2 * COUNT, 2 * COUNT]:
                break
            time.sleep(0.1)
        for m in members[:2]:
            m.stop()
        a, b = members[0].lines(), members[1].lines()
        assert a == b, "the survivors delivered different sequences"
        ids = [line.split()[3] for line in a]
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        for node in (0, 1):
            mine = {f"{node}:{i}" for i in range(COUNT)}
            assert mine <= set(ids), f"node {node}'s messages missing: {len(mine - set(ids))}"
        from_killed = [i for i in ids if i.startswith("2:")]
        assert from_killed, "node 2's messages before the kill should be delivered"
        versions = [int(line.split()[2]) for line in a]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
    finally:
        for m in members:
            m.stop(signal.SIGKILL)
