"""Crash safety: SIGKILL a process that appends and persists, at random moments, many times.

Every reopen must yield a prefix of what was appended (consecutive versions,
each with the bytes the child wrote) that holds every entry the child
reported persisted before it died.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from derecho_storage_file import FileLogStore
from persist_crash_child import payload

CHILD = Path(__file__).with_name("persist_crash_child.py")
KILLS = 60
BUDGET_S = 45.0


def _wait_for_open(outfile: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outfile.exists() and b"open" in outfile.read_bytes():
            return
        time.sleep(0.001)
    raise AssertionError(f"the child never opened its log: {outfile.read_text() if outfile.exists() else ''}")


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_leaves_a_valid_prefix(tmp_path, caplog):
    rng = random.Random(20261128)
    logdir, outfile = tmp_path / "plog", tmp_path / "child.out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")]))
    errfile = (tmp_path / "zygote.err").open("w")
    zygote = subprocess.Popen([sys.executable, str(CHILD), str(logdir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=errfile, text=True, env=env)

    def answer() -> str:
        line = zygote.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote died: {(tmp_path / 'zygote.err').read_text()}")
        return line

    durable = -1  # every version up to this one must survive
    kills = while_running = during_open = persists_seen = cuts = 0
    deadline = time.monotonic() + BUDGET_S
    try:
        while kills < KILLS and time.monotonic() < deadline:
            zygote.stdin.write(f"run {rng.randrange(1 << 30)} {outfile}\n")
            zygote.stdin.flush()
            pid = int(answer())
            if rng.random() < 0.15:  # during start-up: opening, recovering, the first appends
                time.sleep(rng.uniform(0, 0.003))
                during_open += 1
            else:  # while appending and persisting
                _wait_for_open(outfile)
                time.sleep(rng.uniform(0.002, 0.08))
                while_running += 1
            os.kill(pid, signal.SIGKILL)
            status = int(answer().split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            kills += 1
            reported = [int(line.split()[1]) for line in outfile.read_text().splitlines() if line.startswith("p ")]
            if reported:
                persists_seen += 1
                durable = max(durable, max(reported))

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
                log = FileLogStore(logdir, "crash")
            try:
                cuts += bool(log.recovery["cut_bytes"])
                entries = list(log)
                got = [e.version for e in entries]
                first = got[0] if got else log.latest_version + 1
                assert got == list(range(first, first + len(got))), "not a prefix: versions skip"
                assert log.latest_version >= durable, (f"kill {kills}: entries up to {durable} were reported "
                                                       f"persisted but the log ends at {log.latest_version}")
                for e in entries:
                    assert e.data == payload(e.version), f"version {e.version}: wrong bytes"
                    assert e.timestamp.rtc_us == e.version
                durable = log.latest_version  # recovery made everything it kept durable
            finally:
                log.close()
    finally:
        zygote.stdin.close()
        try:
            zygote.wait(timeout=10)
        except subprocess.TimeoutExpired:
            zygote.kill()
            zygote.wait()
        errfile.close()
    print(f"{kills} kills ({while_running} while appending, {during_open} during start-up), "
          f"{persists_seen} after a reported persist, {cuts} torn tails cut, log reached version {durable}")
    assert kills >= 50, f"only {kills} kills in {BUDGET_S} s"
    assert while_running >= 40
    assert durable > 0
