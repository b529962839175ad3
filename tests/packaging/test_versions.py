"""One version for the six distributions: scripts/versions.py check and set."""

from __future__ import annotations

import datetime
import importlib.util
import shutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("derecho_versions_script", ROOT / "scripts" / "versions.py")
assert _spec is not None and _spec.loader is not None
versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(versions)


def test_every_distribution_agrees_with_derecho_core() -> None:
    assert versions.check(ROOT) == []


def test_core_version_is_what_derecho_core_reports() -> None:
    import derecho_core

    assert versions.core_version(ROOT) == derecho_core.__version__


def _copy_tree(dest: Path) -> Path:
    (dest / "derecho_core").mkdir(parents=True)
    shutil.copy2(ROOT / "derecho_core" / "__init__.py", dest / "derecho_core" / "__init__.py")
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "CHANGELOG.md", dest / "CHANGELOG.md")
    for name in versions.PLUGINS:
        src = ROOT / "plugins" / name
        (dest / "plugins" / name).mkdir(parents=True)
        shutil.copy2(src / "pyproject.toml", dest / "plugins" / name / "pyproject.toml")
        for init in src.glob("derecho_*/__init__.py"):
            target = dest / "plugins" / name / init.parent.name / "__init__.py"
            target.parent.mkdir()
            shutil.copy2(init, target)
    return dest


def test_set_rewrites_all_six_and_opens_a_changelog_section(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    versions.set_version("7.8.9rc1", root, today=datetime.date(2030, 1, 2))
    assert versions.check(root) == []
    assert versions.core_version(root) == "7.8.9rc1"
    for name in versions.PLUGINS:
        project = tomllib.loads((root / "plugins" / name / "pyproject.toml").read_text())["project"]
        assert project["version"] == "7.8.9rc1"
        assert "derecho-core==7.8.9rc1" in project["dependencies"]
    changelog = (root / "CHANGELOG.md").read_text()
    assert "## [Unreleased]\n\n## [7.8.9rc1] - 2030-01-02\n" in changelog


def test_check_names_a_disagreement(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / "plugins" / "storage_mem" / "pyproject.toml"
    path.write_text(path.read_text().replace(f'"derecho-core=={versions.core_version(root)}"', '"derecho-core"'))
    problems = versions.check(root)
    assert len(problems) == 1 and "plugins/storage_mem/pyproject.toml" in problems[0]


def test_set_refuses_a_non_version(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    with pytest.raises(SystemExit):
        versions.set_version("latest", root)
    assert versions.check(root) == []
