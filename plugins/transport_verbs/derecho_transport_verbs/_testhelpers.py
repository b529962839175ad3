"""Helpers for the verbs plugin's tests (importable from anywhere: tests need no package)."""

from __future__ import annotations

import socket
import time

import pytest

from derecho_transport_verbs import fabric

OK, WHY = fabric.available()
if OK:
    try:
        HAVE_TCP = "tcp" in fabric.provider_names()
    except Exception as exc:  # pragma: no cover
        HAVE_TCP, WHY = False, str(exc)
else:
    HAVE_TCP = False

requires_libfabric = pytest.mark.skipif(not OK, reason=f"libfabric not installed: {WHY}")
requires_tcp = pytest.mark.skipif(not HAVE_TCP, reason=f"libfabric's tcp provider is not available: {WHY}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_conf(**over):
    from derecho_core.conf import Conf

    base = {"RDMA/provider": "tcp", "RDMA/domain": "lo", "DERECHO/p2p_loop_busy_wait_before_sleep_ms": 1,
            "DERECHO/sst_poll_cq_timeout_ms": 2000, "RDMA/tx_depth": 64, "RDMA/rx_depth": 64}
    base.update(over)
    return Conf.load(overrides=base)


def poll_until(transports, pred, timeout=10.0):
    """Poll every transport until ``pred(events_so_far)`` is true; returns {transport: [events]}."""
    got = {t: [] for t in transports}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in transports:
            got[t].extend(t.poll(0.0005))
        if pred(got):
            return got
    summary = {i: [type(e).__name__ for e in evs][:20] + ([f"... {len(evs)} in all"] if len(evs) > 20 else [])
               for i, evs in enumerate(got.values())}
    raise AssertionError(f"condition not met within {timeout}s; events per transport: {summary}")
