"""Test helpers that plugins reuse: :mod:`derecho_core.testing.transport` is the transport conformance suite."""
