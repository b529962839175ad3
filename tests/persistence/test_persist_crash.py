"""Crash safety: SIGKILL a process that appends and persists, at random moments, many times.

Every reopen must yield a prefix of what was appended (consecutive versions,
each with the bytes the child wrote) that holds every entry the child
reported persisted before it died.
"""

from __future__ import annotations

import logging
import os
import random
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


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_leaves_a_valid_prefix(tmp_path, caplog):
    rng = random.Random(20261128)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")]))
    durable = -1  # every version up to this one must survive
    kills = kills_while_running = cuts = 0
    deadline = time.monotonic() + BUDGET_S
    proc = None
    try:
        while kills < KILLS and time.monotonic() < deadline:
            proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path), str(rng.randrange(1 << 30))],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            # mostly while appending; sometimes during start-up and recovery
            time.sleep(rng.uniform(0.0, 0.06) if rng.random() < 0.15 else rng.uniform(0.12, 0.3))
            proc.kill()  # SIGKILL
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == -9, err.decode()
            kills += 1
            reported = [int(line.split()[1]) for line in out.decode().splitlines() if line.startswith("p ")]
            if reported:
                kills_while_running += 1
                durable = max(durable, max(reported))

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
                log = FileLogStore(tmp_path, "crash")
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
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert kills >= 50, f"only {kills} kills in {BUDGET_S} s"
    assert kills_while_running >= 40
    assert durable > 0
    print(f"{kills} kills ({kills_while_running} while appending), {cuts} torn tails cut, "
          f"log reached version {durable}")
