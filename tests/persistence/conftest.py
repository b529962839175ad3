"""Fixtures of the persistence tests: open a log in either store, cleaned up afterwards."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from derecho_storage_file import FileLogStore
from derecho_storage_mem import MemLogStore

from derecho_core import Conf

# the crash test's child module is imported by path, whatever pytest's import mode is
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

STORES = ("file", "mem")
_roots = itertools.count()


@pytest.fixture
def conf(tmp_path) -> Conf:
    """A conf whose logs (file and mem) are private to this test."""
    return Conf.load(overrides={"PERS/file_path": str(tmp_path / "plog"),
                                "PERS/ramdisk_path": str(tmp_path / f"ram{next(_roots)}")},
                     environ={})


@pytest.fixture(params=STORES)
def store_name(request) -> str:
    return request.param


@pytest.fixture
def open_log(store_name: str, conf: Conf) -> Callable[..., Any]:
    """``open_log(name="log", **conf_overrides)`` opens a log in the parametrized store."""
    opened: list[Any] = []

    def _open(name: str = "log", **overrides: Any) -> Any:
        c = conf.with_overrides({f"PERS/{k}": v for k, v in overrides.items()}) if overrides else conf
        factory = FileLogStore.open if store_name == "file" else MemLogStore.open
        store = factory(c, name)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        try:
            store.close()
        except Exception:
            pass
    if store_name == "mem":
        for store in opened:
            MemLogStore.discard(str(conf.get("PERS/ramdisk_path")), store.name)
