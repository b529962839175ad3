"""A deterministic simulator for the protocol state machines.

It runs the same :class:`~derecho_core.protocol.membership.Membership` code as
the engine, on a virtual clock and a virtual network whose links have random
delays (FIFO per link), and injects crashes, restarts, joins, partitions and
heals. A seed reproduces a run exactly; invariants are checked after every
step. ``python -m derecho_core.sim --seed N`` replays one run.
"""

from .cluster import Cluster, SimParams
from .invariants import InvariantViolation
from .scenarios import run_scenario

__all__ = ["Cluster", "SimParams", "InvariantViolation", "run_scenario"]
