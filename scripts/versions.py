#!/usr/bin/env python3
"""One version for the six distributions of derecho-py.

The single source is ``__version__`` in ``derecho_core/__init__.py``: the root
``pyproject.toml`` reads it (``[tool.setuptools.dynamic] version``), so the
derecho-core wheel, its sdist and ``derecho --version`` always agree.

Each plugin distribution under ``plugins/`` is built on its own, from its own
directory or sdist, and cannot read a file outside it. So each plugin's
``pyproject.toml`` carries a static copy of the version and pins
``derecho-core==<version>`` (the six are released in lockstep), and this script
keeps the copies honest:

    python scripts/versions.py check          # exit 1 and list every disagreement
    python scripts/versions.py set 0.2.0      # rewrite them all (make version V=0.2.0)
    python scripts/versions.py show           # print the version

``set`` also rewrites a plugin package's own ``__version__`` where it has one,
and opens a ``## [x.y.z] - date`` section in CHANGELOG.md from the
``## [Unreleased]`` entries (a new heading under Unreleased, so the entries
listed there become the release's). ``check`` is run by tests/packaging/test_versions.py.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_INIT = Path("derecho_core/__init__.py")
PLUGINS = ("transport_sockets", "transport_verbs", "allocators", "storage_file", "storage_mem")

_VERSION_ASSIGN = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']', re.M)
_PYPROJECT_VERSION = re.compile(r'^(version\s*=\s*)"([^"]*)"', re.M)
_CORE_DEP = re.compile(r'"derecho-core(?:\s*[=<>!~][^"]*)?"')
_PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def core_version(root: Path = ROOT) -> str:
    m = _VERSION_ASSIGN.search((root / CORE_INIT).read_text(encoding="utf-8"))
    if not m:
        raise SystemExit(f"{CORE_INIT}: no __version__ = '...' line")
    return m.group(1)


def _plugin_package_inits(plugin_dir: Path) -> list[Path]:
    return sorted(p for p in plugin_dir.glob("derecho_*/__init__.py"))


def check(root: Path = ROOT) -> list[str]:
    """Every disagreement with derecho-core's version, as readable lines (empty: all agree)."""
    version = core_version(root)
    problems: list[str] = []
    root_meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    if "version" in root_meta["project"] or "version" not in root_meta["project"].get("dynamic", []):
        problems.append("pyproject.toml: derecho-core's version must be dynamic (read from derecho_core.__version__)")
    for name in PLUGINS:
        path = root / "plugins" / name / "pyproject.toml"
        rel = path.relative_to(root)
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        if project.get("version") != version:
            problems.append(f"{rel}: version {project.get('version')!r}, derecho-core is {version!r}")
        pins = [d for d in project.get("dependencies", []) if re.match(r"derecho-core\b", d)]
        if pins != [f"derecho-core=={version}"]:
            problems.append(f"{rel}: dependency {pins or 'derecho-core (missing)'}, expected ['derecho-core=={version}']")
        for init in _plugin_package_inits(path.parent):
            m = _VERSION_ASSIGN.search(init.read_text(encoding="utf-8"))
            if m and m.group(1) != version:
                problems.append(f"{init.relative_to(root)}: __version__ {m.group(1)!r}, derecho-core is {version!r}")
    return problems


def _rewrite(path: Path, pattern: re.Pattern[str], repl: str, root: Path, required: bool = True) -> None:
    text = path.read_text(encoding="utf-8")
    new, n = pattern.subn(repl, text, count=1)
    if n == 0:
        if required:
            raise SystemExit(f"{path.relative_to(root)}: nothing to rewrite for {pattern.pattern!r}")
        return
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path.relative_to(root)}")


def set_version(version: str, root: Path = ROOT, today: datetime.date | None = None) -> None:
    if not _PEP440.match(version):
        raise SystemExit(f"{version!r} is not a release version such as 1.2.3, 1.2.3rc1 or 1.2.3.dev0")
    _rewrite(root / CORE_INIT, _VERSION_ASSIGN, f'__version__ = "{version}"', root)
    for name in PLUGINS:
        path = root / "plugins" / name / "pyproject.toml"
        _rewrite(path, _PYPROJECT_VERSION, rf'\g<1>"{version}"', root)
        _rewrite(path, _CORE_DEP, f'"derecho-core=={version}"', root)
        for init in _plugin_package_inits(path.parent):
            _rewrite(init, _VERSION_ASSIGN, f'__version__ = "{version}"', root, required=False)
    changelog = root / "CHANGELOG.md"
    if changelog.is_file():
        text = changelog.read_text(encoding="utf-8")
        if not re.search(rf"^## \[{re.escape(version)}\]", text, re.M):
            date = (today or datetime.date.today()).isoformat()
            new, n = re.subn(r"^## \[Unreleased\][^\n]*\n", f"## [Unreleased]\n\n## [{version}] - {date}\n",
                             text, count=1, flags=re.M)
            if n:
                changelog.write_text(new, encoding="utf-8")
                print(f"updated CHANGELOG.md: opened ## [{version}] - {date} from the Unreleased entries")
            else:
                print("CHANGELOG.md has no '## [Unreleased]' heading: add the release section by hand",
                      file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show", help="print derecho-core's version")
    sub.add_parser("check", help="check that every distribution agrees with derecho-core's version")
    p = sub.add_parser("set", help="set the version of all six distributions")
    p.add_argument("version")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.cmd == "show":
        print(core_version(root))
        return 0
    if args.cmd == "set":
        set_version(args.version, root)
    problems = check(root)
    for line in problems:
        print(f"version mismatch: {line}", file=sys.stderr)
    if not problems and args.cmd == "check":
        print(f"all six distributions at {core_version(root)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
