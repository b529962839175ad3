"""Replicated objects and RPC: method marking, the wire format, QueryResults and the per-node manager."""
