"""RDMC block schedules (spec §5.2): who sends which block to whom.

Ranks are positions in the shard's member list rotated so the sender is rank
0. A schedule is a list of ``(step, from_rank, to_rank, block)``; in each step
a rank sends at most one block and receives at most one. It is computed once
per (algorithm, members, blocks) and then followed event by event: a rank
relays a block as soon as it has it, to the ranks the schedule names, so the
sender's link is not the bottleneck.

* ``sequential_send``: the sender sends every block to rank 1, then to rank 2...
  (b·(n−1) steps; nobody relays).
* ``chain_send``: a pipeline along the ranks (b+n−2 steps).
* ``tree_send``: a binomial tree, whole message per edge (b·⌈log2 n⌉ steps).
* ``binomial_send``: the binomial pipeline on a hypercube: the sender injects
  one new block per step and every rank exchanges blocks with a neighbour, so
  all links work at once (b+log2 n−1 steps when n is a power of two; for other
  sizes at most 3 steps over Derecho's b+⌊log2 n⌋ up to 16 ranks).
"""

from __future__ import annotations

from functools import lru_cache

ALGORITHMS = ("binomial_send", "chain_send", "sequential_send", "tree_send")

Send = tuple[int, int, int, int]  # (step, from, to, block)


def _check(algorithm: str, n: int, b: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown rdmc_send_algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    if n < 1 or b < 1:
        raise ValueError(f"an RDMC schedule needs at least one member and one block (got {n}, {b})")


@lru_cache(maxsize=256)
def schedule(algorithm: str, n: int, b: int) -> tuple[Send, ...]:
    _check(algorithm, n, b)
    if n == 1:
        return ()
    if algorithm == "sequential_send":
        return tuple((r * b + k, 0, 1 + r, k) for r in range(n - 1) for k in range(b))
    if algorithm == "chain_send":
        return tuple((k + i, i, i + 1, k) for i in range(n - 1) for k in range(b))
    if algorithm == "tree_send":
        out = []
        stage = 0
        span = 1
        while span < n:
            for r in range(span):
                if r + span < n:
                    out.extend((stage * b + k, r, r + span, k) for k in range(b))
            span *= 2
            stage += 1
        return tuple(out)
    return _binomial_pipeline(n, b)


def _binomial_pipeline(n: int, b: int) -> tuple[Send, ...]:
    """RDMC's binomial pipeline on a hypercube, with twins when ``n`` is not a power of two.

    With ``n = 2^l`` ranks every rank exchanges with its neighbour along
    dimension ``step mod l``; the sender injects block ``step`` while it has new
    ones, everybody else sends the highest block the neighbour lacks. That takes
    exactly ``b + l − 1`` steps. For other sizes the ``e = n − 2^l`` extra ranks
    are twins of vertices 1..e: a vertex receives for the pair and its twin sends
    for it, one step behind. A plain greedy exchange is computed too and the
    shorter schedule is kept (see docs/multicast.md for the measured step counts).
    """
    twin = _hypercube(n, b)
    if n & (n - 1) == 0:
        return twin
    greedy = _greedy(n, b)
    return twin if _len(twin) <= _len(greedy) else greedy


def _len(sched: tuple[Send, ...]) -> int:
    return 1 + max(step for step, _, _, _ in sched) if sched else 0


def _hypercube(n: int, b: int) -> tuple[Send, ...]:
    dims = n.bit_length() - 1
    m = 1 << dims
    out_node = {v: v for v in range(m)}
    for j in range(1, n - m + 1):
        out_node[j] = m + j - 1
    have = [set(range(b)) if r == 0 else set() for r in range(n)]
    out: list[Send] = []
    step = 0
    while any(len(h) < b for h in have):
        moves = []
        if dims:
            d = step % dims
            for a in range(m):
                src, dst = out_node[a], a ^ (1 << d)
                missing = have[src] - have[dst]
                if missing:
                    k = step if src == 0 and step < b and step in missing else max(missing)
                    moves.append((src, dst, k))
        for j in range(1, n - m + 1):
            missing = have[j] - have[m + j - 1]
            if missing:
                moves.append((j, m + j - 1, max(missing)))
        for src, dst, k in moves:
            have[dst].add(k)
            out.append((step, src, dst, k))
        step += 1
    return tuple(out)


def _greedy(n: int, b: int) -> tuple[Send, ...]:
    """Each step, every rank lacking blocks gets the rarest missing one from a distinct rank."""
    have = [set(range(b)) if r == 0 else set() for r in range(n)]
    out: list[Send] = []
    step = 0
    next_new = 0
    while any(len(h) < b for h in have):
        busy_send: set[int] = set()
        busy_recv: set[int] = set()
        counts = [sum(1 for h in have if k in h) for k in range(b)]
        moves: list[tuple[int, int, int]] = []
        if next_new < b:
            target = min(range(1, n), key=lambda r: (len(have[r]), (r - 1 - next_new) % (n - 1)))
            moves.append((0, target, next_new))
            busy_send.add(0)
            busy_recv.add(target)
            next_new += 1
        for r in sorted(range(1, n), key=lambda r: (len(have[r]), r)):
            if r in busy_recv or len(have[r]) == b:
                continue
            best = None
            for s in range(1, n):
                if s == r or s in busy_send:
                    continue
                missing = have[s] - have[r]
                if missing:
                    k = min(missing, key=lambda k: (counts[k], k))
                    key = (counts[k], len(have[s]), s)
                    if best is None or key < best[0]:
                        best = (key, s, k)
            if best is None and 0 not in busy_send:
                k = min(set(range(b)) - have[r], key=lambda k: (counts[k], k))
                best = ((0, 0, 0), 0, k)
            if best is not None:
                _, s, k = best
                moves.append((s, r, k))
                busy_send.add(s)
                busy_recv.add(r)
        for s, r, k in moves:
            have[r].add(k)
            out.append((step, s, r, k))
        step += 1
    return tuple(out)


def steps(algorithm: str, n: int, b: int) -> int:
    sched = schedule(algorithm, n, b)
    return 1 + max(s for s, _, _, _ in sched) if sched else 0


def first_sends(algorithm: str, n: int, b: int) -> list[tuple[int, int]]:
    """``(block, to_rank)`` the sender (rank 0) sends, in schedule order."""
    return [(k, to) for _, frm, to, k in schedule(algorithm, n, b) if frm == 0]


@lru_cache(maxsize=4096)
def _relay_table(algorithm: str, n: int, b: int) -> dict[tuple[int, int], tuple[int, ...]]:
    table: dict[tuple[int, int], list[int]] = {}
    for _, frm, to, k in schedule(algorithm, n, b):
        if frm != 0:
            table.setdefault((frm, k), []).append(to)
    return {key: tuple(v) for key, v in table.items()}


def relays(algorithm: str, n: int, b: int, rank: int, block: int) -> tuple[int, ...]:
    """The ranks ``rank`` forwards ``block`` to once it has it."""
    return _relay_table(algorithm, n, b).get((rank, block), ())
