"""The Sans-IO handshake of derecho_core.handshake: records, versions, keys, self-connection, duplicates."""

from __future__ import annotations

import struct

import pytest

from derecho_core import handshake as hs
from derecho_core.handshake import (
    REFUSE_DUPLICATE,
    DuplicateConnectionError,
    Handshake,
    Hello,
    decode_record,
    encode_hello,
    load_cluster_key,
    parse_hello,
)
from derecho_core.transport import (
    AuthenticationError,
    HandshakeError,
    SelfConnectionError,
    VersionMismatchError,
)

pytestmark = pytest.mark.timeout(20)


def run(init: Handshake, acc: Handshake, tail: bytes = b""):
    """Drive both ends to completion; returns the exceptions (initiator, acceptor) or Nones."""
    errors: list[BaseException | None] = [None, None]
    try:
        welcome = acc.receive(init.start())
    except HandshakeError as exc:
        errors[1] = exc
        try:
            init.receive(exc.reply)
        except HandshakeError as exc2:
            errors[0] = exc2
        return errors
    try:
        confirm = init.receive(welcome)
    except HandshakeError as exc:
        errors[0] = exc
        try:
            acc.receive(exc.reply)
        except HandshakeError as exc2:
            errors[1] = exc2
        return errors
    try:
        acc.receive(confirm + tail)
    except HandshakeError as exc:
        errors[1] = exc
    return errors


def pair(key_i=None, key_a=None, **kw):
    i = Handshake("initiator", 1, 111, key=key_i, expected_peer=kw.pop("expected", 2),
                  address=("127.0.0.1", 4000), extra=b"ep-name", version=kw.pop("vi", None))
    a = Handshake("acceptor", kw.pop("acc_id", 2), 222, key=key_a, version=kw.pop("va", None), **kw)
    return i, a


def test_plain_handshake_completes_and_keeps_leftover_bytes():
    i, a = pair()
    assert run(i, a, tail=b"first frame bytes") == [None, None]
    assert i.done and a.done
    assert i.peer.node_id == 2 and a.peer.node_id == 1
    assert a.peer.incarnation == 111 and i.peer.incarnation == 222
    assert a.peer.address == ("127.0.0.1", 4000) and a.peer.extra == b"ep-name"
    assert a.leftover == b"first frame bytes"


def test_byte_at_a_time_delivery():
    i, a = pair(b"k", b"k")
    data = i.start()
    out = b""
    for k in range(len(data)):
        out += a.receive(data[k:k + 1])
    conf = b""
    for k in range(len(out)):
        conf += i.receive(out[k:k + 1])
    assert i.done
    for k in range(len(conf)):
        a.receive(conf[k:k + 1])
    assert a.done


def test_same_key_works_and_wrong_or_missing_keys_are_refused_on_both_ends():
    assert run(*pair(b"secret", b"secret")) == [None, None]
    ei, ea = run(*pair(b"secret", b"other"))
    assert isinstance(ei, AuthenticationError) and isinstance(ea, AuthenticationError)
    assert "challenge" in str(ei) and "challenge" in str(ea)
    ei, ea = run(*pair(None, b"secret"))
    assert isinstance(ea, AuthenticationError) and "no cluster key" in str(ea)
    assert isinstance(ei, AuthenticationError) and "refused" in str(ei)
    ei, ea = run(*pair(b"secret", None))
    assert isinstance(ea, AuthenticationError) and "has none" in str(ea)
    assert isinstance(ei, AuthenticationError)


def test_forged_confirm_is_refused():
    i, a = pair(b"k", b"k")
    a.receive(i.start())
    with pytest.raises(AuthenticationError):
        a.receive(hs.encode_confirm(b"\0" * 32))


def test_version_mismatch_is_clear_on_both_ends():
    ei, ea = run(*pair(vi=2))
    assert isinstance(ea, VersionMismatchError) and isinstance(ei, VersionMismatchError)
    for e in (ei, ea):
        assert "version mismatch" in str(e) and "1" in str(e) and "2" in str(e)
    assert ea.ours == 1 and ea.theirs == 2


def test_module_version_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(hs, "PROTOCOL_VERSION", 7)
    h = Handshake("initiator", 1, 1)
    rec, _ = decode_record(h.start())
    assert rec.version == 7


def test_connection_to_oneself_is_detected():
    i = Handshake("initiator", 5, 55)
    with pytest.raises(SelfConnectionError):
        i.receive(i.start())  # TCP simultaneous open: our own HELLO comes back
    ei, ea = run(*pair(acc_id=1))  # acceptor with the initiator's node id
    assert isinstance(ea, SelfConnectionError) and isinstance(ei, SelfConnectionError)


def test_wrong_node_answers():
    ei, ea = run(*pair(expected=3))
    assert isinstance(ei, HandshakeError) and "expected node 3" in str(ei)


def test_accept_callback_can_refuse_duplicates():
    i, a = pair(accept=lambda h: (REFUSE_DUPLICATE, "already connected"))
    ei, ea = run(i, a)
    assert isinstance(ea, DuplicateConnectionError) and isinstance(ei, DuplicateConnectionError)


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n", b"\x00" * 20, b"DERECHO\x00\x09\x01\x00\x00\x00\x00\x00",
                                  b"DERECHO\x00\x01\x01\x00\xff\xff\xff\xff"])
def test_garbage_is_refused_not_crashing(junk):
    a = Handshake("acceptor", 2, 1)
    with pytest.raises(HandshakeError) as info:
        a.receive(junk)
    assert info.value.reply.startswith(hs.MAGIC)  # a REFUSE the other end can read


def test_truncated_and_malformed_bodies():
    assert decode_record(encode_hello(Hello(1, 2, b"n" * 32))[:-3]) is None  # incomplete, not an error
    rec, _ = decode_record(encode_hello(Hello(1, 2, b"n" * 32)))
    bad = hs.Record(rec.kind, rec.version, rec.body[:-1])
    with pytest.raises(HandshakeError):
        parse_hello(bad)
    body = rec.body + b"x"
    with pytest.raises(HandshakeError, match="trailing"):
        parse_hello(hs.Record(rec.kind, rec.version, body))


def test_record_header_layout_is_frozen():
    data = hs.encode_refuse(hs.REFUSE_VERSION, 3, "why", version=9)
    magic, kind, version, length = struct.unpack_from("<8sBHI", data)
    assert (magic, kind, version, length) == (b"DERECHO\x00", 4, 9, len(data) - 15)


def test_load_cluster_key(tmp_path):
    p = tmp_path / "key"
    p.write_text("  s3cret \n")
    assert load_cluster_key(str(p)) == b"s3cret"
    assert load_cluster_key("") is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthenticationError, match="empty"):
        load_cluster_key(str(tmp_path / "empty"))
    with pytest.raises(AuthenticationError, match="cannot read"):
        load_cluster_key(str(tmp_path / "missing"))
