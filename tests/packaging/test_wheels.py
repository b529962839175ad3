"""Build the six wheels, install them (not editable) into a fresh virtual environment, use them.

The wheels are built from copies of the distribution folders (sdist, then the
wheel from the sdist, as ``python -m build`` does) with ``--no-isolation``, so
the build uses this environment's setuptools and cffi instead of downloading
them. Third-party dependencies (pluggy, mmh3, msgpack, cffi, google-crc32c)
are downloaded once into a wheelhouse with ``pip download``; the install
itself runs with ``--no-index``. From the new environment, with the current
directory outside the source tree, it runs ``derecho plugins --json``,
``examples/membership_demo.py`` (three real ``derecho member`` processes) and
``derecho demo simple_replicated_objects`` (six processes: ordered_send, reply
maps, p2p reads, from the installed ``derecho`` command alone).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = {
    "transport_sockets": "derecho-transport-sockets",
    "transport_verbs": "derecho-transport-verbs",
    "allocators": "derecho-allocators",
    "storage_file": "derecho-storage-file",
    "storage_mem": "derecho-storage-mem",
}
# what a copy of a distribution folder leaves behind: build products and editable-install metadata
_IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "*.o",
                                 "_fi_cffi.c", "tests")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("build") is None,
                                reason="the 'build' package is not installed (pip install -e '.[test]')")


def _core_version() -> str:
    spec = importlib.util.spec_from_file_location("derecho_versions_script", ROOT / "scripts" / "versions.py")
    assert spec is not None and spec.loader is not None
    versions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(versions)
    return str(versions.core_version(ROOT))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DERECHO_CONF_FILE", "DERECHO_NODE_CONF_FILE")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or _clean_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def _copy_sources(dest: Path) -> list[Path]:
    core = dest / "derecho-core"
    core.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, core / name)
    shutil.copytree(ROOT / "derecho_core", core / "derecho_core", ignore=_IGNORE)
    dirs = [core]
    for folder, dist in PLUGINS.items():
        shutil.copytree(ROOT / "plugins" / folder, dest / dist, ignore=_IGNORE)
        dirs.append(dest / dist)
    return dirs


@pytest.mark.timeout(300)
def test_wheels_install_and_run_in_a_fresh_venv(tmp_path: Path) -> None:
    t0 = time.monotonic()
    version = _core_version()
    dist = tmp_path / "dist"
    for src in _copy_sources(tmp_path / "src"):
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], cwd=tmp_path, timeout=180)
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 6 and len(sdists) == 6, sorted(p.name for p in dist.iterdir())
    for w in wheels:
        assert f"-{version}-" in w.name, f"{w.name} is not at derecho-core's version {version}"
    verbs_wheel = next(w for w in wheels if w.name.startswith("derecho_transport_verbs-"))
    if Path("/usr/include/rdma/fabric.h").exists():
        import zipfile
        names = zipfile.ZipFile(verbs_wheel).namelist()
        assert any(n.startswith("derecho_transport_verbs/_fi_cffi") and n.endswith(".so") for n in names), names
        assert "-linux_" in verbs_wheel.name or "manylinux" in verbs_wheel.name, verbs_wheel.name
    t_build = time.monotonic() - t0

    # third-party dependencies, downloaded once; everything after this is offline
    deps = tmp_path / "deps"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    try:
        _run(pip + ["download", "--quiet", "--only-binary=:all:", "--dest", deps, *wheels], cwd=tmp_path, timeout=120)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not download the wheels' dependencies from the package index: {str(exc)[:500]}")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    py = venv / "bin" / "python"
    _run(pip + ["--python", py, "install", "--quiet", "--no-index", "--find-links", deps, "--find-links", dist,
                *wheels], cwd=tmp_path, timeout=120)
    t_install = time.monotonic() - t0 - t_build

    # installed, not editable, not the source tree
    where = json.loads(_run([py, "-c", "import json, derecho_core, derecho_transport_sockets; "
                             "print(json.dumps([derecho_core.__file__, derecho_transport_sockets.__file__]))"],
                            cwd=tmp_path, timeout=60))
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"{path} is not inside the test venv"
    assert not list((venv / "lib").glob("python*/site-packages/__editable__*")), "an editable install leaked in"

    out = _run([venv / "bin" / "derecho", "--version"], cwd=tmp_path, timeout=60)
    assert version in out
    listing = json.loads(_run([venv / "bin" / "derecho", "plugins", "--json"], cwd=tmp_path, timeout=60))
    assert listing["refused"] == []
    found = {p["distribution"]: p["version"] for p in listing["plugins"]}
    for dist_name in PLUGINS.values():
        assert found.get(dist_name) == version, f"{dist_name} missing or at the wrong version: {found}"

    # a real three-process group from the installed packages
    demo_cwd = tmp_path / "run"
    demo_cwd.mkdir()
    out = _run([py, ROOT / "examples" / "membership_demo.py"], cwd=demo_cwd, timeout=150)
    assert "done: membership works" in out, out
    assert "refused:" in out, out
    t_membership = time.monotonic() - t0 - t_build - t_install

    # the replicated-objects demo, as a user of the wheels runs it: nothing from the source tree
    demo = [venv / "bin" / "derecho", "demo", "simple_replicated_objects", "--timeout", "100"]
    proc = subprocess.run([str(a) for a in demo], cwd=demo_cwd, capture_output=True, text=True, timeout=130,
                          env=_clean_env())
    assert proc.returncode == 0, f"derecho demo exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n" \
                                 f"--- stderr\n{proc.stderr[-4000:]}"
    assert "simple_replicated_objects: all 6 nodes exited 0" in proc.stdout, proc.stdout[-4000:]
    assert proc.stdout.count("every check passed") == 6, proc.stdout[-4000:]
    t_total = time.monotonic() - t0
    print(f"\nwheel test: build {t_build:.1f}s, download+install {t_install:.1f}s, membership demo "
          f"{t_membership:.1f}s, replicated objects demo {t_total - t_build - t_install - t_membership:.1f}s, "
          f"total {t_total:.1f}s")
