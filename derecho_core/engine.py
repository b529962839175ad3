"""The engine: one thread per node that owns all protocol state (DESIGN §4).

It polls the transport chosen by ``[RDMA] provider``, fires the protocol's
timers, feeds events to the pure state machines and performs the actions they
return. Other threads talk to it only through :meth:`Engine.submit` (a queue
plus the transport's thread-safe wake-up); the engine calls back into a
listener (the :class:`~derecho_core.group.Group`) from its own thread, and the
listener hands the work to its delivery thread.

Every transport message starts with one byte naming the layer it is for.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import secrets
import socket
import threading
import time
from typing import Any, Callable, Hashable, Protocol, Sequence

import msgpack

from . import plugins
from .conf import Conf
from .errors import ConfigError, DerechoError
from .gms_channel import GmsChannel
from .handshake import load_cluster_key
from .protocol import events as ev
from .protocol.membership import Membership
from .protocol.multicast import Delivery, ShardParams
from .protocol.node import CH_MEMBERSHIP, Applied, Deliver, NodeProtocol, SendRejected, SendRequest
from .protocol.progress import LocalProgress, ShardProgress
from .protocol.restart import RestartInfo
from .transport import MessageReceived, NotConnectedError, PeerConnected, PeerFailed, Transport
from .view import IpAndPorts, View

log = logging.getLogger("derecho.viewmanager")

CH_BARRIER = b"B"
CH_RPC_REQUEST = b"Q"  # point-to-point RPC traffic goes to the listener, not the protocol
CH_RPC_REPLY = b"R"
#: how many messages a sender may queue in a shard before ``send`` waits (beyond the window)
MAX_QUEUED_SENDS = 1024
#: how long a leaving node keeps reading after its announcement went out (see Engine._finish)
LEAVE_GRACE_S = 0.2
#: how long a leaving node waits for every member to show it read the departure (Engine._finish)
LEAVE_ACK_TIMEOUT_S = 2.0
#: messages waiting for a peer's connection (or room in its send queue); past this the peer is failed
MAX_BACKLOG = 100_000


class EngineListener(Protocol):
    def view_installed(self, view: View) -> None: ...
    def stopped(self, stop: ev.Stop) -> None: ...
    def deliver(self, deliveries: list[Delivery]) -> None: ...
    def send_rejected(self, tag: Any, error: Exception) -> None: ...
    def rpc_request(self, node_id: int, data: memoryview) -> None: ...
    def rpc_replies(self, node_id: int, data: memoryview) -> None: ...
    def shard_progress(self, progress: ShardProgress) -> None: ...


class GroupStoppedError(DerechoError):
    """This node stopped being a member: ``kind`` is partition, removed, left, id_in_use or error."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def advertised_ip(conf: Conf) -> str:
    """``DERECHO/local_ip`` as a numeric IPv4 address, resolved once here.

    Views carry it to every member, whose transports connect to it: a host name there would be
    resolved on each member's engine thread, and a leader refuses a JOIN naming anything but a
    numeric address (one frame naming a host that does not resolve could otherwise stop a group).
    """
    host = conf.get("DERECHO/local_ip")
    numeric = _numeric(host)
    if numeric is None:
        raise ConfigError(f"{host!r} does not resolve to an IPv4 address; give this node's IP address "
                          "(the others connect to it)", key="DERECHO/local_ip", source=conf.source("DERECHO/local_ip"))
    return numeric


def _numeric(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (OSError, UnicodeError, IndexError):
        return None


def _numeric_or_same(host: str) -> str:
    return _numeric(host) or host


class Engine:
    """Runs one node's protocol. ``start()`` then ``wait_for_first_view()``."""

    def __init__(self, conf: Conf, *, subgroup_info: Any = None, types: Sequence[Hashable] = (),
                 listener: EngineListener | None = None, transport: Transport | None = None,
                 restart: RestartInfo | None = None) -> None:
        self.conf = conf
        self.node_id: int = conf.get("DERECHO/local_id")
        ip = advertised_ip(conf)
        self.address = IpAndPorts(ip, conf.get("DERECHO/gms_port"), conf.get("DERECHO/state_transfer_port"),
                                  conf.get("DERECHO/sst_port"), conf.get("DERECHO/rdmc_port"),
                                  conf.get("DERECHO/external_port"))
        self.types = list(types)
        self.listener = listener
        allocate: Callable[[View | None, View], Any] | None = None
        if subgroup_info is not None:
            def allocate(prev: View | None, view: View) -> Any:
                return subgroup_info.allocate(self.types, prev, view, raise_on_inadequate=True)
        self.membership = Membership(
            self.node_id, self.address, heartbeat_ms=conf.get("DERECHO/heartbeat_ms"),
            suspicion_timeout_ms=conf.get("DERECHO/suspicion_timeout_ms"),
            partition_safety=not conf.get("DERECHO/disable_partitioning_safety"),
            allocate=allocate, nonce=secrets.randbits(62) or 1, subgroup_type_order=self.types,
            group_id=secrets.token_hex(8), restart=restart,
            restart_timeout_ms=conf.get("DERECHO/restart_timeout_ms"),
            restart_leaders=self.restart_leaders(conf),
            backup_restart_leaders=conf.get("DERECHO/enable_backup_restart_leaders"))
        self.restart = restart
        # with a listener, deliveries are finished on its thread, which reports back (report_applied)
        self.node = NodeProtocol(self.membership, self._shard_params, track_applied=listener is not None)
        if transport is None:
            factory = plugins.transport(conf.get("RDMA/provider"))
            transport = factory(conf, self.node_id, (ip, self.address.sst_port))
        self.transport = transport
        self.key = load_cluster_key(conf)
        self._gms: GmsChannel | None = None
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._backlog: dict[int, collections.deque[Any]] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._lock = threading.Lock()
        self._view: View | None = None
        self._first_view = threading.Event()
        self._stop: ev.Stop | None = None
        self._stopped = threading.Event()
        self._barriers: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        self._barrier_waiters: dict[tuple[int, int], threading.Event] = {}
        self._barrier_round = 0

    @staticmethod
    def restart_leaders(conf: Conf) -> list[tuple[str, int]]:
        """``restart_leaders``/``restart_leader_ports`` in order; left at their defaults, the contact."""
        if conf.source("DERECHO/restart_leaders") == "default" and \
                conf.source("DERECHO/restart_leader_ports") == "default":
            return [(conf.get("DERECHO/contact_ip"), conf.get("DERECHO/contact_port"))]
        return list(zip(conf.get("DERECHO/restart_leaders"), conf.get("DERECHO/restart_leader_ports"),
                        strict=True))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.transport.listen()
        self._gms = GmsChannel(self.address.ip_address, self.address.gms_port, self._on_gms, self.key)
        contact = (self.conf.get("DERECHO/contact_ip"), self.conf.get("DERECHO/contact_port"))
        if self.restart is not None:
            contact = self.restart_leaders(self.conf)[0]  # the first restart leader gathers the restart
        now = self._now()
        if (_numeric_or_same(contact[0]), contact[1]) == (self.address.ip_address, self.address.gms_port):
            log.info("node %d starts a new group as its leader (contact %s:%d)", self.node_id, *contact)
            actions = self.node.start_new_group(now)
        else:
            log.info("node %d joins the group through %s:%d", self.node_id, *contact)
            actions = self.node.start_join(contact, now)
        self._running = True
        self._perform(actions)
        self._thread = threading.Thread(target=self._run, name=f"derecho-engine-{self.node_id}", daemon=True)
        self._thread.start()

    def wait_for_first_view(self, timeout: float | None = None) -> View:
        """Block until this node is in an installed view; raises :class:`GroupStoppedError` if it stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stop is not None:
                raise GroupStoppedError(self._stop.kind, self._stop.reason)
            if self._first_view.wait(0.05):
                assert self._view is not None
                return self._view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_id} was not admitted to a group within {timeout} s "
                                   "(is the contact running and reachable?)")

    @property
    def view(self) -> View | None:
        return self._view

    @property
    def stop_reason(self) -> ev.Stop | None:
        return self._stop

    def submit(self, kind: str, payload: Any = None) -> None:
        """Hand a request to the engine thread (thread-safe)."""
        was_empty = not self._inbox
        self._inbox.append((kind, payload))
        if was_empty:
            # the engine drains the whole inbox once awake: one wake-up per burst, not per request
            self.transport.wake()

    def _shard_params(self, profile: str) -> ShardParams:
        p = self.conf.profile(profile)
        return ShardParams(window_size=p["window_size"], max_payload_size=p["max_payload_size"],
                           max_smc_payload_size=p["max_smc_payload_size"], block_size=p["block_size"],
                           rdmc_send_algorithm=p["rdmc_send_algorithm"])

    def send(self, subgroup_id: int, payload: bytes, *, cooked: bool = False, tag: Any = None,
             timeout: float | None = None, timestamp_ns: int | None = None, wait_for_room: bool = True) -> None:
        """Multicast ``payload`` in a subgroup; waits while this node's queue for it is long.

        ``wait_for_room=False`` is for the delivery thread: the windows wait for it to finish the
        deliveries it is running, so waiting there for the queue to drain would never end.
        """
        deadline = None
        while wait_for_room and self._queued(subgroup_id) >= MAX_QUEUED_SENDS:
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            if self._stop is not None:
                raise GroupStoppedError(self._stop.kind, self._stop.reason)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"send in subgroup {subgroup_id} waited more than {timeout} s for room")
            time.sleep(0.0005)
        if self._stop is not None:
            raise GroupStoppedError(self._stop.kind, self._stop.reason)
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        self.submit("send", SendRequest(subgroup_id, bytes(payload), cooked, ts, tag))

    def send_p2p(self, node_id: int, data: bytes) -> None:
        """Send one point-to-point message (an RPC request or a reply batch) to a member."""
        self.submit("p2p", (node_id, data))

    def report_applied(self, done: list[tuple[int, int, int]],
                       raw: Sequence[tuple[int, int, int, int]] = ()) -> None:
        """The listener finished deliveries (reopens the windows).

        ``done``: ``(vid, subgroup id, last seq)`` of ordered shards; ``raw``: ``(vid, subgroup id,
        sender id, last index)`` of raw ones.
        """
        by_sg: dict[tuple[int, int], list[tuple[int, int]]] = collections.defaultdict(list)
        for vid, sg, sender, index in raw:
            by_sg[(vid, sg)].append((sender, index))
        for vid, sg, seq in done:
            self.submit("send", Applied(vid, sg, seq, tuple(by_sg.pop((vid, sg), ()))))
        for (vid, sg), pairs in by_sg.items():
            self.submit("send", Applied(vid, sg, -1, tuple(pairs)))

    def report_progress(self, subgroup_id: int, persisted: int, frontier_us: int) -> None:
        """Publish this node's persisted version and stability frontier of a subgroup to its shard."""
        self.submit("send", LocalProgress(subgroup_id, persisted, frontier_us))

    def _queued(self, subgroup_id: int) -> int:
        # read from the user's thread without a lock: a length of a deque is atomic in CPython, and an
        # approximate value is all flow control needs
        mc = self.node.multicast
        shard = mc.shards.get(subgroup_id) if mc is not None else None
        return len(self._inbox) + (len(shard.queue) if shard is not None else 0)

    def fail(self, reason: str) -> None:
        """Stop this node because of a local fault (for instance a log that cannot be written)."""
        self.submit("fail", reason)

    def report_failure(self, node_id: int) -> None:
        self.submit("event", ev.ReportFailure(node_id))

    def leave(self, timeout: float = 5.0) -> None:
        if self._stop is None and self._running:
            self.submit("event", ev.LeaveRequest())
            self._stopped.wait(timeout)
        self.close()

    def barrier_sync(self, timeout: float | None = None) -> None:
        """Return once every member of the current view has reached its own barrier_sync."""
        with self._lock:
            self._barrier_round += 1
            n = self._barrier_round
        done = threading.Event()
        self.submit("barrier", (n, done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.05):
            if self._stop is not None:
                raise GroupStoppedError(self._stop.kind, self._stop.reason)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("barrier_sync timed out")

    def close(self) -> None:
        self._running = False
        self.transport.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._gms is not None:
            self._gms.close()
        try:
            self.transport.close()
        except Exception:  # closing must not raise during shutdown
            log.debug("transport close failed", exc_info=True)

    # ------------------------------------------------------------------ the loop
    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000.0

    def _run(self) -> None:
        try:
            while self._running:
                deadline = self.membership.next_deadline()
                timeout = 0.0 if self._inbox else min(max(0.0, (deadline - self._now()) / 1000.0), 0.25)
                batch: list[Any] = []
                for event in self.transport.poll(timeout):
                    self._on_transport_event(event, batch)
                # a bounded batch, so a flood of sends cannot starve the transport and the timers
                for _ in range(min(len(self._inbox), 4096)):
                    kind, payload = self._inbox.popleft()
                    if kind == "send":
                        batch.append(payload)
                    else:
                        self._on_request(kind, payload)
                if self.membership.next_deadline() <= self._now():
                    batch.append(ev.Tick())
                if batch:
                    self._perform(self.node.handle_many(batch, self._now()))
                self._flush_backlog()
                if self._stop is not None:
                    self._finish()
                    return
        except Exception as exc:  # a bug must stop this node loudly, not leave a silent zombie
            log.exception("engine of node %d failed", self.node_id)
            self._set_stop(ev.Stop("error", f"internal error in the engine: {exc!r}"))

    def _finish(self) -> None:
        # give queued messages (the leave announcement) a moment to go out
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and (
                any(self._backlog.values()) or any(self.transport.queued(p) for p in self.transport.peers())):
            for event in self.transport.poll(0.01):
                if isinstance(event, PeerConnected):
                    self._flush_backlog()
            self._flush_backlog()
        # Keep reading before closing: closing a socket with unread data sends a reset, and a peer that
        # receives it loses whatever it had not read yet, the leave announcement included; it would
        # take the departure for a failure (several members leaving at once for a lost majority). So
        # wait until every live member has shown it read the announcement (its row marks this node
        # suspected), or LEAVE_ACK_TIMEOUT_S; then LEAVE_GRACE_S more for the last messages in flight.
        leaving = self.stop_reason is not None and self.stop_reason.kind == "left" and self.membership.leaving
        acked = time.monotonic() + (LEAVE_ACK_TIMEOUT_S if leaving else 0.0)
        while leaving and time.monotonic() < acked and self.transport.peers() \
                and not self.membership.leave_acknowledged():
            for event in self.transport.poll(0.01):
                if isinstance(event, MessageReceived) and bytes(event.data[:1]) == CH_MEMBERSHIP:
                    self.membership.handle(ev.Received(event.node_id, bytes(event.data[1:])), self._now())
                elif isinstance(event, PeerFailed):
                    self.membership.handle(ev.PeerUnreachable(event.node_id, event.reason), self._now())
        grace = time.monotonic() + LEAVE_GRACE_S
        while time.monotonic() < grace and self.transport.peers():
            self.transport.poll(0.01)
        self._running = False

    def _handle(self, event: Any) -> None:
        self._perform(self.node.handle(event, self._now()))

    def _on_transport_event(self, event: Any, batch: list[Any]) -> None:
        if isinstance(event, MessageReceived):
            data = event.data
            channel = bytes(data[:1])
            if channel == CH_RPC_REPLY or channel == CH_RPC_REQUEST:
                if self.listener is not None:
                    view = memoryview(data)[1:]
                    if channel == CH_RPC_REPLY:
                        self.listener.rpc_replies(event.node_id, view)
                    else:
                        self.listener.rpc_request(event.node_id, view)
            elif channel == CH_BARRIER:
                self._on_barrier(event.node_id, data[1:])
            else:
                batch.append(ev.Received(event.node_id, data))
        elif isinstance(event, PeerConnected):
            log.debug("node %d connected to node %d", self.node_id, event.node_id)
        elif isinstance(event, PeerFailed):
            self._backlog.pop(event.node_id, None)
            view = self._view
            if view is not None and view.rank_of(event.node_id) >= 0:
                batch.append(ev.PeerUnreachable(event.node_id, event.reason))

    def _on_request(self, kind: str, payload: Any) -> None:
        if kind == "event":
            self._handle(payload)
        elif kind == "gms":
            self._handle(ev.ReceivedAtAddress(payload))
        elif kind == "p2p":
            self._send(*payload)
        elif kind == "fail":
            self._set_stop(ev.Stop("error", payload))
        elif kind == "barrier":
            n, done = payload
            view = self._view
            if view is None:
                done.set()
                return
            self._barrier_waiters[(view.vid, n)] = done
            self._barriers[(view.vid, n)].add(self.node_id)
            msg = CH_BARRIER + msgpack.packb([view.vid, n])
            for member in view.members:
                if member != self.node_id:
                    self._send(member, msg)
            self._check_barrier(view.vid, n)

    def _on_gms(self, data: bytes) -> None:
        self.submit("gms", data)

    # ------------------------------------------------------------------ barrier
    def _on_barrier(self, sender: int, data: Any) -> None:
        try:
            vid, n = msgpack.unpackb(data)
            if not isinstance(vid, int) or not isinstance(n, int):
                raise ValueError("barrier message must be [vid, round]")
        except Exception as exc:
            log.warning("dropped a bad barrier message from node %d: %s", sender, exc)
            return
        self._barriers[(vid, n)].add(sender)
        self._check_barrier(vid, n)

    def _check_barrier(self, vid: int, n: int) -> None:
        view = self._view
        done = self._barrier_waiters.get((vid, n))
        if view is None or done is None or view.vid != vid:
            return
        live = {m for r, m in enumerate(view.members) if r not in self.membership.failed}
        if live <= self._barriers[(vid, n)]:
            done.set()
            del self._barrier_waiters[(vid, n)]
            del self._barriers[(vid, n)]

    # ------------------------------------------------------------------ actions
    def _perform(self, actions: list[ev.Action]) -> None:
        deliveries: list[Delivery] = []
        for action in actions:
            if isinstance(action, ev.Send):
                self._send(action.node_id, action.data)
            elif isinstance(action, Deliver):
                deliveries.append(action.delivery)
            elif isinstance(action, ShardProgress):
                if self.listener is not None:
                    self.listener.shard_progress(action)
            elif isinstance(action, SendRejected):
                if self.listener is not None:
                    self.listener.send_rejected(action.tag, action.error)
            elif isinstance(action, ev.SendToAddress):
                assert self._gms is not None
                self._gms.send(action.address, action.data)
            elif isinstance(action, ev.Connect):
                self.transport.connect(action.node_id, action.address)
            elif isinstance(action, ev.Disconnect):
                self._backlog.pop(action.node_id, None)
                self.transport.disconnect(action.node_id)
            elif isinstance(action, ev.InstallView):
                if deliveries and self.listener is not None:
                    self.listener.deliver(deliveries)  # the old view's messages before the new view
                deliveries = []
                self._view = action.view
                self._first_view.set()
                for key in [k for k in self._barrier_waiters if k[0] < action.view.vid]:
                    self._barrier_waiters.pop(key).set()  # a view change ends a barrier round
                if self.listener is not None:
                    self.listener.view_installed(action.view)
            elif isinstance(action, ev.WedgeView):
                pass  # the multicast layer wedges here
            elif isinstance(action, ev.Stop):
                self._set_stop(action)
            elif isinstance(action, ev.Log):
                log.log(action.level, action.message, *action.args)
        if deliveries and self.listener is not None:
            self.listener.deliver(deliveries)

    def _set_stop(self, stop: ev.Stop) -> None:
        if self._stop is not None:
            return
        self._stop = stop
        level = logging.INFO if stop.kind == "left" else logging.ERROR
        log.log(level, "node %d stops (%s): %s", self.node_id, stop.kind, stop.reason)
        self._stopped.set()
        if self.listener is not None:
            self.listener.stopped(stop)

    def _send(self, node_id: int, data: Any) -> None:
        """``data`` is bytes, or a tuple of buffers sent as one message (RDMC blocks, without a copy)."""
        backlog = self._backlog.get(node_id)
        if not backlog:
            try:
                if self.transport.try_send(node_id, data if isinstance(data, tuple) else [data]):
                    return
            except NotConnectedError:
                pass
            backlog = self._backlog.setdefault(node_id, collections.deque())
        if len(backlog) >= MAX_BACKLOG:
            self._backlog.pop(node_id, None)
            log.error("node %d: %d messages wait for node %d; treating it as failed", self.node_id,
                      MAX_BACKLOG, node_id)
            self._handle(ev.PeerUnreachable(node_id, "send backlog overflow"))
            return
        backlog.append(data)

    def _flush_backlog(self) -> None:
        if not self._backlog:
            return
        peers = self.transport.peers()
        for node_id in list(self._backlog):
            backlog = self._backlog[node_id]
            if node_id not in peers:
                continue
            while backlog:
                try:
                    head = backlog[0]
                    if not self.transport.try_send(node_id, head if isinstance(head, tuple) else [head]):
                        break
                except NotConnectedError:
                    break
                backlog.popleft()
            if not backlog:
                del self._backlog[node_id]
