"""The exception hierarchy of derecho-py.

Every error the toolkit raises on purpose derives from :class:`DerechoError`, so an
application can catch the whole family in one place.
"""

from __future__ import annotations


class DerechoError(Exception):
    """Base class of every error raised by derecho-py."""


class ConfigError(DerechoError):
    """A configuration file, command-line option or override is invalid.

    ``source`` is where the bad value came from (``"derecho.cfg:12"``,
    ``"command line"``, ``"default"``), ``key`` the ``SECTION/key`` it concerns.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        prefix = ""
        if source and key:
            prefix = f"{source}: {key}: "
        elif source:
            prefix = f"{source}: "
        elif key:
            prefix = f"{key}: "
        super().__init__(prefix + message)
        self.message = message


class PluginError(DerechoError):
    """A plugin could not be loaded or registered something invalid."""


class PluginNotFoundError(PluginError, LookupError):
    """No installed plugin provides the requested transport, allocator or store."""

    def __init__(self, message: str, *, kind: str = "", name: str = "", installed: list[str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.installed = list(installed or [])


class SubgroupProvisioningError(DerechoError):
    """The view has too few members to give every shard its minimum size."""


class NodeRemovedFromGroupError(DerechoError):
    """The node that was to reply left the group (or failed) before replying."""

    def __init__(self, node_id: int, message: str | None = None):
        self.node_id = node_id
        super().__init__(message or f"node {node_id} was removed from the group before it replied")


class SenderRemovedFromGroupError(DerechoError):
    """This node was removed from the group before its message could be delivered."""


class RemoteExceptionOccurred(DerechoError):
    """The remote RPC handler raised; ``remote_type`` and ``remote_message`` say what."""

    def __init__(self, node_id: int, remote_type: str, remote_message: str):
        self.node_id = node_id
        self.remote_type = remote_type
        self.remote_message = remote_message
        super().__init__(f"node {node_id} raised {remote_type}: {remote_message}")
