"""The user guide's custom membership function, shipped as examples/plugins/guide_allocator (issue 5, point 4).

The distribution is imported from its folder (not installed into the project's
environment) and registered in a private plugin system, the way its entry point
would be.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import pytest

from derecho_core import Conf, SubgroupInfo, SubgroupProvisioningError, View, make_next_view, plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "guide_allocator"


class Foo: ...
class Bar: ...
class Cache: ...


TYPES = [Foo, Bar, Cache]


@pytest.fixture
def guide_plugin(monkeypatch):
    """The example's entry point, loaded into a private plugin system (nothing installed, nothing left behind)."""
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    entry = meta["project"]["entry-points"]["derecho"]
    assert meta["project"]["name"] == "derecho-example-guide-allocator"
    assert entry == {"guide": "derecho_example_guide_allocator"}
    monkeypatch.syspath_prepend(str(EXAMPLE))
    module = importlib.import_module(entry["guide"])
    system = plugins.PluginSystem(environ={"DERECHO_LOAD_PLUGINS": ""}, load_entry_points=False)
    system.register_plugin(module, "guide")
    monkeypatch.setattr(plugins, "_system", system)
    yield module
    sys.modules.pop(entry["guide"], None)


def allocate(info: SubgroupInfo, view: View, prev: View | None = None, types=TYPES) -> View:
    info.allocate(types, prev, view)
    return view


def test_selected_by_name_from_config(guide_plugin):
    info = SubgroupInfo.from_conf(Conf.load(overrides={"LAYOUT/allocator": "guide"}))
    assert plugins.names("allocator") == ["guide"]
    v = allocate(info, View(0, range(7)))
    assert v.is_adequately_provisioned
    assert v.subgroup_members(Foo) == [[0, 1, 2]]
    assert v.subgroup_members(Bar) == [[0, 1, 2]]  # Foo and Bar are co-resident
    assert v.subgroup_members(Cache) == [[3, 4, 5]]
    assert v.next_unassigned_rank == 6  # node 6 idle
    assert v.subgroup_ids_by_type_id == [[0], [1], [2]]


def test_provisioning_errors_below_3_and_6(guide_plugin):
    info = SubgroupInfo.from_conf(Conf.load(overrides={"LAYOUT/allocator": "guide"}))
    five = allocate(info, View(0, range(5)))
    assert not five.is_adequately_provisioned and five.next_unassigned_rank == 0
    with pytest.raises(SubgroupProvisioningError, match="Cache needs 6 members; view 0 has 5"):
        info.allocate(TYPES, None, View(0, range(5)), raise_on_inadequate=True)
    # Foo and Bar alone need three members
    assert allocate(info, View(0, range(3)), types=[Foo, Bar]).is_adequately_provisioned
    two = allocate(info, View(0, range(2)), types=[Foo, Bar])
    assert not two.is_adequately_provisioned


def test_later_views_and_next_unassigned_rank(guide_plugin):
    info = SubgroupInfo(guide_plugin.guide_allocator)
    v0 = allocate(info, View(0, range(8)))
    v1 = allocate(info, make_next_view(v0, [1], []), v0)
    assert v1.members == [0, 2, 3, 4, 5, 6, 7]
    assert v1.subgroup_members(Foo) == [[0, 2, 3]]
    assert v1.subgroup_members(Cache) == [[4, 5, 6]]
    # the guide's `+= 3` would have made this 8 in a 7-member view
    assert v1.next_unassigned_rank == 6
    assert v1.shard_views(Cache)[0].joined == [6] and v1.shard_views(Cache)[0].departed == [3]


def test_types_matched_by_name(guide_plugin):
    info = SubgroupInfo(guide_plugin.guide_allocator)
    v = allocate(info, View(0, range(6)), types=["Foo", "Bar", "Cache"])
    assert v.subgroup_members("Cache") == [[3, 4, 5]]


@pytest.mark.timeout(180)
def test_pip_installed_into_a_temporary_directory(tmp_path):
    """Built and installed by pip like any third-party plugin, found through its entry point."""
    import json
    import os
    import shutil
    import subprocess

    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)],
                   check=True, capture_output=True, timeout=170)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERECHO_")}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-m", "derecho_core", "plugins", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    listing = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert listing["guide"]["distribution"] == "derecho-example-guide-allocator"
    assert listing["guide"]["registered"] == {"allocator": ["guide"]}
    out = subprocess.run([sys.executable, "-m", "derecho_core", "layout", "--allocator", "guide", "--types",
                          "Foo,Bar,Cache", "-n", "6", "--json"], env=env, capture_output=True, text=True, timeout=60)
    (view,) = json.loads(out.stdout)["views"]
    assert [sg["shards"][0]["members"] for sg in view["subgroups"]] == [[0, 1, 2], [0, 1, 2], [3, 4, 5]]
