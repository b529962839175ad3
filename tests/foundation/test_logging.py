"""[LOGGER]: one logger per layer with its own level, terminal and rotating file."""

from __future__ import annotations

import logging

import pytest

from derecho_core import Conf
from derecho_core.log import LAYER_LOGGERS, TRACE, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    configure_logging(Conf.load(overrides={"LOGGER/log_to_terminal": False}, environ={}))
    root = logging.getLogger("derecho")
    root.propagate = True
    for name in LAYER_LOGGERS.values():
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_levels_per_layer_inherit_default():
    conf = Conf.load(overrides={"LOGGER/default_log_level": "warning", "LOGGER/sst_log_level": "trace",
                                "LOGGER/rpc_log_level": "off"}, environ={})
    configure_logging(conf)
    assert logging.getLogger("derecho.sst").level == TRACE
    assert logging.getLogger("derecho.rpc").level > logging.CRITICAL
    assert logging.getLogger("derecho.viewmanager").level == logging.WARNING
    assert logging.getLogger("derecho.persistence").level == logging.WARNING


def test_rotating_file_and_idempotence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = Conf.load(overrides={"LOGGER/log_to_file": True, "LOGGER/log_to_terminal": False,
                                "LOGGER/default_log_name": "node7", "LOGGER/log_file_depth": 2}, environ={})
    configure_logging(conf)
    root = configure_logging(conf)  # twice: handlers replaced, not doubled
    assert len([h for h in root.handlers if getattr(h, "_derecho_handler", False)]) == 1
    logging.getLogger("derecho.viewmanager").info("view 3 installed")
    for h in root.handlers:
        h.flush()
    assert "derecho.viewmanager: view 3 installed" in (tmp_path / "node7.log").read_text()
    handler = next(h for h in root.handlers if getattr(h, "_derecho_handler", False))
    assert handler.backupCount == 2 and handler.maxBytes == 1 << 20
