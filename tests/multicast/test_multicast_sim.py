"""Simulated multicast under crashes, joins, leader crashes and partitions (multicast acceptance 1).

Checked after every step: total order within a view, virtual synchrony (members that leave a view
together delivered the same messages in it), nothing delivered twice or invented, versions
(vid << 32) | seq; at the end every message of a surviving sender is delivered. Raw mode: per-sender
FIFO without duplicates. `make test` runs a subset of every mode; `make test-long` 2,000 seeds.
"""

from __future__ import annotations

import pytest

from derecho_core.sim import InvariantViolation, SimParams, run_scenario

MODES = [
    ("ordered", 64, "binomial_send"),      # SMC
    ("raw", 64, "binomial_send"),
    ("ordered", 2000, "binomial_send"),    # RDMC, 8 blocks of 256 bytes
    ("ordered", 2000, "chain_send"),
    ("ordered", 2000, "sequential_send"),
    ("ordered", 2000, "tree_send"),
    ("raw", 2000, "chain_send"),
]


def run(seeds, mode):
    traffic, size, algorithm = mode
    failures = []
    delivered = 0
    for seed in seeds:
        try:
            r = run_scenario(seed, SimParams(traffic=traffic, message_size=size, rdmc_send_algorithm=algorithm))
            delivered += r.deliveries
        except InvariantViolation as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} failing seeds; first:\n" + "\n\n".join(failures[:2])
    assert delivered > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES, ids=["-".join(map(str, m)) for m in MODES])
def test_subset(mode):
    run(range(100, 106), mode)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_sweep_2000_seeds_across_modes():
    """2,000 seeds, each mode taking every seventh seed."""
    for i, mode in enumerate(MODES):
        run(range(i, 2000, len(MODES)), mode)
