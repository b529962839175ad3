"""A peer's bytes never crash the membership state machine."""

from __future__ import annotations

import logging

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derecho_core.protocol import wire
from derecho_core.protocol.events import Log, Received, ReceivedAtAddress, Send
from derecho_core.protocol.membership import Membership
from derecho_core.view import IpAndPorts


def leader() -> Membership:
    m = Membership(0, IpAndPorts("127.0.0.1", 1, 2, 3, 4, 5))
    m.start_new_group(0.0)
    return m


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes(data):
    m = leader()
    for event in (Received(5, data), ReceivedAtAddress(data)):
        actions = m.handle(event, 1.0)
        assert m.stopped is None
        assert all(not isinstance(a, Send) for a in actions)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([wire.SST, wire.HEARTBEAT, wire.JOIN, wire.JOIN_REPLY, wire.WELCOME]),
       st.lists(msgpack_values, max_size=4))
def test_well_framed_but_wrong_fields(kind, fields):
    m = leader()
    data = msgpack.packb([kind, *fields], use_bin_type=True)
    m.handle(ReceivedAtAddress(data), 1.0)
    m.handle(Received(0, data), 1.0)
    assert m.stopped is None


def test_bad_message_is_logged_with_its_reason():
    m = leader()
    actions = m.handle(ReceivedAtAddress(b"\xc1garbage"), 1.0)
    logs = [a for a in actions if isinstance(a, Log) and a.level == logging.WARNING]
    assert logs and "dropped a bad GMS message" in logs[0].message


def test_join_with_bad_address_is_refused_quietly():
    m = leader()
    m.handle(ReceivedAtAddress(wire.encode(wire.JOIN, 3, ["x", 1], 7)), 1.0)
    assert m.join_queue == [] and m.view.members == [0]


@pytest.mark.parametrize("vid", [-1, 2**64 - 1, "1", None, 1.5])
def test_sst_with_bad_vid(vid):
    m = leader()
    m.handle(Received(0, msgpack.packb([wire.SST, vid, {}])), 1.0)
    assert m.stopped is None


@pytest.mark.parametrize("host", ["no-such-host.invalid", "localhost", "", "1.2.3", "::1", "a" * 64])
def test_join_naming_anything_but_a_numeric_ipv4_address_is_dropped_with_a_warning(host):
    # every member's transport connects to the addresses a view holds: one that does not resolve
    # must never get that far (a fuzzed JOIN once stopped every member of a group)
    m = leader()
    actions = m.handle(ReceivedAtAddress(wire.encode(wire.JOIN, 3, [host, 1, 2, 3, 4, 5], 7)), 1.0)
    logs = [a.message % a.args if a.args else a.message for a in actions
            if isinstance(a, Log) and a.level == logging.WARNING]
    assert any("must be a numeric IPv4 address" in line for line in logs), logs
    assert m.join_queue == [] and m.stopped is None


def test_join_with_a_numeric_address_is_queued():
    m = leader()
    m.handle(ReceivedAtAddress(wire.encode(wire.JOIN, 3, ["127.0.0.1", 1, 2, 3, 4, 5], 7)), 1.0)
    assert [c.node for c in m.join_queue] == [3] or m.view.members == [0, 3]


def test_local_ip_is_advertised_as_a_numeric_address():
    from derecho_core.conf import Conf
    from derecho_core.engine import advertised_ip
    from derecho_core.errors import ConfigError

    assert advertised_ip(Conf.load(environ={}, overrides={"DERECHO/local_ip": "localhost"})) == "127.0.0.1"
    assert advertised_ip(Conf.load(environ={}, overrides={"DERECHO/local_ip": "127.0.0.5"})) == "127.0.0.5"
    with pytest.raises(ConfigError, match="DERECHO/local_ip.*does not resolve"):
        advertised_ip(Conf.load(environ={}, overrides={"DERECHO/local_ip": "no-such-host.invalid"}))
