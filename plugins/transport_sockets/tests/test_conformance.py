"""The transport conformance suite, run against the ``sockets`` provider."""

from derecho_core.testing.transport import TransportConformance


class TestSocketsConformance(TransportConformance):
    provider = "sockets"
