"""Fixtures of the verbs plugin's tests: everything on 127.0.0.1 with libfabric's tcp provider."""

from __future__ import annotations

import pytest

from derecho_transport_verbs._testhelpers import make_conf, poll_until


@pytest.fixture
def pair():
    """Two connected in-process tcp transports (node 1 listens, node 2 connects)."""
    from derecho_core.transport import PeerConnected
    from derecho_transport_verbs.transport import VerbsTransport

    a = VerbsTransport(make_conf(), 1, ("127.0.0.1", 0))
    b = VerbsTransport(make_conf(), 2, ("127.0.0.1", 0))
    a.listen()
    b.listen()
    b.connect(1, a.address)
    poll_until([a, b], lambda g: any(isinstance(e, PeerConnected) for e in g[a])
               and any(isinstance(e, PeerConnected) for e in g[b]))
    yield a, b
    b.close()
    a.close()
