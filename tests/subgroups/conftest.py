"""Make the folder's helper module importable, and keep a local derecho.cfg out of these tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="module", autouse=True)
def _no_local_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Conf.load() reads ./derecho.cfg and $DERECHO_CONF_FILE; these tests build their configuration
    # explicitly. Module scope: hypothesis refuses function-scoped fixtures around @given tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        for var in ("DERECHO_CONF_FILE", "DERECHO_NODE_CONF_FILE"):
            mp.delenv(var, raising=False)
        yield
