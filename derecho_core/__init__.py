"""derecho-py: replicated, fault-tolerant services after Cornell's Derecho.

The public API is re-exported here (see DESIGN §6). Names that later layers
provide are imported lazily, so ``import derecho_core`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .conf import Conf
from .errors import (
    ConfigError,
    DerechoError,
    NodeRemovedFromGroupError,
    PluginError,
    PluginNotFoundError,
    RemoteExceptionOccurred,
    SenderRemovedFromGroupError,
    SubgroupProvisioningError,
)
from .hookspecs import hookimpl

if TYPE_CHECKING:  # type checkers see the lazily imported names with their real types
    from .callbacks import UserMessageCallbacks
    from .engine import GroupStoppedError
    from .external_client import ExternalClientCaller, ExternalClientRefusedError, ExternalGroupClient
    from .group import Group
    from .persistent import Persistent, PersistentRegistry, Volatile
    from .replicated import ExternalCaller, PeerCaller, RawObject, Replicated
    from .rpc.manager import PayloadTooLargeError
    from .rpc.methods import ordered, p2p, rpc_name
    from .rpc.query_results import DeadlockError, QueryResults
    from .rpc.wire import SerializationError
    from .storage import (
        HLC,
        DiskFullError,
        InvalidIndexError,
        InvalidTimestampError,
        InvalidVersionError,
        LogCorruptionError,
        LogFullError,
        LogLockedError,
        StorageError,
        VersionNotStableError,
    )
    from .subgroup_info import SubgroupInfo
    from .view import IpAndPorts, Mode, SubView, View, make_next_view

__version__ = "0.1.0"

# name -> module that defines it, imported on first use
_LAZY: dict[str, str] = {
    "View": ".view",
    "SubView": ".view",
    "Mode": ".view",
    "IpAndPorts": ".view",
    "make_next_view": ".view",
    "SubgroupInfo": ".subgroup_info",
    "Group": ".group",
    "Replicated": ".replicated",
    "RawObject": ".replicated",
    "PeerCaller": ".replicated",
    "ExternalCaller": ".replicated",
    "ordered": ".rpc.methods",
    "p2p": ".rpc.methods",
    "rpc_name": ".rpc.methods",
    "QueryResults": ".rpc.query_results",
    "DeadlockError": ".rpc.query_results",
    "PayloadTooLargeError": ".rpc.manager",
    "SerializationError": ".rpc.wire",
    "ExternalGroupClient": ".external_client",
    "ExternalClientCaller": ".external_client",
    "ExternalClientRefusedError": ".external_client",
    "UserMessageCallbacks": ".callbacks",
    "GroupStoppedError": ".engine",
    "Transport": ".transport",
    "TransportError": ".transport",
    "TransportClosedError": ".transport",
    "NotConnectedError": ".transport",
    "SendQueueFull": ".transport",
    "HandshakeError": ".transport",
    "VersionMismatchError": ".transport",
    "AuthenticationError": ".transport",
    "PeerConnected": ".transport",
    "PeerFailed": ".transport",
    "MessageReceived": ".transport",
    "open_transport": ".transport",
    "Persistent": ".persistent",
    "Volatile": ".persistent",
    "PersistentRegistry": ".persistent",
    "HLC": ".storage",
    "StorageError": ".storage",
    "LogCorruptionError": ".storage",
    "LogLockedError": ".storage",
    "DiskFullError": ".storage",
    "LogFullError": ".storage",
    "InvalidVersionError": ".storage",
    "InvalidIndexError": ".storage",
    "InvalidTimestampError": ".storage",
    "VersionNotStableError": ".storage",
}

__all__ = [
    "View",
    "SubView",
    "Mode",
    "IpAndPorts",
    "make_next_view",
    "SubgroupInfo",
    "Group",
    "Replicated",
    "RawObject",
    "PeerCaller",
    "ExternalCaller",
    "ordered",
    "p2p",
    "rpc_name",
    "QueryResults",
    "DeadlockError",
    "PayloadTooLargeError",
    "SerializationError",
    "ExternalGroupClient",
    "ExternalClientCaller",
    "ExternalClientRefusedError",
    "UserMessageCallbacks",
    "GroupStoppedError",
    "Conf",
    "ConfigError",
    "DerechoError",
    "NodeRemovedFromGroupError",
    "PluginError",
    "PluginNotFoundError",
    "RemoteExceptionOccurred",
    "SenderRemovedFromGroupError",
    "SubgroupProvisioningError",
    "hookimpl",
    "Transport",
    "TransportError",
    "TransportClosedError",
    "NotConnectedError",
    "SendQueueFull",
    "HandshakeError",
    "VersionMismatchError",
    "AuthenticationError",
    "PeerConnected",
    "PeerFailed",
    "MessageReceived",
    "open_transport",
    "Persistent",
    "Volatile",
    "PersistentRegistry",
    "HLC",
    "StorageError",
    "LogCorruptionError",
    "LogLockedError",
    "DiskFullError",
    "LogFullError",
    "InvalidVersionError",
    "InvalidIndexError",
    "InvalidTimestampError",
    "VersionNotStableError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'derecho_core' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_LAZY))
