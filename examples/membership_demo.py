"""A local three-node group: start it, crash a member, watch the others install a new view, rejoin.

Run with ``make demo`` (or ``.venv/bin/python examples/membership_demo.py``).
Each member is a real process (``derecho member``) on 127.0.0.1 with ports
chosen free at run time; nothing leaves this machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from derecho_core.testing.processes import LocalGroup


def show(group: LocalGroup, node: int, what: str) -> None:
    view = group.members[node].views()[-1]
    print(f"  node {node} {what}: view {view['vid']} members {view['members']}", flush=True)


def main() -> int:
    provider = sys.argv[1] if len(sys.argv) > 1 else "sockets"
    with tempfile.TemporaryDirectory(prefix="derecho-demo-") as tmp:
        group = LocalGroup(Path(tmp), provider, extra=["--RDMA/domain=lo"] if provider != "sockets" else [])
        try:
            print(f"1. starting three members over the '{provider}' transport; node 0 is the contact")
            for node in range(3):
                group.start(node).wait_for_view(range(node + 1), timeout=30)
            for node in range(3):
                group.members[node].wait_for_view([0, 1, 2], timeout=30)
                show(group, node, "sees")
            print("\n2. SIGKILL node 2: the survivors notice and install a view without it")
            vids = {node: group.members[node].last_vid() for node in (0, 1)}
            t0 = time.time()
            group.members[2].kill()
            for node in (0, 1):
                group.members[node].wait_for_view([0, 1], timeout=30, after_vid=vids[node])
            print(f"  new view on both survivors {1000 * (time.time() - t0):.0f} ms after the kill")
            for node in (0, 1):
                show(group, node, "sees")
            print("\n3. node 2 restarts with its old id and rejoins")
            vids = {node: group.members[node].last_vid() for node in (0, 1)}
            group.start(2)
            for node in range(3):
                group.members[node].wait_for_view([0, 1, 2], timeout=30, after_vid=vids.get(node, -1))
                show(group, node, "sees")
            print("\n4. a second process that claims id 1 is refused")
            rogue = group.start_extra(1)
            rogue.wait_exit(timeout=30)
            line = next((line for line in rogue.stderr if "ID_IN_USE" in line), "(no message)")
            print("  refused: " + line.split("): ", 1)[-1].strip())
            print("\ndone: membership works; see docs/membership.md")
        finally:
            group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
