"""The plugin system: registration, look-ups, errors, and entry-point filtering."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

from derecho_core import PluginNotFoundError, hookimpl
from derecho_core.errors import PluginError
from derecho_core.plugins import PluginSystem


def make_plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn) if not hasattr(fn, "derecho_impl") else fn)
    return module


def transports(*names):
    def derecho_register_transports(register):
        for n in names:
            register(n, lambda conf, node_id, address, _n=n: _n)
    return derecho_register_transports


def empty_system() -> PluginSystem:
    return PluginSystem({}, load_entry_points=False)


def test_register_and_lookup_each_kind():
    system = empty_system()
    system.register_plugin(make_plugin(
        "p",
        derecho_register_transports=transports("fake"),
        derecho_register_allocators=lambda register: register("flat", "ALLOC"),
        derecho_register_storage=lambda register: register("null", "STORE"),
    ))
    assert system.lookup("transport", "fake")(None, 0, None) == "fake"
    assert system.lookup("allocator", "flat") == "ALLOC"
    assert system.lookup("storage", "null") == "STORE"
    info = system.plugins()[0]
    assert info.registered == {"transport": ["fake"], "allocator": ["flat"], "storage": ["null"]}
    assert info.hooks == sorted(["derecho_register_transports", "derecho_register_allocators",
                                 "derecho_register_storage"])


def test_missing_name_lists_installed_and_distribution():
    system = empty_system()
    system.register_plugin(make_plugin("p", derecho_register_transports=transports("sockets")))
    with pytest.raises(PluginNotFoundError) as info:
        system.lookup("transport", "verbs")
    assert str(info.value) == ("no transport for provider 'verbs'; installed: sockets. "
                               "pip install derecho-transport-verbs")
    assert info.value.installed == ["sockets"]
    with pytest.raises(PluginNotFoundError, match=r"no storage backend 'file'; installed: \(none\)\. "
                                                  r"pip install derecho-storage-file"):
        system.lookup("storage", "file")
    with pytest.raises(PluginNotFoundError, match=r"no allocator 'default'; .*pip install derecho-allocators"):
        system.lookup("allocator", "default")


def test_missing_unknown_name_suggests_close_match():
    system = empty_system()
    system.register_plugin(make_plugin("p", derecho_register_transports=transports("sockets")))
    with pytest.raises(PluginNotFoundError, match="Did you mean 'sockets'"):
        system.lookup("transport", "socket")


def test_two_plugins_one_name_is_an_error_naming_both():
    system = empty_system()
    system.register_plugin(make_plugin("first", derecho_register_transports=transports("dup")))
    system.register_plugin(make_plugin("second", derecho_register_transports=transports("dup")))
    with pytest.raises(PluginError, match=r"transport 'dup' is registered by two plugins: 'first' and 'second'"):
        system.lookup("transport", "dup")


def test_misspelled_marked_hook_is_refused():
    system = empty_system()
    bad = make_plugin("bad", derecho_register_transport=transports("x"))
    with pytest.raises(PluginError, match=r"unknown hook 'derecho_register_transport'; did you mean "
                                          r"'derecho_register_transports'"):
        system.register_plugin(bad)
    assert not system.pm.has_plugin("bad")


def test_misspelled_unmarked_hook_is_refused():
    system = empty_system()
    bad = types.ModuleType("bad")
    bad.derecho_register_alocators = lambda register: None  # forgot @hookimpl, and misspelled
    with pytest.raises(PluginError, match="derecho_register_alocators"):
        system.register_plugin(bad)


def test_other_misspelled_prefix_caught_by_pluggy():
    system = empty_system()
    bad = make_plugin("bad", derecho_allocators=lambda register: None)
    with pytest.raises(PluginError, match="derecho_allocators"):
        system.register_plugin(bad)


def test_unregister():
    system = empty_system()
    system.register_plugin(make_plugin("p", derecho_register_transports=transports("t")))
    assert system.names("transport") == ["t"]
    system.unregister_plugin("p")
    assert system.names("transport") == []


def test_bad_kind():
    with pytest.raises(ValueError, match="unknown plugin kind"):
        empty_system().names("transports")


# ----------------------------------------------------------------------------- entry points


@pytest.fixture
def fake_distributions(tmp_path, monkeypatch):
    """Two installed distributions (dist-info on sys.path), one of them with a misspelled hook."""

    def make_dist(dist: str, ep_name: str, module: str, body: str) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
        info = tmp_path / f"{dist.replace('-', '_')}-2.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 2.0\n")
        (info / "entry_points.txt").write_text(f"[derecho]\n{ep_name} = {module}\n")

    make_dist("derecho-fake-alpha", "alpha", "fake_alpha", """
        from derecho_core import hookimpl
        @hookimpl
        def derecho_register_storage(register):
            register("alpha_store", object)
    """)
    make_dist("derecho-fake-typo", "typo", "fake_typo", """
        from derecho_core import hookimpl
        @hookimpl
        def derecho_register_storages(register):
            register("never", object)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for mod in ("fake_alpha", "fake_typo"):
        sys.modules.pop(mod, None)


def test_entry_points_load_and_refuse_misspelled(fake_distributions):
    system = PluginSystem({})
    assert "alpha_store" in system.names("storage")
    alpha = next(i for i in system.plugins() if i.name == "alpha")
    assert (alpha.distribution, alpha.version) == ("derecho-fake-alpha", "2.0")
    assert "derecho_register_storages" in system.refused["typo"]


def test_load_plugins_allow_list(fake_distributions):
    assert "alpha_store" in PluginSystem({"DERECHO_LOAD_PLUGINS": "alpha"}).names("storage")
    assert "alpha_store" in PluginSystem({"DERECHO_LOAD_PLUGINS": "derecho-fake-alpha"}).names("storage")
    none = PluginSystem({"DERECHO_LOAD_PLUGINS": ""})
    assert none.plugins() == [] and none.refused == {}


def test_disable_plugins(fake_distributions):
    system = PluginSystem({"DERECHO_DISABLE_PLUGINS": "alpha, typo"})
    assert "alpha_store" not in system.names("storage")
    assert system.refused == {}


def test_module_level_lookups(monkeypatch):
    import derecho_core.plugins as plugins

    system = plugins.reload_plugins({"DERECHO_LOAD_PLUGINS": ""})
    try:
        plugins.register_plugin(make_plugin("inproc", derecho_register_transports=transports("loop")))
        assert plugins.transport("loop")(None, 1, None) == "loop"
        with pytest.raises(PluginNotFoundError, match="installed: loop"):
            plugins.transport("verbs")
        with pytest.raises(PluginNotFoundError):
            plugins.allocator("nope")
        with pytest.raises(PluginNotFoundError):
            plugins.storage("nope")
        assert plugins.get_plugin_system() is system
    finally:
        plugins.reload_plugins()


def test_hookspec_docstrings_state_the_contract():
    from derecho_core import hookspecs

    for name in ("derecho_register_transports", "derecho_register_allocators", "derecho_register_storage"):
        doc = getattr(hookspecs, name).__doc__
        assert "register(name, factory)" in doc and "returns" in doc


def test_writing_plugins_doc_exists():
    doc = Path(__file__).resolve().parents[2] / "docs" / "writing-plugins.md"
    assert "derecho_register_allocators" in doc.read_text()
