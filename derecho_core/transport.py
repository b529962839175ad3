"""The transport contract: what the engine needs to move bytes between nodes.

A transport plugin registers a factory per provider name (see
:func:`derecho_core.hookspecs.derecho_register_transports`)::

    @hookimpl
    def derecho_register_transports(register):
        register("sockets", SocketsTransport)     # SocketsTransport(conf, node_id, address)

and the factory returns a :class:`Transport`. ``docs/transports.md`` is the
guide; :mod:`derecho_core.testing.transport` is the conformance suite every
plugin runs against itself.

The model (DESIGN §4): one engine thread owns the transport. It calls
:meth:`Transport.poll`, which *drives progress* (reads, writes, accepts,
handshakes, failure detection: libfabric's manual progress, or a selector)
and returns :data:`Event` objects. Nothing happens behind the engine's back
except what the OS or NIC does on its own; a plugin may use helper threads
but need not. Other threads may call :meth:`Transport.send`,
:meth:`Transport.try_send` and :meth:`Transport.wake`; every method is
thread-safe unless said otherwise.

Guarantees a transport gives, per peer:

* **reliable, FIFO**: messages sent to a peer over one connection arrive
  whole, once, in send order, or the peer is reported failed;
* **message boundaries**: one :meth:`~Transport.send` of several buffers is
  one :class:`MessageReceived` at the peer, its buffers concatenated;
* **bounded memory**: at most ``[RDMA] tx_depth`` messages (and at most
  :attr:`Transport.max_queued_bytes` bytes, but always at least one message)
  wait in a peer's send queue; a full queue pushes back (see
  :meth:`~Transport.send`). Receiving is bounded by ``[RDMA] rx_depth`` and
  :attr:`Transport.max_message_size`;
* **failure reporting**: a peer whose connection breaks, whose process dies,
  or whose queue makes no progress for ``[DERECHO] sst_poll_cq_timeout_ms``
  is reported once with :class:`PeerFailed`; its queued messages are dropped.

Every connection starts with the handshake of :mod:`derecho_core.handshake`
(magic, protocol version, node id, incarnation, optional cluster-key HMAC).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, Union, runtime_checkable

from .errors import DerechoError

if TYPE_CHECKING:
    from .conf import Conf

__all__ = [
    "Address",
    "Buffer",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_QUEUED_BYTES",
    "Event",
    "HandshakeError",
    "AuthenticationError",
    "FrameError",
    "MemoryRegion",
    "MessageReceived",
    "NotConnectedError",
    "PeerConnected",
    "PeerFailed",
    "RMACapability",
    "RMAWriteCompleted",
    "RemoteRegion",
    "SelfConnectionError",
    "SendQueueFull",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "TransportFactory",
    "VersionMismatchError",
    "open_transport",
]

#: ``(host, port)``: where a node listens. Port 0 in a factory's address means "pick a free port".
Address = tuple[str, int]
#: Anything with the buffer protocol: bytes, bytearray, memoryview, numpy arrays...
Buffer = Union[bytes, bytearray, memoryview]

#: Largest message a transport accepts by default (sending or receiving): 256 MiB.
DEFAULT_MAX_MESSAGE_SIZE = 256 << 20
#: Default byte cap of one peer's send queue (a single larger message is still accepted alone).
DEFAULT_MAX_QUEUED_BYTES = 64 << 20


# ----------------------------------------------------------------------------- errors


class TransportError(DerechoError):
    """Something went wrong in a transport. ``node_id`` is the peer concerned, if any."""

    def __init__(self, message: str, *, node_id: int | None = None):
        super().__init__(message)
        self.node_id = node_id


class TransportClosedError(TransportError):
    """The transport was closed; no more sends or polls."""


class NotConnectedError(TransportError):
    """``send`` to a peer that is not connected (never connected, failed, or disconnected)."""


class SendQueueFull(TransportError):
    """The peer's send queue stayed full for the whole ``timeout`` given to :meth:`Transport.send`."""


class FrameError(TransportError):
    """A peer sent bytes that are not a valid frame (bad type, absurd length, garbage).

    The transport closes that connection, logs it on ``derecho.transport`` and
    reports :class:`PeerFailed` if the peer had completed its handshake.
    """


class HandshakeError(TransportError):
    """A connection's handshake failed; the connection is closed, never used.

    ``reply`` holds the bytes to send (best effort) before closing, so the other
    end learns why (a REFUSE record; see :mod:`derecho_core.handshake`).
    """

    reply: bytes = b""


class VersionMismatchError(HandshakeError):
    """The two ends speak different protocol versions; both ends log a clear message."""

    def __init__(self, message: str, *, node_id: int | None = None, ours: int = 0, theirs: int = 0):
        super().__init__(message, node_id=node_id)
        self.ours = ours
        self.theirs = theirs


class AuthenticationError(HandshakeError):
    """Cluster-key HMAC challenge failed (no key, wrong key, or key on one end only)."""


class SelfConnectionError(HandshakeError):
    """A connection reached this very node (TCP simultaneous open on loopback); it is retried."""


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """The handshake with ``node_id`` completed; sends to it are now accepted.

    ``address`` is the peer's listening address when known (what it announced
    in its handshake), else the socket's remote address. ``incarnation``
    identifies the peer process: a new value means the peer restarted.
    """

    node_id: int
    address: Address | None = None
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """One whole message from ``node_id``.

    ``data`` is a bytes-like object (usually a ``memoryview``) that the
    receiver owns: the transport never reuses its memory, so it may be kept.
    """

    node_id: int
    data: Buffer

    def __len__(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """The connection to ``node_id`` is gone; reported once per connection.

    ``clean`` is true when the peer (or this node, through
    :meth:`Transport.disconnect`) closed it in an orderly way; false for
    crashes, resets, stalls, protocol errors. Messages still queued for the
    peer were dropped. A later :meth:`Transport.connect` (or the peer's
    reconnection) brings a fresh :class:`PeerConnected`.
    """

    node_id: int
    reason: str = ""
    clean: bool = False


@dataclass(frozen=True, slots=True)
class RMAWriteCompleted:
    """An RMA write posted with a ``token`` is visible at the target (delivery complete)."""

    node_id: int
    token: Any = None


Event = Union[PeerConnected, MessageReceived, PeerFailed, RMAWriteCompleted]


# ----------------------------------------------------------------------------- the contract


class Transport(abc.ABC):
    """Abstract base of every transport. Subclass it (or match it duck-typed).

    Construction (the registered factory) is ``Factory(conf, node_id, address)``
    and must not block for long nor do network I/O besides binding:

    * ``conf``: the node's :class:`~derecho_core.Conf`. Keys a transport honours:
      ``RDMA/domain`` (interface, address or libfabric domain to bind; empty
      means ``address[0]``, else ``DERECHO/local_ip``), ``RDMA/tx_depth`` (per
      peer send-queue depth, messages), ``RDMA/rx_depth`` (receive depth),
      ``DERECHO/cluster_key_file`` (shared secret for the HMAC handshake),
      ``DERECHO/sst_poll_cq_timeout_ms`` (a send or handshake making no
      progress for this long fails the peer), and
      ``DERECHO/p2p_loop_busy_wait_before_sleep_ms`` (how long ``poll`` may
      busy-poll after activity before it sleeps);
    * ``node_id``: this node's id (``int >= 0``);
    * ``address``: ``(host, port)`` to listen on; port 0 picks a free port.
    """

    #: provider name, as registered ("sockets", "tcp", ...)
    provider: ClassVar[str] = ""

    node_id: int
    #: largest message accepted by :meth:`send` and from the wire
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: byte cap of one peer's send queue (a single bigger message still goes alone)
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    #: the optional RMA capability, or None (see :class:`RMACapability`)
    rma: RMACapability | None = None

    # -- lifecycle -----------------------------------------------------------------
    @abc.abstractmethod
    def listen(self) -> Address:
        """Start accepting connections; returns the actual ``(host, port)``. Idempotent."""

    @property
    @abc.abstractmethod
    def address(self) -> Address:
        """The listening address (after :meth:`listen`; before, the requested one)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection (orderly when possible) and release resources.

        Idempotent. Afterwards ``send``/``poll`` raise :class:`TransportClosedError`;
        ``wake`` is a no-op. Peers see :class:`PeerFailed` with ``clean=True``.
        """

    # -- connections ---------------------------------------------------------------
    @abc.abstractmethod
    def connect(self, node_id: int, address: Address) -> None:
        """Open a connection to ``node_id`` listening at ``address``; never blocks.

        Progress happens in :meth:`poll`, which later returns
        :class:`PeerConnected` (or :class:`PeerFailed` if the peer could not be
        reached within ``sst_poll_cq_timeout_ms``; refused connects are retried
        until then). A no-op if the peer is connected or being connected.
        Either side may connect; when both do at once, exactly one connection
        survives (the one opened by the smaller node id) and each side sees
        one :class:`PeerConnected`.
        """

    @abc.abstractmethod
    def disconnect(self, node_id: int) -> None:
        """Close the connection to ``node_id`` in order; queued messages are dropped.

        This node then gets :class:`PeerFailed` (``clean=True``) from the next
        poll, the peer too. A no-op for an unknown peer.
        """

    @abc.abstractmethod
    def peers(self) -> set[int]:
        """Node ids whose handshake completed and that have not failed."""

    # -- sending -------------------------------------------------------------------
    @abc.abstractmethod
    def try_send(self, node_id: int, buffers: Sequence[Buffer]) -> bool:
        """Queue one message (the concatenation of ``buffers``) for ``node_id``; never blocks.

        Returns True when queued, **False when the peer's queue is full**
        (``tx_depth`` messages or ``max_queued_bytes`` bytes waiting): the
        would-block result; poll and retry later. Raises
        :class:`NotConnectedError` if the peer is not connected,
        :class:`ValueError` if the message exceeds :attr:`max_message_size`.

        The transport keeps references to ``buffers`` (no copy) until the
        message is written: the caller must not modify them afterwards.
        """

    @abc.abstractmethod
    def send(self, node_id: int, buffers: Sequence[Buffer], *, timeout: float | None = None) -> None:
        """Queue one message, waiting while the peer's queue is full.

        While it waits it drives the transport's progress itself (so it cannot
        deadlock against the engine thread). ``timeout`` in seconds (None: wait
        until there is room, the peer fails or the transport closes; 0: same as
        :meth:`try_send`). Raises :class:`SendQueueFull` when the queue is still
        full at the deadline, :class:`NotConnectedError` if the peer is not (or
        no longer) connected. Same buffer ownership rule as :meth:`try_send`.
        """

    @abc.abstractmethod
    def queued(self, node_id: int) -> int:
        """How many messages wait in ``node_id``'s send queue (0 for unknown peers)."""

    # -- receiving / progress ------------------------------------------------------
    @abc.abstractmethod
    def poll(self, timeout: float | None = 0.0) -> list[Event]:
        """Drive progress and return the events that happened, oldest first.

        ``timeout`` in seconds: 0 returns at once, None waits until an event or
        :meth:`wake`. Returns as soon as it has at least one event (it may batch
        what is already available). An empty list means timeout or wake-up.
        Only one thread polls at a time (the engine thread).
        """

    @abc.abstractmethod
    def wake(self) -> None:
        """Make a concurrent (or the next) :meth:`poll` return promptly. Thread-safe, cheap."""

    # -- conveniences --------------------------------------------------------------
    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TransportFactory(Protocol):
    def __call__(self, conf: Conf, node_id: int, address: Address) -> Transport: ...


# ----------------------------------------------------------------------------- optional RMA


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """Local memory registered for RMA. ``descriptor`` is what a peer needs to write into it.

    Send ``descriptor`` (opaque bytes, provider-specific: key, base address,
    length) to the peers over an ordinary message; they turn it into a
    :class:`RemoteRegion` with :meth:`RMACapability.remote_region`.
    """

    key: int
    length: int
    descriptor: bytes
    buffer: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """A peer's registered region, as this node may write into it."""

    node_id: int
    key: int
    length: int
    descriptor: bytes = b""


@runtime_checkable
class RMACapability(Protocol):
    """Registered memory and one-sided writes, for providers that have them.

    Exposed as ``transport.rma`` (None when the provider lacks RMA). The SST and
    RDMC use it when present and fall back to messages otherwise. Rules:

    * a registered buffer stays referenced by the transport until
      :meth:`deregister` (a peer may write into it at any time before that);
    * writes to one peer land in post order (write-after-write), so a later
      write visible at the target implies the earlier ones are;
    * bounds and keys are checked by the transport before posting
      (:class:`ValueError`), whatever the provider checks;
    * a write with a ``token`` yields :class:`RMAWriteCompleted` once it is
      visible at the target; a write that cannot complete within
      ``sst_poll_cq_timeout_ms`` fails the peer (:class:`PeerFailed`);
    * the target learns nothing by itself: it sees the bytes change in its
      memory (and must keep polling its transport, which drives progress).
    """

    def register(self, buffer: Buffer) -> MemoryRegion:
        """Register a writable buffer (bytearray, writable memoryview, mmap)."""
        ...

    def deregister(self, region: MemoryRegion) -> None: ...

    def remote_region(self, node_id: int, descriptor: bytes) -> RemoteRegion:
        """Decode a peer's :attr:`MemoryRegion.descriptor`."""
        ...

    def write(self, remote: RemoteRegion, offset: int, data: Buffer, *, token: Any = None) -> bool:
        """Write ``data`` at ``offset`` in the peer's region. False if its queue is full (retry)."""
        ...


# ----------------------------------------------------------------------------- helpers


def open_transport(conf: Conf, node_id: int, address: Address, provider: str | None = None) -> Transport:
    """Build the transport ``[RDMA] provider`` (or ``provider``) names, through the plugin registry."""
    from .plugins import transport as lookup

    name = provider if provider is not None else conf.get("RDMA/provider")
    return lookup(name)(conf, node_id, address)
