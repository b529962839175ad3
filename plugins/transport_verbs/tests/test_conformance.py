"""The shared transport conformance suite, run against libfabric's tcp provider on 127.0.0.1."""

from __future__ import annotations

import pytest

from derecho_transport_verbs._testhelpers import HAVE_TCP, WHY

if not HAVE_TCP:
    pytest.skip(f"libfabric's tcp provider is not available: {WHY}", allow_module_level=True)

from derecho_core.testing.transport import TransportConformance  # noqa: E402


class TestVerbsTcpConformance(TransportConformance):
    provider = "tcp"
    conf_overrides = {"RDMA/domain": "lo"}
