"""``ExternalGroupClient``: call a group's ``@p2p`` methods from a process outside the group (spec §6.8).

An external client is not a member: it takes part in no view change and no
multicast. It fetches the group's view from a member, opens one connection to
each member it calls (lazily, on the first ``p2p_send`` to it), and receives
notifications from the members it is connected to::

    from derecho_core import ExternalGroupClient

    with ExternalGroupClient([Store], conf) as client:
        caller = client.get_subgroup_caller(Store)
        shard = client.get_subgroup_members(Store)[0]
        value = caller.p2p_send(shard[0], "get", "key").get()[shard[0]].result()

Configuration (``conf`` defaults to ``Conf.load()``): ``[DERECHO] local_id``
is the client's id (no member may use it; a member refuses the client with
``ID_IN_USE`` otherwise); the first member asked is ``contact`` if given, else
``(contact_ip, external_port)`` — the client's own ``external_port`` stands
for the contact's, which is right when every member uses the same port.
The key the client proves is ``client_key_file`` when set, else
``cluster_key_file`` (see ``docs/security.md``): give a client the group's
client key file, not the members' cluster key. That key, ``serializer``,
``max_p2p_request_payload_size`` and ``p2p_window_size`` must match the group's.

Failures: when the connection to a member breaks (the member crashed or
left), that member's unanswered calls fail with
:class:`~derecho_core.NodeRemovedFromGroupError`, and so does every later
``p2p_send`` to it until :meth:`ExternalGroupClient.update_view` has fetched a
fresh view. The protocol is described in :mod:`derecho_core.external_server`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import socket
import threading
from concurrent.futures import Future
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar, cast

from .conf import Conf
from .errors import DerechoError, NodeRemovedFromGroupError, RemoteExceptionOccurred, SenderRemovedFromGroupError, \
    SubgroupProvisioningError
from .external_server import (
    HEADER,
    K_ERROR,
    K_GET_STATUS,
    K_GET_VIEW,
    K_HELLO,
    K_NOTIFY,
    K_P2P_REPLY,
    K_P2P_REQUEST,
    K_REFUSE,
    K_STATUS,
    K_VIEW,
    K_WELCOME,
    KIND_NAMES,
    MAX_REFUSE_FRAME,
    NONCE_LEN,
    PROTOCOL_VERSION,
    U32,
    U64,
    ExternalAuthError,
    ExternalClientRefusedError,
    ExternalWireError,
    FrameCodec,
    check_bytes,
    check_int,
    check_reply,
    check_str,
    parse_header,
    unpack_body,
)
from .rpc import wire
from .rpc.methods import resolve
from .rpc.query_results import PendingResults, QueryResults
from .view import View

__all__ = [
    "ExternalAuthError",
    "ExternalClientCaller",
    "ExternalClientRefusedError",
    "ExternalGroupClient",
    "ExternalWireError",
]

log = logging.getLogger("derecho.external")

T = TypeVar("T")

#: the largest frame a client accepts from a member (views, replies, statuses, notifications)
MAX_FRAME = 64 << 20


def _never() -> bool:
    return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"the member closed the connection (after {got} of {n} bytes of a frame)"
                           if got else "the member closed the connection")
        got += k
    return bytes(buf)


def _read_frame(sock: socket.socket, max_length: int) -> tuple[bytes, int, int, int, bytes]:
    header = _recv_exact(sock, HEADER.size)
    version, kind, flags, length = parse_header(header, max_length)
    return header, version, kind, flags, _recv_exact(sock, length)


def _keepalive(sock: socket.socket) -> None:
    """Notice a member whose host vanished (no FIN ever comes) within about 10 s of silence."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        opt = getattr(socket, name, None)
        if opt is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
            except OSError:
                pass


class _MemberConnection:
    """The client's connection to one member: calls, control requests, and a reader thread."""

    def __init__(self, client: ExternalGroupClient, sock: socket.socket, address: tuple[str, int], node_id: int,
                 codec: FrameCodec) -> None:
        self.client = client
        self.sock = sock
        self.address = address
        self.node_id = node_id
        self.codec = codec
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._calls: dict[int, PendingResults] = {}
        self._requests: dict[int, Future[list[Any]]] = {}
        self._outstanding = 0
        self.closed = False
        self.reason = ""
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"external-client-{client.my_id}-node-{node_id}")
        self._reader.start()

    @classmethod
    def open(cls, client: ExternalGroupClient, address: tuple[str, int],
             expect_id: int | None) -> _MemberConnection:
        """Connect and say HELLO; a refusal raises :class:`ExternalClientRefusedError`."""
        where = f"{address[0]}:{address[1]}"
        sock = socket.create_connection(address, timeout=client.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(sock)
            codec = FrameCodec(client._key, client_side=True, key_name=client._key_name)
            codec.nonce_c = secrets.token_bytes(NONCE_LEN)
            sock.sendall(codec.encode(K_HELLO, [client.my_id, codec.nonce_c]))
            try:
                header, version, kind, flags, payload = _read_frame(sock, MAX_REFUSE_FRAME)
            except EOFError:
                raise ExternalWireError(f"{where} closed the connection without answering HELLO (is it a member's "
                                        "DERECHO/external_port?)") from None
            if kind == K_REFUSE:  # never authenticated; its layout is the same in every protocol version
                body = unpack_body(payload, K_REFUSE, 2)
                raise ExternalClientRefusedError(check_str(body[0], "refusal code"),
                                                 f"{where}: {check_str(body[1], 'refusal message')}")
            if version != PROTOCOL_VERSION:
                raise ExternalWireError(f"{where} speaks external-client protocol version {version}, this client "
                                        f"{PROTOCOL_VERSION}: use the same derecho-core version")
            if kind != K_WELCOME:
                raise ExternalWireError(f"{where} answered HELLO with {KIND_NAMES.get(kind, f'kind {kind}')}")
            data, mac = FrameCodec.split(flags, payload)
            body = unpack_body(data, K_WELCOME, 3)
            member_id = check_int(body[0], "member id", 0, U32)
            codec.nonce_s = check_bytes(body[1], "member nonce", NONCE_LEN)
            check_int(body[2], "vid", -1, U64)
            try:
                codec.verify(header, data, mac)
            except ExternalAuthError as exc:
                raise ExternalAuthError(f"{where}: {exc}") from None
            if expect_id is not None and member_id != expect_id:
                raise DerechoError(f"{where} is node {member_id}, not node {expect_id} as the view says")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return cls(client, sock, address, member_id, codec)

    # ------------------------------------------------------------------ requests (user threads)
    def _send(self, kind: int, body: list[Any]) -> None:
        with self._send_lock:
            self.sock.sendall(self.codec.encode(kind, body))

    def call(self, subgroup_id: int, tag: int, blob: bytes) -> PendingResults:
        """Send one p2p request (waiting while ``p2p_window_size`` are unanswered)."""
        window = self.client._window
        with self._cv:
            while self._outstanding >= window and not self.closed:
                self._cv.wait(0.1)
            if self.closed:
                raise NodeRemovedFromGroupError(self.node_id, self._broken_message())
            self._outstanding += 1
            inv = next(self.client._invocations)
            pending = PendingResults("p2p", subgroup_id, inv, _never)
            pending.fulfil_map([self.node_id])
            self._calls[inv] = pending
        try:
            self._send(K_P2P_REQUEST, [subgroup_id, tag, inv, blob])
        except OSError as exc:
            self.lost(f"sending failed: {exc}")
            raise NodeRemovedFromGroupError(self.node_id, self._broken_message()) from None
        return pending

    def control(self, kind: int, timeout: float) -> list[Any]:
        """A GET_VIEW or GET_STATUS round trip: the reply's fields after the request id."""
        req = next(self.client._requests)
        fut: Future[list[Any]] = Future()
        with self._lock:
            if self.closed:
                raise ConnectionError(f"node {self.node_id}: {self.reason}")
            self._requests[req] = fut
        try:
            self._send(kind, [req])
        except OSError as exc:
            self.lost(f"sending failed: {exc}")
            raise ConnectionError(f"node {self.node_id}: sending failed: {exc}") from None
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"node {self.node_id} did not answer {KIND_NAMES[kind]} within {timeout} s") from None
        finally:
            with self._lock:
                self._requests.pop(req, None)

    def _broken_message(self) -> str:
        return (f"the connection to node {self.node_id} broke ({self.reason}); call update_view() and send to a "
                "member of the new view")

    # ------------------------------------------------------------------ the reader thread
    def _read_loop(self) -> None:
        reason = "the member closed the connection"
        try:
            while not self.closed:
                header, version, kind, flags, payload = _read_frame(self.sock, MAX_FRAME)
                if version != PROTOCOL_VERSION:
                    raise ExternalWireError(f"a frame of protocol version {version} (expected {PROTOCOL_VERSION})")
                data, mac = FrameCodec.split(flags, payload)
                self.codec.verify(header, data, mac)
                self._dispatch(kind, data)
        except EOFError as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"connection lost: {exc}"
        except ExternalWireError as exc:
            if not self.closed:
                log.warning("external client %d: node %d sent garbage (%s); connection closed", self.client.my_id,
                            self.node_id, exc)
            reason = f"it sent garbage: {exc}"
        except Exception as exc:
            log.exception("external client %d: reading from node %d failed", self.client.my_id, self.node_id)
            reason = f"reading failed: {exc!r}"
        self.lost(reason)

    def _dispatch(self, kind: int, data: bytes) -> None:
        if kind == K_P2P_REPLY:
            self._reply(check_reply(unpack_body(data, kind, 4)))
        elif kind in (K_VIEW, K_STATUS, K_ERROR):
            body = unpack_body(data, kind, 3 if kind == K_VIEW else 2)
            req = check_int(body[0], "request id")
            if kind == K_VIEW:
                check_bytes(body[1], "view")
                if not isinstance(body[2], bool):
                    raise ExternalWireError("a VIEW frame's provisioning flag must be a bool")
            elif kind == K_STATUS and not isinstance(body[1], dict):
                raise ExternalWireError("a STATUS frame must carry a map")
            with self._lock:
                fut = self._requests.pop(req, None)
            if fut is None:
                return  # its caller timed out
            if kind == K_ERROR:
                fut.set_exception(DerechoError(check_str(body[1], "error message")))
            else:
                fut.set_result(body[1:])
        elif kind == K_NOTIFY:
            body = unpack_body(data, kind, 2)
            self.client._on_notify(self.node_id, check_int(body[0], "subgroup id", 0, U32),
                                   check_bytes(body[1], "notification"))
        else:
            raise ExternalWireError(f"a member may not send {KIND_NAMES.get(kind, f'kind {kind}')} frames")

    def _reply(self, reply: wire.Reply) -> None:
        _kind, inv, status, body = reply
        with self._cv:
            pending = self._calls.pop(inv, None)
            if pending is None:
                return  # not ours (any more)
            self._outstanding = max(0, self._outstanding - 1)
            self._cv.notify_all()
        if status == wire.OK:
            try:
                value = self.client._serializer.loads(body)
            except wire.RpcWireError as exc:
                pending.set_reply(self.node_id, error=RemoteExceptionOccurred(self.node_id, "RpcWireError", str(exc)))
            else:
                pending.set_reply(self.node_id, value)
        else:
            pending.set_reply(self.node_id, error=RemoteExceptionOccurred(self.node_id, body[0], body[1]))

    # ------------------------------------------------------------------ closing
    def lost(self, reason: str, error: BaseException | None = None) -> None:
        """Close; unanswered calls fail with ``error`` (default: NodeRemovedFromGroupError, the member is broken)."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self.reason = reason
            calls = list(self._calls.values())
            self._calls.clear()
            requests = list(self._requests.values())
            self._requests.clear()
            self._cv.notify_all()
        for pending in calls:
            pending.set_reply(self.node_id, error=error if error is not None else NodeRemovedFromGroupError(
                self.node_id, f"node {self.node_id} did not reply: {self._broken_message()}"))
        for fut in requests:
            fut.set_exception(ConnectionError(f"node {self.node_id}: {reason}"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.client._connection_lost(self, reason, broken=error is None)


class ExternalGroupClient:
    """A process outside the group that calls its members' ``@p2p`` methods (spec §6.8).

    ``ExternalGroupClient(types, conf=None, *, contact=None, timeout=10.0)``:
    ``types`` are the group's replicated types, in the group's order;
    ``contact`` is ``(ip, external_port)`` of the first member to ask for the
    view (default ``(DERECHO/contact_ip, DERECHO/external_port)`` of
    ``conf``); ``timeout`` bounds each connect and each view or status
    request. The constructor fetches the view, so a refusal (for instance
    ``ID_IN_USE``: ``local_id`` is a member's id) raises
    :class:`ExternalClientRefusedError` here. Use it as a context manager to
    close its connections on exit.
    """

    def __init__(self, types: Sequence[Hashable], conf: Conf | None = None, *,
                 contact: tuple[str, int] | None = None, timeout: float = 10.0) -> None:
        from .external_server import load_client_key

        self.conf = conf if conf is not None else Conf.load()
        self.types = list(types)
        self.timeout = timeout
        self.my_id: int = self.conf.get("DERECHO/local_id")
        self.contact: tuple[str, int] = contact if contact is not None else (
            self.conf.get("DERECHO/contact_ip"), self.conf.get("DERECHO/external_port"))
        self._key, self._key_name = load_client_key(self.conf)
        self._serializer = wire.Serializer(self.conf.get("DERECHO/serializer"))
        self._max_request: int = self.conf.get("DERECHO/max_p2p_request_payload_size")
        self._window: int = self.conf.get("DERECHO/p2p_window_size")
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._conns: dict[int, _MemberConnection] = {}
        self._broken: dict[int, str] = {}
        self._view: View | None = None
        self._handlers: dict[int, Callable[[Any], None]] = {}
        self._notes: queue.Queue[tuple[Callable[[Any], None], int, bytes] | None] = queue.Queue()
        self._notifier: threading.Thread | None = None
        self._invocations = itertools.count(1)
        self._requests = itertools.count(1)
        self._closed = False
        try:
            self.update_view()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the view
    def get_view(self) -> View:
        """The view this client knows (the last one :meth:`update_view` fetched)."""
        self._check_open()
        view = self._view
        if view is None:
            raise DerechoError("the external client has no view yet")
        return view

    def update_view(self) -> View:
        """Fetch the current view from a member: the known members in turn, then the contact.

        Then drops the connections to members that are no longer in the view
        (their unanswered calls fail with NodeRemovedFromGroupError) and
        forgets which connections broke, so ``p2p_send`` may try again.
        """
        self._check_open()
        errors: list[str] = []
        refused: ExternalClientRefusedError | None = None
        for node_id, address in self._candidates():
            where = f"{'node ' + str(node_id) if node_id is not None else 'contact'} at {address[0]}:{address[1]}"
            try:
                conn = self._connection_for(node_id, address)
                raw, adequate = conn.control(K_GET_VIEW, self.timeout)
                view = View.from_bytes(raw, subgroup_type_order=self.types)
            except ExternalClientRefusedError as exc:
                refused = refused or exc
                errors.append(f"{where}: refused: {exc}")
                continue
            except (OSError, EOFError, DerechoError, ValueError) as exc:  # TimeoutError and ConnectionError are OSError
                errors.append(f"{where}: {exc}")
                continue
            view.is_adequately_provisioned = adequate
            self._install(view)
            return view
        if refused is not None:
            raise refused
        raise DerechoError("update_view: no member of the group answered (" + "; ".join(errors) + ")")

    def _candidates(self) -> list[tuple[int | None, tuple[str, int]]]:
        out: list[tuple[int | None, tuple[str, int]]] = []
        view = self._view
        if view is not None:
            with self._lock:
                connected = [m for m in view.members if m in self._conns]
                broken = [m for m in view.members if m in self._broken and m not in connected]
            rest = [m for m in view.members if m not in connected and m not in broken]
            for m in connected + rest + broken:
                address = self._address_of(view, m, strict=False)
                if address is not None:
                    out.append((m, address))
        if all(address != self.contact for _, address in out):
            out.append((None, self.contact))
        return out

    def _install(self, view: View) -> None:
        with self._lock:
            self._view = view
            self._broken.clear()
            gone = [c for m, c in self._conns.items() if m not in view.members]
            for conn in gone:
                del self._conns[conn.node_id]
        for conn in gone:
            conn.lost(f"node {conn.node_id} is not in view {view.vid}", NodeRemovedFromGroupError(
                conn.node_id, f"node {conn.node_id} left the group (it is not in view {view.vid}) before it replied"))

    @staticmethod
    def _address_of(view: View, node_id: int, *, strict: bool = True) -> tuple[str, int] | None:
        rank = view.rank_of(node_id)
        addr = view.member_ips_and_ports[rank] if rank >= 0 else None
        if addr is None or not addr.external_port:
            if strict:
                raise DerechoError(f"view {view.vid} does not say where node {node_id} listens for external clients")
            return None
        return addr.ip_address, addr.external_port

    # ------------------------------------------------------------------ getters
    def get_my_id(self) -> int:
        return self.my_id

    def get_members(self) -> list[int]:
        """Node ids of the known view, in rank order."""
        return list(self.get_view().members)

    def _subgroup_id(self, subgroup_type: Hashable, index: int) -> int:
        view = self.get_view()
        if subgroup_type not in view.subgroup_type_order:
            raise DerechoError(f"{getattr(subgroup_type, '__name__', subgroup_type)} is not one of this client's "
                               f"types {[getattr(t, '__name__', t) for t in self.types]}")
        if not view.is_adequately_provisioned:
            raise SubgroupProvisioningError(f"view {view.vid} is not adequately provisioned")
        ids = view.subgroup_ids_by_type.get(subgroup_type, [])
        if not 0 <= index < len(ids):
            raise DerechoError(f"{getattr(subgroup_type, '__name__', subgroup_type)} has {len(ids)} subgroups in "
                               f"view {view.vid}; there is no subgroup {index}")
        return ids[index]

    def get_subgroup_members(self, subgroup_type: Hashable, index: int = 0) -> list[list[int]]:
        """The members of every shard of subgroup ``index`` of ``subgroup_type`` in the known view."""
        sg = self._subgroup_id(subgroup_type, index)
        return [list(sv.members) for sv in self.get_view().subgroup_shard_views[sg]]

    def get_number_of_shards(self, subgroup_type: Hashable, index: int = 0) -> int:
        return len(self.get_subgroup_members(subgroup_type, index))

    def get_num_subgroups(self, subgroup_type: Hashable) -> int:
        return len(self.get_view().subgroup_ids_by_type.get(subgroup_type, []))

    def get_subgroup_caller(self, subgroup_type: type[T], index: int = 0) -> ExternalClientCaller[T]:
        """The handle for ``p2p_send`` to (and notifications from) subgroup ``index`` of ``subgroup_type``."""
        key = cast(Hashable, subgroup_type)
        return ExternalClientCaller(self, key, index, self._subgroup_id(key, index))

    def status(self, node_id: int | None = None) -> dict[str, Any]:
        """A member's status (``node_id``, or the first known member that answers): a JSON-able dict."""
        self._check_open()
        if node_id is not None:
            conn = self._connection_for(node_id, self._address_of(self.get_view(), node_id))
            result: dict[str, Any] = conn.control(K_GET_STATUS, self.timeout)[0]
            return result
        errors = []
        for nid, address in self._candidates():
            try:
                result = self._connection_for(nid, address).control(K_GET_STATUS, self.timeout)[0]
                return result
            except (OSError, EOFError, DerechoError, ValueError) as exc:
                errors.append(f"{nid if nid is not None else 'contact'} at {address[0]}:{address[1]}: {exc}")
        raise DerechoError("status: no member of the group answered (" + "; ".join(errors) + ")")

    # ------------------------------------------------------------------ connections
    def _connection_for(self, node_id: int | None, address: tuple[str, int] | None) -> _MemberConnection:
        with self._connect_lock:
            with self._lock:
                if node_id is not None:
                    conn = self._conns.get(node_id)
                    if conn is not None and not conn.closed:
                        return conn
                else:
                    for conn in self._conns.values():
                        if conn.address == address and not conn.closed:
                            return conn
            if address is None:
                raise DerechoError(f"no address for node {node_id}")
            conn = _MemberConnection.open(self, address, node_id)
            stale: _MemberConnection | None
            with self._lock:
                if self._closed:
                    stale = conn
                else:
                    stale = self._conns.get(conn.node_id)
                    self._conns[conn.node_id] = conn
                    self._broken.pop(conn.node_id, None)
            if stale is not None:
                stale.lost("replaced", SenderRemovedFromGroupError("the external client was closed"))
            self._check_open()
            return conn

    def _connection_lost(self, conn: _MemberConnection, reason: str, *, broken: bool) -> None:
        with self._lock:
            if self._conns.get(conn.node_id) is conn:
                del self._conns[conn.node_id]
            if broken and not self._closed:
                self._broken[conn.node_id] = reason
        if broken and not self._closed:
            log.info("external client %d: connection to node %d lost: %s", self.my_id, conn.node_id, reason)

    def _p2p_send(self, subgroup_type: Hashable, subgroup_id: int, node_id: int, method: Any,
                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> QueryResults[Any]:
        self._check_open()
        if not isinstance(subgroup_type, type):
            raise TypeError(f"subgroup types are classes; {subgroup_type!r} is not")
        target = resolve(subgroup_type, method, mode="p2p")
        view = self.get_view()
        members = {m for sv in view.subgroup_shard_views[subgroup_id] for m in sv.members}
        if node_id not in members:
            raise NodeRemovedFromGroupError(node_id, f"node {node_id} is not a member of subgroup {subgroup_id} in "
                                            f"view {view.vid} (members: {sorted(members)}); call update_view() if "
                                            "the group has changed")
        with self._lock:
            reason = self._broken.get(node_id)
        if reason is not None:
            raise NodeRemovedFromGroupError(node_id, f"the connection to node {node_id} broke ({reason}); call "
                                            "update_view() and send to a member of the new view")
        blob = self._serializer.dumps([list(args), kwargs] if kwargs else [list(args)], "argument list")
        if len(blob) > self._max_request:
            from .rpc.manager import PayloadTooLargeError

            raise PayloadTooLargeError(f"p2p_send of {target.name} carries {len(blob)} bytes of arguments, over "
                                       f"max_p2p_request_payload_size = {self._max_request}; raise "
                                       "DERECHO/max_p2p_request_payload_size (on the members and the client)")
        conn = self._connect_member(view, node_id)
        return QueryResults(conn.call(subgroup_id, target.tag, blob))

    def _connect_member(self, view: View, node_id: int) -> _MemberConnection:
        address = self._address_of(view, node_id)
        assert address is not None
        try:
            return self._connection_for(node_id, address)
        except ExternalClientRefusedError:
            raise
        except (OSError, EOFError, DerechoError) as exc:
            with self._lock:
                self._broken[node_id] = f"cannot connect to {address[0]}:{address[1]}: {exc}"
            raise NodeRemovedFromGroupError(node_id, f"cannot reach node {node_id} at {address[0]}:{address[1]} "
                                            f"({exc}); call update_view() and send to a member of the new view") \
                from None

    # ------------------------------------------------------------------ notifications
    def _on_notify(self, node_id: int, subgroup_id: int, blob: bytes) -> None:
        with self._lock:
            handler = self._handlers.get(subgroup_id)
        if handler is None:
            log.debug("external client %d: notification from node %d for subgroup %d has no handler; dropped",
                      self.my_id, node_id, subgroup_id)
            return
        self._notes.put((handler, node_id, blob))

    def _set_handler(self, subgroup_id: int, fn: Callable[[Any], None] | None) -> None:
        with self._lock:
            if fn is None:
                self._handlers.pop(subgroup_id, None)
                return
            self._handlers[subgroup_id] = fn
            if self._notifier is None and not self._closed:
                self._notifier = threading.Thread(target=self._notify_loop, daemon=True,
                                                  name=f"external-client-{self.my_id}-notifications")
                self._notifier.start()

    def _notify_loop(self) -> None:
        while True:
            item = self._notes.get()
            if item is None:
                return
            handler, node_id, blob = item
            try:
                message = self._serializer.loads(blob)
            except wire.RpcWireError as exc:
                log.warning("external client %d: undecodable notification from node %d: %s", self.my_id, node_id, exc)
                continue
            try:
                handler(message)
            except Exception:
                log.exception("external client %d: the notification handler raised", self.my_id)

    # ------------------------------------------------------------------ closing
    def _check_open(self) -> None:
        if self._closed:
            raise DerechoError("this ExternalGroupClient is closed")

    def close(self) -> None:
        """Close every connection; unanswered calls fail with SenderRemovedFromGroupError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
            self._conns.clear()
            notifier = self._notifier
        for conn in conns:
            conn.lost("the client closed", SenderRemovedFromGroupError(
                "the external client was closed before the reply arrived"))
        self._notes.put(None)
        if notifier is not None and notifier is not threading.current_thread():
            notifier.join(timeout=5)

    def __enter__(self) -> ExternalGroupClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        view = self._view
        return (f"<ExternalGroupClient id={self.my_id} view={view.vid if view is not None else None} "
                f"{'closed' if self._closed else 'open'}>")


class ExternalClientCaller(Generic[T]):
    """An external client's handle on one subgroup: ``p2p_send`` and notifications."""

    def __init__(self, client: ExternalGroupClient, subgroup_type: Hashable, index: int, subgroup_id: int) -> None:
        self._client = client
        self.subgroup_type = subgroup_type
        self.index = index
        self.subgroup_id = subgroup_id

    def p2p_send(self, node_id: int, method: Any, *args: Any, **kwargs: Any) -> QueryResults[Any]:
        """Invoke the ``@p2p`` method (the method, its name or its tag) on member ``node_id``.

        Opens the connection to that member on first use. Raises
        NodeRemovedFromGroupError if ``node_id`` is not in the subgroup in
        the known view, or if the connection to it broke (call
        ``update_view()`` first); waits while ``p2p_window_size`` calls to it
        are unanswered.
        """
        return self._client._p2p_send(self.subgroup_type, self.subgroup_id, node_id, method, args, kwargs)

    def add_p2p_connection(self, node_id: int) -> None:
        """Connect to member ``node_id`` now (so it can notify this client before any ``p2p_send``)."""
        self._client._check_open()
        self._client._connect_member(self._client.get_view(), node_id)

    def register_notification_handler(self, fn: Callable[[Any], None]) -> None:
        """Call ``fn(message)`` (on a client thread) for every notification members send for this subgroup.

        A member can notify the client only while the client is connected to
        it (after a ``p2p_send`` to it, or :meth:`add_p2p_connection`).
        """
        if not callable(fn):
            raise TypeError(f"a notification handler must be callable, not {fn!r}")
        self._client._set_handler(self.subgroup_id, fn)

    def unregister_notification(self) -> None:
        """Stop delivering this subgroup's notifications (later ones are dropped)."""
        self._client._set_handler(self.subgroup_id, None)

    def __repr__(self) -> str:
        name = getattr(self.subgroup_type, "__name__", str(self.subgroup_type))
        return f"ExternalClientCaller[{name}](index={self.index}, subgroup_id={self.subgroup_id})"
