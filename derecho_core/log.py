"""Logging set-up from the ``[LOGGER]`` section: one stdlib logger per layer."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .conf import Conf

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: config layer name -> logger name (Derecho's loggers: derecho_sst, derecho_rpc, viewmanager, persistent)
LAYER_LOGGERS = {
    "sst": "derecho.sst",
    "rpc": "derecho.rpc",
    "viewmanager": "derecho.viewmanager",
    "persistence": "derecho.persistence",
}

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_derecho_handler"


def level_number(name: str) -> int:
    return _LEVELS[name.lower()]


def configure_logging(conf: "Conf") -> logging.Logger:
    """Apply ``[LOGGER]``: levels per layer, terminal and/or rotating file.

    Idempotent: handlers installed by an earlier call are replaced, not added.
    Returns the ``derecho`` root logger.
    """
    root = logging.getLogger("derecho")
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level_number(conf.get("LOGGER/default_log_level")))
    for layer, name in LAYER_LOGGERS.items():
        logging.getLogger(name).setLevel(level_number(conf.log_level(layer)))
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    if conf.get("LOGGER/log_to_terminal"):
        handlers.append(logging.StreamHandler(sys.stderr))
    if conf.get("LOGGER/log_to_file"):
        handlers.append(logging.handlers.RotatingFileHandler(
            conf.get("LOGGER/default_log_name") + ".log", maxBytes=1 << 20,
            backupCount=conf.get("LOGGER/log_file_depth")))
    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.propagate = not handlers
    return root
