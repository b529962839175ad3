"""What the example programs share: the sample replicated objects, the command line, and printing.

This is the Python counterpart of the C++ demos' ``sample_objects.hpp``
(Foo, Bar and Cache) plus a little plumbing:

* :func:`start` reads a node's command line,
  ``python derecho_core/examples/NAME.py --node ID [--nodes N] [--file derecho.cfg] [--SECTION/key=value ...]``,
  into a :class:`~derecho_core.Conf` (``--node`` sets ``DERECHO/local_id``);
* :meth:`Node.say` prints one line prefixed by the node id, ``[node 3] ...``;
* :meth:`Node.check` records a failed expectation, so the program exits 1;
* :meth:`Node.finish` waits at ``barrier_sync`` so nobody leaves early, then leaves.

``derecho demo NAME`` starts the processes of an example with free ports and
a scratch directory per node; each example says how many nodes it wants with
a module-level ``DEMO_NODES = N``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from derecho_core import Conf, Group, GroupStoppedError, ordered, p2p

_print_lock = threading.Lock()

#: how long a program waits for one reply map, reply, barrier or frontier before it gives up (s)
TIMEOUT = 30.0


# ----------------------------------------------------------------------------- sample objects


class Foo:
    """An example replicated object: some state and two RPC methods (``sample_objects.hpp``)."""

    def __init__(self, initial_state: int = 0) -> None:
        self.state = initial_state

    @ordered
    @p2p
    def read_state(self) -> int:
        return self.state

    @ordered
    def change_state(self, new_state: int) -> bool:
        if new_state == self.state:
            return False
        self.state = new_state
        return True


class Bar:
    """Another example replicated object, whose state is a string log."""

    def __init__(self, log: str = "") -> None:
        self.log = log

    @ordered
    def append(self, words: str) -> None:
        self.log += words

    @ordered
    def clear(self) -> None:
        self.log = ""

    @ordered
    @p2p
    def print(self) -> str:
        return self.log


class Cache:
    """A key-value cache (the guide's example): ``put``/``invalidate`` change it, ``get``/``contains`` read it."""

    def __init__(self) -> None:
        self.cache_map: dict[str, str] = {}

    @ordered
    def put(self, key: str, value: str) -> None:
        self.cache_map[key] = value

    @ordered
    @p2p
    def get(self, key: str) -> str:
        return self.cache_map.get(key, "")

    @ordered
    @p2p
    def contains(self, key: str) -> bool:
        return key in self.cache_map

    @ordered
    def invalidate(self, key: str) -> bool:
        return self.cache_map.pop(key, None) is not None


# ----------------------------------------------------------------------------- one node of an example


class Node:
    """This process's identity and output; see :func:`start`."""

    def __init__(self, conf: Conf, args: argparse.Namespace) -> None:
        self.conf = conf
        self.args = args
        self.id: int = conf.get("DERECHO/local_id")
        self.nodes: int = args.nodes
        self.failures: list[str] = []
        self.t0 = time.monotonic()

    def say(self, *parts: Any) -> None:
        """One line of output, prefixed by this node's id."""
        text = " ".join(str(p) for p in parts)
        out = "".join(f"[node {self.id}] {line}\n" for line in text.splitlines() or [""])
        with _print_lock:  # callbacks print from the delivery thread: keep lines whole
            sys.stdout.write(out)
            sys.stdout.flush()

    def check(self, ok: bool, what: str) -> bool:
        """Note an expectation; a false one is printed as ``CHECK FAILED`` and makes the program exit 1."""
        if not ok:
            self.failures.append(what)
            self.say(f"CHECK FAILED: {what}")
        return ok

    def replies(self, results: Any) -> dict[int, Any]:
        """Every member's reply to a call, as ``{node_id: value}`` (waits at most :data:`TIMEOUT`)."""
        return {node: fut.result(TIMEOUT) for node, fut in results.get(TIMEOUT).items()}

    def finish(self, group: Group) -> int:
        """Wait for every member at a barrier (so no one leaves early), leave, and give the exit status."""
        try:
            group.barrier_sync(TIMEOUT)
        except GroupStoppedError as exc:
            # The barrier completes once every member reached it, but members learn that at slightly
            # different times: a member that learns it first may leave while another still waits. The
            # departures are not failures (leavers are never counted against the majority), but should
            # the group stop anyway, this node's work is done: not a failure of the example.
            self.say(f"the group stopped while this node waited at the final barrier ({exc.kind}); "
                     "the other members had passed it and left")
        group.leave()
        status = 1 if self.failures else 0
        self.say(f"done in {time.monotonic() - self.t0:.1f} s: " +
                 ("every check passed" if not self.failures else f"{len(self.failures)} check(s) failed"))
        return status


def start(description: str, argv: Sequence[str] | None = None, default_nodes: int = 3,
          add_arguments: Callable[[argparse.ArgumentParser], object] | None = None) -> Node:
    """Read a node's command line: its own options, then Derecho's ``--SECTION/key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description=description,
        usage="%(prog)s --node ID [--nodes N] [--file CFG] [options] [--SECTION/key=value ...]",
        epilog="Derecho options (--DERECHO/gms_port=..., --PERS/file_path=...) override the config files.")
    parser.add_argument("--node", type=int, default=None, metavar="ID",
                        help="this node's id (DERECHO/local_id); default: local_id of the configuration")
    parser.add_argument("--nodes", type=int, default=default_nodes, metavar="N",
                        help=f"how many nodes run the example (default {default_nodes})")
    parser.add_argument("--file", default=None, help="group configuration file (default: $DERECHO_CONF_FILE "
                                                     "or ./derecho.cfg)")
    parser.add_argument("--node-file", default=None, help="node configuration file")
    if add_arguments is not None:
        add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    derecho_items = [a for a in argv if a.startswith("--") and "/" in a.split("=", 1)[0]]
    args = parser.parse_args([a for a in argv if a not in derecho_items])
    overrides = {"DERECHO/local_id": args.node} if args.node is not None else None
    conf, _ = Conf.parse_args(derecho_items, config_file=args.file, node_config_file=args.node_file,
                              overrides=overrides)
    if os.environ.get("DERECHO_DEMO_EXIT_ON_STDIN_EOF") == "1":
        threading.Thread(target=_exit_when_launcher_is_gone, name="demo-launcher-watch", daemon=True).start()
    return Node(conf, args)


def _exit_when_launcher_is_gone() -> None:
    """Under ``derecho demo``: standard input is a pipe from the launcher that closes only when it exits."""
    try:  # the raw descriptor: a daemon thread blocked in sys.stdin's buffer would abort the interpreter's exit
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    print("the derecho demo launcher is gone; this node stops", file=sys.stderr, flush=True)
    os._exit(3)


def run(main: Callable[[], int]) -> None:
    """``sys.exit(main())``; on an error, print it and exit 1 at once (without waiting for the group's threads)."""
    try:
        status = main()
    except SystemExit:  # --help, a bad option
        raise
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    else:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
