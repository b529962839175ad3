"""Bounded memory under overload (issue "Reliability and security", part 5; docs/memory.md).

Three member processes on 127.0.0.1 share one ORDERED shard. Node 1 multicasts as fast as it can while
node 2 is slow, and the test samples every member's RSS (``/proc/PID/status``: VmRSS every 0.1 s, and
the kernel's own peak, VmHWM, at the end). Each member's peak is compared with the bound
``derecho_core.testing.overload.memory_bound`` computes from window_size, max_payload_size, the shard
size, MAX_QUEUED_SENDS, the transport's limits and the member's idle RSS. There are two ways to be slow:

* **a stopped receiver**: SIGSTOP for 1 s out of every 1.5 s (under the failure-detection timeouts).
  The window pushes back on the sender: memory stays bounded.
* **a slow delivery handler** (2 ms per message; a slow disk is the same, since persistence runs on the
  delivery thread). The delivery thread reports what it finished and STATUS reports delivery only up
  to there, so the senders' windows wait for it (before that change the slow member grew to 650 MiB
  in 60 s).

The quick runs (10 s) are part of ``make test``; the 60-second runs are ``slow`` (``make test-long``).
Run with ``-s`` to see the report (peak RSS against the bound, queue lengths).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from derecho_core.engine import MAX_BACKLOG, MAX_QUEUED_SENDS
from derecho_core.testing.overload import OverloadResult, memory_bound, rss_kib, run_overload

QUICK = 10.0
LONG = 60.0


def check(result: OverloadResult) -> None:
    print()
    print(result.report())
    over = {n: (result.peak_kib[n] / 1024, result.bound[n]["total"] / 2**20) for n, ok in
            result.within_bound().items() if not ok}
    assert not over, f"peak RSS over the bound (MiB, peak vs bound): {over}\n{result.report()}"


def test_memory_bound_terms() -> None:
    kw = dict(baseline=40 << 20, window_size=16, max_payload_size=10240, shard_size=3, senders=3, sender=True,
              max_queued_sends=MAX_QUEUED_SENDS, tx_depth=256, max_smc_payload_size=10240, block_size=1 << 20,
              max_backlog=MAX_BACKLOG)
    b = memory_bound(**kw)  # type: ignore[arg-type]
    assert b["total"] == b["baseline"] + sum(v for k, v in b.items() if k not in ("baseline", "total"))
    assert b["send_queue"] == MAX_QUEUED_SENDS * (10240 + 512)
    assert b["received"] == 3 * 17 * (10240 + 512)
    assert memory_bound(**{**kw, "sender": False})["send_queue"] == 0  # type: ignore[arg-type]
    # grows with the window, the payload and the shard; RDMC payloads count their blocks too
    for key, more in (("window_size", 64), ("max_payload_size", 1 << 20), ("shard_size", 7), ("senders", 7)):
        assert memory_bound(**{**kw, key: more})["total"] > b["total"], key  # type: ignore[arg-type]
    big = memory_bound(**{**kw, "max_payload_size": 1 << 20})  # type: ignore[arg-type]
    assert big["received"] == 3 * 17 * (2 * (1 << 20) + 512) and big["receive_pool"] > 0


def test_rss_of_this_process() -> None:
    import os

    rss, hwm = rss_kib(os.getpid())
    assert 0 < rss <= hwm


@pytest.mark.timeout(180)
def test_stopped_receiver_quick(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=QUICK, delay=0.0, stop_cycle=(1.0, 0.5), drain_timeout=30))


@pytest.mark.timeout(180)
def test_slow_delivery_handler_quick(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=QUICK, delay=0.002))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_stopped_receiver_60s(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=LONG, delay=0.0, stop_cycle=(1.0, 0.5), drain_timeout=60))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slow_delivery_handler_60s(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=LONG, delay=0.002))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slow_delivery_handler_rpc_60s(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=LONG, delay=0.002, mode="rpc"))


@pytest.mark.timeout(180)
def test_slow_delivery_handler_unordered_shard_quick(tmp_path: Path) -> None:
    # an UNORDERED shard delivers on receipt: its windows must still wait for the slow handler
    result = run_overload(tmp_path, duration=QUICK, delay=0.002, mode="unordered")
    check(result)
    # each queued batch holds at least one delivery, and at most window_size per sender are unfinished
    most = max(e["q_deliveries"] for e in result.progress[2])
    assert most <= 3 * 16, f"the slow member's delivery queue reached {most} batches"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slow_delivery_handler_unordered_shard_60s(tmp_path: Path) -> None:
    check(run_overload(tmp_path, duration=LONG, delay=0.002, mode="unordered"))
