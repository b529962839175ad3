"""Suite-wide options: `--run-slow` enables the long sweeps that `make test-long` runs."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (longer sweeps; make test-long)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --run-slow (make test-long)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
