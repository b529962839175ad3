"""Replay or sweep simulator runs: ``python -m derecho_core.sim --seed 17`` or ``--sweep 0:2000``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .invariants import InvariantViolation
from .cluster import SimParams
from .scenarios import run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derecho_core.sim", description=__doc__)
    parser.add_argument("--seed", type=int, help="replay one seed")
    parser.add_argument("--sweep", help="run seeds A:B (B excluded)")
    parser.add_argument("--traffic", choices=("ordered", "raw"), help="multicast traffic during the run")
    parser.add_argument("--size", type=int, default=64, help="payload size of the traffic (RDMC above 512)")
    parser.add_argument("--algorithm", default="binomial_send", help="rdmc_send_algorithm")
    parser.add_argument("--no-partition-safety", action="store_true", help="turn the majority rule off")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the protocol's messages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s %(message)s")
    if args.seed is not None:
        seeds = range(args.seed, args.seed + 1)
    elif args.sweep:
        a, b = (int(x) for x in args.sweep.split(":"))
        seeds = range(a, b)
    else:
        parser.error("give --seed N or --sweep A:B")
    failures = 0
    started = time.perf_counter()
    for seed in seeds:
        try:
            r = run_scenario(seed, SimParams(traffic=args.traffic, message_size=args.size,
                                             rdmc_send_algorithm=args.algorithm,
                                             partition_safety=not args.no_partition_safety))
        except InvariantViolation as exc:
            failures += 1
            print(f"FAIL {exc}", file=sys.stderr)
            continue
        if len(seeds) == 1 or args.verbose:
            print(f"seed {seed}: {r.nodes} nodes, faults: {'; '.join(r.faults) or 'none'}; "
                  f"final view {r.final_vid} {r.final_members}; settled {r.settle_ms:.0f} ms after the faults; "
                  f"{r.deliveries} deliveries")
    print(f"{len(seeds) - failures} passed, {failures} failed ({time.perf_counter() - started:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
