"""``derecho bench <name>``: the benchmarks of :mod:`derecho_core.benchmarks`, and ``all`` to run each in turn.

A benchmark is a module ``derecho_core.benchmarks.<name>`` that defines
``add_arguments(parser)`` and ``run(args) -> int``; it is discovered, so adding
one never touches this file. Each prints a table with the baselines measured
in the same run, and a JSON record. A module that sets ``IN_ALL = False`` is a
command of its own but is left out of ``all`` (``report``, which runs the
others itself).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Callable


def _benchmarks() -> dict[str, ModuleType | Exception]:
    from .. import benchmarks

    found: dict[str, ModuleType | Exception] = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            found[info.name] = importlib.import_module(f"{benchmarks.__name__}.{info.name}")
        except Exception as exc:  # one broken benchmark must not take the whole CLI down
            found[info.name] = exc
    return found


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="run benchmarks (with same-run baselines)",
                       description="Run a benchmark by name, or all of them. Results: a table and JSON.")
    names = p.add_subparsers(dest="bench_name", metavar="NAME")
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, module in _benchmarks().items():
        if isinstance(module, Exception):
            bp = names.add_parser(name, help=f"(unavailable: {module})")
            bp.set_defaults(func=_broken(name, module))
            continue
        doc = (module.__doc__ or "").strip().splitlines()
        bp = names.add_parser(name, help=doc[0] if doc else name, description=module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
        if getattr(module, "IN_ALL", True):
            parsers[name] = bp
    allp = names.add_parser("all", help="run every benchmark with its defaults, one after the other "
                                        f"({', '.join(parsers)})")
    allp.set_defaults(func=lambda args: _run_all(parsers))

    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=usage)


def _broken(name: str, exc: Exception) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"derecho bench {name}: cannot load the benchmark: {exc!r}", file=sys.stderr)
        return 1

    return run


def _run_all(parsers: dict[str, argparse.ArgumentParser]) -> int:
    worst = 0
    for name, bp in parsers.items():
        print(f"==> derecho bench {name}", flush=True)
        args = bp.parse_args([])
        worst = max(worst, int(args.func(args) or 0))
    return worst
