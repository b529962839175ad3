"""The one plugin manager of derecho-py.

Plugins are found through the ``derecho`` entry-point group (every plugin
distribution declares one), or registered in-process with
:func:`register_plugin` (a one-file plugin, a test). Each plugin implements
some of the three ``register`` hooks of :mod:`derecho_core.hookspecs`; this
module calls them and answers ``transport(name)``, ``allocator(name)`` and
``storage(name)``.

Environment:

``DERECHO_LOAD_PLUGINS``
    Comma list of the entry-point plugins to load (by entry-point name or
    distribution name). Set but empty: load none.
``DERECHO_DISABLE_PLUGINS``
    Comma list of plugins to skip.
"""

from __future__ import annotations

import difflib
import importlib.metadata as metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pluggy

from . import hookspecs
from .errors import PluginError, PluginNotFoundError

log = logging.getLogger("derecho.plugins")

ENTRY_POINT_GROUP = "derecho"

#: kind -> the hook that registers it
HOOKS: dict[str, str] = {
    "transport": "derecho_register_transports",
    "allocator": "derecho_register_allocators",
    "storage": "derecho_register_storage",
}

#: Where the names we ship come from, so a missing one says what to install.
KNOWN_PROVIDERS: dict[str, dict[str, str]] = {
    "transport": {
        "sockets": "derecho-transport-sockets",
        "verbs": "derecho-transport-verbs",
        "tcp": "derecho-transport-verbs",
        "udp": "derecho-transport-verbs",
        "shm": "derecho-transport-verbs",
        "efa": "derecho-transport-verbs",
        "psm3": "derecho-transport-verbs",
    },
    "allocator": {"default": "derecho-allocators"},
    "storage": {"file": "derecho-storage-file", "mem": "derecho-storage-mem"},
}

_WHAT = {"transport": "transport for provider", "allocator": "allocator", "storage": "storage backend"}


@dataclass
class PluginInfo:
    """What ``derecho plugins`` shows about one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "kinds": sorted(k for k, v in self.registered.items() if v),
            "hooks": list(self.hooks),
            "registered": {k: list(v) for k, v in self.registered.items() if v},
        }


@dataclass
class _Entry:
    factory: Any
    plugin: str
    distribution: str | None


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


class PluginSystem:
    """One ``pluggy.PluginManager("derecho")`` and the registries built from it.

    The process uses the module-level instance (see :func:`get_plugin_system`);
    tests may build their own with a chosen environment.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._environ = os.environ if environ is None else environ
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._registries: dict[str, dict[str, _Entry]] = {}
        #: plugins refused at load, with the reason
        self.refused: dict[str, str] = {}
        self._lock = threading.RLock()
        if load_entry_points:
            self._load_entry_points()

    # ----------------------------------------------------------------- loading
    def _load_entry_points(self) -> None:
        allow = _split_env(self._environ.get("DERECHO_LOAD_PLUGINS"))
        deny = _split_env(self._environ.get("DERECHO_DISABLE_PLUGINS")) or set()
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            dist_version = dist.version if dist is not None else None
            names = {ep.name} | ({dist_name} if dist_name else set())
            if allow is not None and not names & allow:
                continue
            if names & deny:
                log.debug("plugin %s disabled by DERECHO_DISABLE_PLUGINS", ep.name)
                continue
            if ep.name in seen:
                # The same distribution visible twice on sys.path (an editable
                # and a regular install): the first one wins, as for imports.
                continue
            seen.add(ep.name)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the node down
                self.refused[ep.name] = f"could not import {ep.value}: {exc!r}"
                log.error("plugin %s (%s) refused: %s", ep.name, dist_name, self.refused[ep.name])
                continue
            try:
                self._register(plugin, ep.name, dist_name, dist_version)
            except PluginError as exc:
                self.refused[ep.name] = str(exc)
                log.error("plugin %s (%s) refused: %s", ep.name, dist_name, exc)

    def _register(self, plugin: Any, name: str, dist: str | None, version: str | None) -> None:
        _check_hook_names(plugin, name)
        with self._lock:
            if self.pm.has_plugin(name):
                raise PluginError(f"a plugin named {name!r} is already registered")
            self.pm.register(plugin, name=name)
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(name=name)
                raise PluginError(f"plugin {name!r}: {exc}") from exc
            self._dists[name] = (dist, version)
            self._registries.clear()

    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module in-process; returns its name.

        Raises :class:`PluginError` when it implements a hook that does not
        exist (for instance a misspelled ``derecho_register_alocators``).
        """
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
        self._register(plugin, name, None, None)
        return name

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self._dists.pop(name, None)
            self._registries.clear()

    # --------------------------------------------------------------- registries
    def _registry(self, kind: str) -> dict[str, _Entry]:
        with self._lock:
            reg = self._registries.get(kind)
            if reg is not None:
                return reg
            reg = {}
            hook = getattr(self.pm.hook, HOOKS[kind])
            for impl in hook.get_hookimpls():  # registration order
                dist = self._dists.get(impl.plugin_name, (None, None))[0]
                impl.function(register=self._make_register(kind, reg, impl.plugin_name, dist))
            self._registries[kind] = reg
            return reg

    def _make_register(self, kind: str, reg: dict[str, _Entry], plugin: str, dist: str | None) -> Callable[[str, Any], None]:
        def register(name: str, factory: Any) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
            if factory is None:
                raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} with no factory")
            other = reg.get(name)
            if other is not None:
                raise PluginError(
                    f"{kind} {name!r} is registered by two plugins: {_who(other.plugin, other.distribution)} "
                    f"and {_who(plugin, dist)}; uninstall or disable one (DERECHO_DISABLE_PLUGINS)"
                )
            reg[name] = _Entry(factory, plugin, dist)

        return register

    def names(self, kind: str) -> list[str]:
        """The names of every installed ``kind`` ("transport", "allocator", "storage")."""
        return sorted(self._registry(_check_kind(kind)))

    def lookup(self, kind: str, name: str) -> Any:
        """The factory registered as ``name`` for ``kind``, or :class:`PluginNotFoundError`."""
        reg = self._registry(_check_kind(kind))
        entry = reg.get(name)
        if entry is not None:
            return entry.factory
        installed = sorted(reg)
        msg = f"no {_WHAT[kind]} {name!r}; installed: {', '.join(installed) if installed else '(none)'}."
        dist = KNOWN_PROVIDERS[kind].get(name)
        if dist is not None:
            msg += f" pip install {dist}"
        else:
            close = difflib.get_close_matches(name, installed, n=1)
            if close:
                msg += f" Did you mean {close[0]!r}?"
        if self.refused:
            msg += " (refused plugins: " + "; ".join(f"{k}: {v}" for k, v in self.refused.items()) + ")"
        raise PluginNotFoundError(msg, kind=kind, name=name, installed=installed)

    def provider_of(self, kind: str, name: str) -> str | None:
        entry = self._registry(_check_kind(kind)).get(name)
        return entry.plugin if entry else None

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution, version, hooks and names."""
        infos: dict[str, PluginInfo] = {}
        for plugin_name, plugin in self.pm.list_name_plugin():
            dist, version = self._dists.get(plugin_name, (None, None))
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            infos[plugin_name] = PluginInfo(plugin_name, dist, version, hooks, {k: [] for k in HOOKS})
        for kind in HOOKS:
            for name, entry in self._registry(kind).items():
                infos[entry.plugin].registered[kind].append(name)
        for info in infos.values():
            for v in info.registered.values():
                v.sort()
        return sorted(infos.values(), key=lambda i: i.name)


def _who(plugin: str, dist: str | None) -> str:
    return f"{plugin!r} ({dist})" if dist else repr(plugin)


def _check_kind(kind: str) -> str:
    if kind not in HOOKS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {', '.join(HOOKS)}")
    return kind


def _check_hook_names(plugin: Any, name: str) -> None:
    """Refuse a plugin that defines a ``derecho_*`` function that is no hook.

    pluggy's ``check_pending`` catches a misspelled hook marked ``@hookimpl``;
    this also catches one where the marker was forgotten, which pluggy would
    silently ignore.
    """
    known = set(HOOKS.values())
    for attr in dir(plugin):
        if attr.startswith("derecho_register") and attr not in known and callable(getattr(plugin, attr, None)):
            close = difflib.get_close_matches(attr, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                f"plugin {name!r} implements unknown hook {attr!r}{hint} "
                f"(known hooks: {', '.join(sorted(known))})"
            )


_system: PluginSystem | None = None
_system_lock = threading.Lock()


def get_plugin_system() -> PluginSystem:
    """The process-wide plugin system, built (and entry points loaded) on first use."""
    global _system
    with _system_lock:
        if _system is None:
            _system = PluginSystem()
        return _system


def reload_plugins(environ: Mapping[str, str] | None = None) -> PluginSystem:
    """Throw away the plugin system and load the entry points again."""
    global _system
    with _system_lock:
        _system = PluginSystem(environ)
        return _system


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register an in-process plugin (module or object with ``@hookimpl`` functions)."""
    return get_plugin_system().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    get_plugin_system().unregister_plugin(name)


def transport(name: str) -> Any:
    """The transport factory for ``[RDMA] provider = name``."""
    return get_plugin_system().lookup("transport", name)


def allocator(name: str) -> Any:
    """The allocator factory for ``[LAYOUT] allocator = name``."""
    return get_plugin_system().lookup("allocator", name)


def storage(name: str) -> Any:
    """The log-store factory for ``[PERS] storage = name``."""
    return get_plugin_system().lookup("storage", name)


def names(kind: str) -> list[str]:
    return get_plugin_system().names(kind)


def plugins() -> list[PluginInfo]:
    return get_plugin_system().plugins()


