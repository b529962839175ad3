"""Events the engine (or the simulator) feeds to the protocol, and actions it gets back.

The protocol never performs I/O: it returns these actions and the caller
performs them, with the real transport and clock or with the simulator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

Address = tuple[str, int]


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; the protocol checks its timers (heartbeats, suspicion)."""


@dataclass(frozen=True, slots=True)
class Received:
    """A message from member ``node_id`` over the transport."""

    node_id: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ReceivedAtAddress:
    """A message on the GMS channel (join traffic), addressed to this node's GMS address."""

    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """The transport lost ``node_id`` (reset, crash, stall)."""

    node_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReportFailure:
    """The application (``Group.report_failure``) says ``node_id`` has failed."""

    node_id: int


@dataclass(frozen=True, slots=True)
class LeaveRequest:
    """The application asked to leave the group gracefully."""


Event = Union[Tick, Received, ReceivedAtAddress, PeerUnreachable, ReportFailure, LeaveRequest]


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    node_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToAddress:
    """Send on the GMS channel to a node known only by address (joins, redirects, welcomes)."""

    address: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    node_id: int
    address: Address


@dataclass(frozen=True, slots=True)
class Disconnect:
    node_id: int


@dataclass(frozen=True, slots=True)
class WedgeView:
    """Stop sending and delivering in view ``vid`` (the multicast layer wedges)."""

    vid: int


@dataclass(frozen=True, slots=True)
class InstallView:
    """A new view is installed at this node. ``view`` is a :class:`derecho_core.protocol.membership.GroupView`."""

    view: Any
    allocation: Any = None


@dataclass(frozen=True, slots=True)
class Stop:
    """This node must stop: ``kind`` is partition, removed, left, id_in_use or error."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str
    args: tuple[Any, ...] = field(default=())


Action = Union[Send, SendToAddress, Connect, Disconnect, WedgeView, InstallView, Stop, Log]
