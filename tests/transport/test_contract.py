"""The transport contract module, the sockets plugin's registration and its config handling."""

from __future__ import annotations

import argparse

import pytest

import derecho_core
from derecho_core import Conf, plugins
from derecho_core.transport import (
    MessageReceived,
    PeerConnected,
    PeerFailed,
    RMACapability,
    Transport,
    TransportError,
    open_transport,
)

pytestmark = pytest.mark.timeout(30)


def test_public_names():
    for name in ("Transport", "PeerConnected", "PeerFailed", "MessageReceived", "TransportError",
                 "SendQueueFull", "NotConnectedError", "open_transport"):
        assert getattr(derecho_core, name) is not None
    assert issubclass(TransportError, derecho_core.DerechoError)


def test_events_are_small_frozen_values():
    ev = MessageReceived(3, b"abc")
    assert len(ev) == 3
    with pytest.raises(AttributeError):
        ev.node_id = 4  # type: ignore[misc]
    assert PeerFailed(1).clean is False and PeerConnected(2).address is None


def test_transport_is_abstract():
    with pytest.raises(TypeError):
        Transport()  # type: ignore[abstract]


def test_sockets_is_registered_and_selected_by_provider():
    assert "sockets" in plugins.names("transport")
    conf = Conf.load(overrides={"RDMA/provider": "sockets"}, environ={})
    t = open_transport(conf, 1, ("127.0.0.1", 0))
    try:
        assert isinstance(t, Transport) and t.provider == "sockets" and t.rma is None
        assert not isinstance(t.rma, RMACapability)
        assert t.tx_depth == 256
    finally:
        t.close()


def test_domain_names_the_bind_address():
    conf = Conf.load(overrides={"RDMA/domain": "lo"}, environ={})
    t = open_transport(conf, 1, ("", 0), "sockets")
    try:
        assert t.listen()[0] == "127.0.0.1"
    finally:
        t.close()
    conf = Conf.load(overrides={"RDMA/domain": "127.0.0.1", "DERECHO/local_ip": "10.255.255.1"}, environ={})
    t = open_transport(conf, 1, ("", 0), "sockets")
    try:
        assert t.listen()[0] == "127.0.0.1"
    finally:
        t.close()


def test_benchmark_module_shape():
    from derecho_core.benchmarks import transport as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--runs", "2", "--providers", "sockets", "--quick"])
    assert args.runs == 2 and callable(bench.run)
