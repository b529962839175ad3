"""Marking a class's methods as RPC targets: ``@ordered``, ``@p2p`` and ``rpc_name``.

A replicated type is a plain class. ``@ordered`` marks a method that may change
state and is invoked on every shard member through the ordered multicast;
``@p2p`` marks a read-only method one member answers. A method may carry both.

Each method is called on the wire by its tag, ``rpc_name(name)``: a 64-bit
mmh3 hash of the name. Two names of one class with the same tag would route
calls to the wrong method, so that is refused when the class is defined.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import mmh3

from ..errors import DerechoError

F = TypeVar("F", bound=Callable[..., Any])

_TABLE_ATTR = "__derecho_rpc_table__"


def rpc_name(name: str) -> int:
    """The function tag of the method called ``name`` (unsigned 64-bit mmh3 of its UTF-8 bytes)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"rpc_name needs a method name (a non-empty str), not {name!r}")
    tag: int = mmh3.hash64(name.encode(), signed=False)[0]
    return tag


class RpcDefinitionError(DerechoError, TypeError):
    """A replicated type's RPC methods are declared wrongly (for instance two names share a tag)."""


class UnknownMethodError(DerechoError, LookupError):
    """An RPC named a method the replicated type does not offer in that mode."""


@dataclass(frozen=True)
class RpcMethod:
    """One RPC target of a class: its name, tag, function, and the modes it accepts."""

    name: str
    tag: int
    function: Callable[..., Any]
    ordered: bool
    p2p: bool


class _Marked:
    """What ``@ordered``/``@p2p`` return: the function itself, plus the modes, registered at class creation."""

    def __init__(self, function: Callable[..., Any], ordered: bool, p2p: bool) -> None:
        if isinstance(function, (staticmethod, classmethod)):
            raise RpcDefinitionError("an RPC method must be a plain method of the replicated object, "
                                     "not a staticmethod or classmethod")
        if not callable(function):
            raise RpcDefinitionError(f"@ordered/@p2p decorate methods, not {function!r}")
        self.function = function
        self.ordered = ordered
        self.p2p = p2p
        functools.update_wrapper(self, function)

    def __set_name__(self, owner: type, name: str) -> None:
        _register(owner, name, self)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return self.function.__get__(obj, objtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        modes = "+".join(m for m, on in (("ordered", self.ordered), ("p2p", self.p2p)) if on)
        return f"<{modes} RPC {getattr(self.function, '__qualname__', self.function)}>"


def _mark(function: Any, *, ordered: bool = False, p2p: bool = False) -> Any:
    if isinstance(function, _Marked):
        function.ordered = function.ordered or ordered
        function.p2p = function.p2p or p2p
        return function
    return _Marked(function, ordered, p2p)


def ordered(function: F) -> F:
    """Mark a method as an ordered RPC target: run on every shard member, in the same order everywhere."""
    marked: F = _mark(function, ordered=True)
    return marked


def p2p(function: F) -> F:
    """Mark a method as a point-to-point RPC target: answered by the one member it is sent to."""
    marked: F = _mark(function, p2p=True)
    return marked


def _register(owner: type, name: str, marked: _Marked) -> None:
    table: dict[int, RpcMethod] = owner.__dict__.get(_TABLE_ATTR) or {}
    if _TABLE_ATTR not in owner.__dict__:
        setattr(owner, _TABLE_ATTR, table)
    tag = rpc_name(name)
    other = table.get(tag)
    if other is not None and other.name != name:
        raise RpcDefinitionError(f"{owner.__qualname__}.{name} and {owner.__qualname__}.{other.name} have the "
                                 f"same RPC tag {tag}; rename one of them")
    table[tag] = RpcMethod(name, tag, marked.function, marked.ordered, marked.p2p)


_TABLES: dict[type, dict[int, RpcMethod]] = {}


def method_table(cls: type) -> dict[int, RpcMethod]:
    """Every RPC target of ``cls`` by tag, inherited ones included (a subclass's definition wins)."""
    table = _TABLES.get(cls)
    if table is None:
        table = _TABLES[cls] = _build_table(cls)  # classes are not redefined while calls run: cache it
    return table


def _build_table(cls: type) -> dict[int, RpcMethod]:
    merged: dict[int, RpcMethod] = {}
    for klass in reversed(cls.__mro__):
        for tag, method in (klass.__dict__.get(_TABLE_ATTR) or {}).items():
            other = merged.get(tag)
            if other is not None and other.name != method.name:
                raise RpcDefinitionError(f"{cls.__qualname__}: RPC methods {method.name} and {other.name} "
                                         f"share the tag {tag}; rename one of them")
            merged[tag] = method
    # a plain override of an RPC method in a subclass hides it
    for tag, method in list(merged.items()):
        attr = getattr(cls, method.name, None)
        if not isinstance(attr, _Marked):
            del merged[tag]
    return merged


_NAMES: dict[str, int] = {}


def resolve(cls: type, method: Any, *, mode: str) -> RpcMethod:
    """The target ``method`` names: the method itself, its name, or its tag; ``mode`` is ordered or p2p."""
    table = method_table(cls)
    if isinstance(method, str):
        tag = _NAMES.get(method)
        if tag is None:
            tag = _NAMES[method] = rpc_name(method)
        target = table.get(tag)
        if target is not None and getattr(target, mode):
            return target  # the common case, without the checks below
    if isinstance(method, _Marked):
        name = method.function.__name__
        tag = rpc_name(name)
    elif isinstance(method, str):
        tag = rpc_name(method)
    elif isinstance(method, int) and not isinstance(method, bool):
        tag = method
    elif callable(method) and hasattr(method, "__name__"):
        tag = rpc_name(getattr(method, "__func__", method).__name__)
    else:
        raise TypeError(f"name the RPC by the method, its name or its rpc_name tag, not {method!r}")
    target = table.get(tag)
    if target is None:
        offered = sorted(m.name for m in table.values() if getattr(m, mode))
        raise UnknownMethodError(f"{cls.__qualname__} has no {mode} RPC method {_describe(method)}; "
                                 f"its {mode} methods are {offered or 'none'} (mark one with @{mode})")
    if not getattr(target, mode):
        raise UnknownMethodError(f"{cls.__qualname__}.{target.name} is not a {mode} RPC target; "
                                 f"decorate it with @{mode} to call it with "
                                 f"{'ordered_send' if mode == 'ordered' else 'p2p_send'}")
    return target


def _describe(method: Any) -> str:
    if isinstance(method, _Marked):
        return repr(method.function.__name__)
    if isinstance(method, int):
        return f"with tag {method}"
    return repr(getattr(method, "__name__", method))
