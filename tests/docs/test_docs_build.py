"""The docs site builds with ``mkdocs build --strict``, and its references are generated from the code."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gen(out: Path) -> tuple[str, str]:
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=60)
    return ((out / "reference" / "configuration.md").read_text(), (out / "reference" / "cli.md").read_text())


def test_configuration_reference_lists_every_key_with_its_type_and_default(tmp_path: Path) -> None:
    from derecho_core import conf

    page, _ = _gen(tmp_path)
    for section in {k.section for k in conf.KEYS}:
        assert f"## [{section}]" in page
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    by_key = {line.split("`")[1]: line for line in rows}
    for key in conf.KEYS:
        row = by_key.get(key.short)
        assert row is not None, f"{key.name} missing from the configuration reference"
        assert f"| {key.type_name} |" in row
        if key.default not in (None, "", []):
            shown = ",".join(map(str, key.default)) if isinstance(key.default, list) else \
                ("true" if key.default is True else "false" if key.default is False else str(key.default))
            assert f"`{shown}`" in row, f"{key.name}: default {shown!r} not in {row!r}"


def test_cli_reference_covers_every_command(tmp_path: Path) -> None:
    from derecho_core.cli import build_parser

    _, page = _gen(tmp_path)
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        assert f"## `derecho {name}`" in page
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and action.help != "==SUPPRESS==":
                    assert opt in page, f"derecho {name} {opt} missing from the CLI reference"


@pytest.mark.timeout(180)
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "coming-from-cpp/index.html",
                 "reference/configuration/index.html", "reference/cli/index.html", "img/virtual-synchrony.svg"):
        assert (site / page).is_file(), page
    from derecho_core import conf

    html = (site / "reference" / "configuration" / "index.html").read_text()
    missing = [k.name for k in conf.KEYS if f"<code>{k.short}</code>" not in html]
    assert not missing, f"keys missing from the built configuration reference: {missing}"
    assert not (site / "gen_reference.py").exists()
