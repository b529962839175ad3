"""A real third-party plugin distribution, pip-installed into a temporary virtual environment.

The temporary environment sees derecho-core and its dependencies through the
project's .venv (a .pth line that adds its site-packages), so nothing is
downloaded; the example plugin itself is built and installed by pip.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugins" / "one_shard"


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def temp_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    Path(purelib, "zz_outer_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(outer)))
    return venv


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check",
                "-q", *args])


def derecho_plugins(venv: Path, **env: str) -> tuple[dict, subprocess.CompletedProcess[str]]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DERECHO_")}
    full_env.update(env)
    out = run([str(venv / "bin" / "python"), "-m", "derecho_core", "plugins", "--json"], env=full_env, check=False)
    return json.loads(out.stdout), out


def names(listing: dict) -> set[str]:
    return {p["name"] for p in listing["plugins"]}


@pytest.mark.timeout(300)
def test_install_find_disable_uninstall(temp_venv):
    before, _ = derecho_plugins(temp_venv)
    assert "one_shard" not in names(before)

    pip(temp_venv, "install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    after, out = derecho_plugins(temp_venv)
    assert out.returncode == 0, out.stderr
    entry = next(p for p in after["plugins"] if p["name"] == "one_shard")
    assert entry["distribution"] == "derecho-one-shard"
    assert entry["version"] == "1.0.0"
    assert entry["kinds"] == ["allocator"]
    assert entry["registered"] == {"allocator": ["one_shard"]}

    # found by name through the module-level look-up
    code = "import derecho_core.plugins as p; print(p.allocator('one_shard').__module__)"
    out = run([str(temp_venv / "bin" / "python"), "-c", code])
    assert out.stdout.strip() == "derecho_one_shard"

    hidden, _ = derecho_plugins(temp_venv, DERECHO_DISABLE_PLUGINS="one_shard")
    assert "one_shard" not in names(hidden)
    only, _ = derecho_plugins(temp_venv, DERECHO_LOAD_PLUGINS="one_shard")
    assert names(only) == {"one_shard"}

    pip(temp_venv, "uninstall", "-y", "derecho-one-shard")
    gone, _ = derecho_plugins(temp_venv)
    assert "one_shard" not in names(gone)


@pytest.mark.timeout(300)
def test_cli_refuses_plugin_with_misspelled_hook(temp_venv, tmp_path):
    pkg = tmp_path / "typo"
    (pkg / "derecho_typo").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "derecho-typo"
        version = "0.0.1"
        [project.entry-points.derecho]
        typo = "derecho_typo"
    """))
    (pkg / "derecho_typo" / "__init__.py").write_text(textwrap.dedent("""
        from derecho_core import hookimpl
        @hookimpl
        def derecho_register_alocators(register):
            register("x", object)
    """))
    pip(temp_venv, "install", "--no-deps", "--no-build-isolation", str(pkg))
    try:
        listing, out = derecho_plugins(temp_venv)
        assert out.returncode == 1
        assert "typo" not in names(listing)
        assert "refused plugin typo" in out.stderr
        assert "unknown hook 'derecho_register_alocators'" in out.stderr
        assert "did you mean 'derecho_register_allocators'" in out.stderr
    finally:
        pip(temp_venv, "uninstall", "-y", "derecho-typo")
