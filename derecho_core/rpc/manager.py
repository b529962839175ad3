"""The RPC layer of one member: replicated objects, calls, replies, versions and persistence.

Threads (DESIGN §4):
- the *delivery thread* owns the objects. It runs, in order, view changes
  (objects built, state transferred), delivered multicasts (ordered handlers,
  raw callbacks, a new version of every ``Persistent`` field per update),
  p2p requests, and persistence after each batch;
- the *engine thread* hands in replies (futures are set there, so a caller
  never waits for the delivery thread) and shard-wide progress;
- user threads call ``ordered_send``/``p2p_send``, which only encode and queue.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

from ..errors import DerechoError, NodeRemovedFromGroupError, RemoteExceptionOccurred, SenderRemovedFromGroupError
from ..persistent import PersistentRegistry
from ..protocol.multicast import Delivery
from ..protocol.progress import ShardProgress
from ..view import Mode, View
from . import wire
from .methods import RpcMethod, method_table, resolve
from .query_results import PendingResults, QueryResults

if TYPE_CHECKING:
    from ..group import Group

log = logging.getLogger("derecho.rpc")

INVALID_VERSION = -1


class PayloadTooLargeError(DerechoError, ValueError):
    """A call's arguments or reply exceed the configured limit (the message names the key to raise)."""


@dataclass
class SubgroupObject:
    """This node's replica of one shard: the object, its registry, and what the RPC layer tracks for it."""

    subgroup_type: Hashable
    index: int
    subgroup_id: int
    shard: int
    obj: Any
    registry: PersistentRegistry | None
    ordered: bool
    profile: str
    latest_version: int = INVALID_VERSION
    persisted: int = INVALID_VERSION
    reported: tuple[int, int] = (INVALID_VERSION, 0)
    max_reply: int = 0
    published_at: float = 0.0
    preloaded: bool = False  # opened from a saved view before the restart view is known

    @property
    def persistent(self) -> bool:
        return self.registry is not None and bool(self.registry.fields)


@dataclass
class _SubgroupFrontiers:
    """What the engine thread learned about a subgroup, plus the own messages that bound the frontier."""

    global_persisted: int = INVALID_VERSION
    stability_us: int = 0
    own_unsent: collections.Counter[int] = field(default_factory=collections.Counter)
    own_unpersisted: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    waiters: list[tuple[int, PendingResults]] = field(default_factory=list)


class RpcManager:
    def __init__(self, group: Group) -> None:
        self.group = group
        self.conf = group.conf
        self.my_id: int = group.conf.get("DERECHO/local_id")
        self.serializer = wire.Serializer(group.conf.get("DERECHO/serializer"))
        self.objects: dict[int, SubgroupObject] = {}
        self.view: View | None = None             # the delivery thread's view (deliveries are in its order)
        self.views: dict[int, View] = {}          # by vid, for deliveries of a view already replaced
        self._lock = threading.Lock()
        self._pending: dict[int, PendingResults] = {}
        self._invocations = itertools.count(1)
        self._frontiers: dict[int, _SubgroupFrontiers] = collections.defaultdict(_SubgroupFrontiers)
        self._frontier_cv = threading.Condition(self._lock)
        self._p2p_window: int = group.conf.get("DERECHO/p2p_window_size")
        self._p2p_outstanding: collections.Counter[int] = collections.Counter()
        self._p2p_cv = threading.Condition(self._lock)
        self._current: tuple[int, int, int] | None = None  # (subgroup, version, timestamp µs) being executed
        self._replies: dict[int, list[wire.Reply]] = {}
        self._touched: set[int] = set()
        self._last_tick = 0.0
        self._tick_s = max(0.01, group.conf.get("DERECHO/heartbeat_ms") / 1000.0)
        self.caller_id: int | None = None
        self._callbacks_want_progress = group._user_callback("global_persistence_callback") is not None
        #: state transfers of this node, for tests and ``derecho status``: {"to"|"from", "subgroup", "vid", ...}
        self.transfers: list[dict[str, Any]] = []
        #: the old shard leader this node is receiving state from (Group aborts if it leaves the view)
        self.transfer_from: int | None = None
        self._stopped = False
        self._max_p2p_request: int = group.conf.get("DERECHO/max_p2p_request_payload_size")
        self._max_p2p_reply: int = group.conf.get("DERECHO/max_p2p_reply_payload_size")

    # ================================================================== user side (any thread)
    def is_delivery_thread(self) -> bool:
        return threading.current_thread() is self.group._delivery

    def _new_pending(self, kind: str, subgroup_id: int, persistent: bool = False) -> PendingResults:
        inv = next(self._invocations)
        pending = PendingResults(kind, subgroup_id, inv, self.is_delivery_thread, persistent=persistent)
        with self._lock:
            self._pending[inv] = pending
        return pending

    def ordered_send(self, subgroup_type: Hashable, subgroup_id: int, method: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], timeout: float | None = None) -> QueryResults[Any]:
        target = resolve(_type_of(subgroup_type), method, mode="ordered")
        blob = self.serializer.dumps([list(args), kwargs] if kwargs else [list(args)], "argument list")
        pending = self._new_pending("ordered", subgroup_id)
        pending.watch_hook = self._watch_persistence
        payload = wire.encode_ordered(target.tag, pending.invocation_id, blob)
        limit = self.group._max_payload(subgroup_id)
        if len(payload) > limit:
            self._drop(pending)
            raise PayloadTooLargeError(
                f"ordered_send of {target.name} carries {len(payload)} bytes (arguments and an RPC header of "
                f"{len(payload) - len(blob)}), over max_payload_size = {limit}; raise "
                "SUBGROUP/<PROFILE>/max_payload_size for this subgroup's profile")
        ts = time.time_ns()
        with self._lock:
            self._frontiers[subgroup_id].own_unsent[ts // 1000] += 1
        try:
            self.group._engine.send(subgroup_id, payload, cooked=True, tag=pending, timeout=timeout,
                                    timestamp_ns=ts, wait_for_room=not self.is_delivery_thread())
        except BaseException:
            self._drop(pending)
            with self._lock:
                self._own_sent_done(subgroup_id, ts // 1000)
            raise
        return QueryResults(pending)

    def note_raw_send(self, subgroup_id: int, ts_ns: int) -> None:
        with self._lock:
            self._frontiers[subgroup_id].own_unsent[ts_ns // 1000] += 1

    def p2p_send(self, subgroup_type: Hashable, subgroup_id: int, node_id: int, method: Any,
                 args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None) -> QueryResults[Any]:
        target = resolve(_type_of(subgroup_type), method, mode="p2p")
        view = self.group._current()
        members = {m for sv in view.subgroup_shard_views[subgroup_id] for m in sv.members}
        if node_id not in members:
            raise NodeRemovedFromGroupError(node_id, f"node {node_id} is not a member of subgroup {subgroup_id} "
                                            f"in view {view.vid} (members: {sorted(members)})")
        blob = self.serializer.dumps([list(args), kwargs] if kwargs else [list(args)], "argument list")
        limit = self._max_p2p_request
        if len(blob) > limit:
            raise PayloadTooLargeError(f"p2p_send of {target.name} carries {len(blob)} bytes of arguments, over "
                                       f"max_p2p_request_payload_size = {limit}; raise "
                                       "DERECHO/max_p2p_request_payload_size")
        pending = self._new_pending("p2p", subgroup_id)
        pending.fulfil_map([node_id])
        if node_id == self.my_id:
            if self.is_delivery_thread():
                self._drop(pending)
                raise DerechoError("a p2p_send to this node itself from inside an RPC handler would deadlock: "
                                   "call the method on the object directly")
            self.group._post(lambda: self._on_request(self.my_id, subgroup_id, target.tag,
                                                      pending.invocation_id, blob))
            return QueryResults(pending)
        self._acquire_window(node_id, timeout)
        self.group._engine.send_p2p(node_id, wire.encode_request(subgroup_id, target.tag,
                                                                 pending.invocation_id, blob))
        return QueryResults(pending)

    def _acquire_window(self, node_id: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._p2p_cv:
            while self._p2p_outstanding[node_id] >= self._p2p_window:
                if self.group._engine.stop_reason is not None:
                    raise SenderRemovedFromGroupError("this node stopped while waiting to send a p2p request")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self._p2p_window} p2p requests to node {node_id} are unanswered "
                                       f"(DERECHO/p2p_window_size); none finished within {timeout} s")
                self._p2p_cv.wait(0.05 if left is None else min(left, 0.05))
            self._p2p_outstanding[node_id] += 1

    def _release_window(self, node_id: int) -> None:
        with self._p2p_cv:
            if self._p2p_outstanding[node_id] > 0:
                self._p2p_outstanding[node_id] -= 1
                self._p2p_cv.notify_all()

    def _drop(self, pending: PendingResults) -> None:
        with self._lock:
            self._pending.pop(pending.invocation_id, None)

    def send_rejected(self, pending: PendingResults, error: Exception) -> None:
        self._drop(pending)
        pending.fail(SenderRemovedFromGroupError(f"the call was not sent: {error}"))

    # ------------------------------------------------------------------ frontiers (any thread)
    def get_global_persistence_frontier(self, subgroup_id: int) -> int:
        return self._frontiers[subgroup_id].global_persisted

    def get_stability_frontier_us(self, subgroup_id: int) -> int:
        return self._frontiers[subgroup_id].stability_us

    def wait_for_global_persistence_frontier(self, subgroup_id: int, version: int,
                                             timeout: float | None = None) -> bool:
        holder = self.objects.get(subgroup_id)
        if holder is not None and version > holder.latest_version:
            return False  # spec §6.4: a version not delivered yet cannot be waited for
        if self.is_delivery_thread():
            raise DerechoError("wait_for_global_persistence_frontier inside an RPC handler or upcall would "
                               "deadlock: persistence happens on this same delivery thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._frontier_cv:
            while self._frontiers[subgroup_id].global_persisted < version:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"version {version} of subgroup {subgroup_id} was not persisted on every "
                                       f"shard member within {timeout} s")
                self._frontier_cv.wait(0.1 if left is None else min(left, 0.1))
        return True

    def get_current_version(self, subgroup_id: int) -> tuple[int, int]:
        """``(version, timestamp µs)`` of the update being executed, else of the latest delivered one."""
        cur = self._current
        if cur is not None and cur[0] == subgroup_id and self.is_delivery_thread():
            return cur[1], cur[2]
        holder = self.objects.get(subgroup_id)
        return (holder.latest_version if holder is not None else INVALID_VERSION), 0

    # ================================================================== engine thread
    def on_replies(self, node_id: int, data: memoryview) -> None:
        try:
            replies = wire.decode_replies(data)
        except wire.RpcWireError as exc:
            log.warning("dropped a bad reply batch from node %d: %s", node_id, exc)
            return
        for kind, inv, status, body in replies:
            with self._lock:
                pending = self._pending.get(inv)
            if pending is None:
                continue  # late: the node was declared removed, or the caller stopped
            if kind == wire.P2P:
                self._release_window(node_id)
            if status == wire.OK:
                try:
                    value = self.serializer.loads(body)
                except wire.RpcWireError as exc:
                    pending.set_reply(node_id, error=RemoteExceptionOccurred(node_id, "RpcWireError", str(exc)))
                else:
                    pending.set_reply(node_id, value)
            else:
                pending.set_reply(node_id, error=RemoteExceptionOccurred(node_id, body[0], body[1]))
            self._forget_if_done(pending)

    def _watch_persistence(self, pending: PendingResults) -> None:
        """Someone waits for a call's persistence (any thread): track it, and push progress promptly."""
        if pending.version != INVALID_VERSION:
            self._add_waiter(pending)
        # otherwise the delivery adds it (pending.watched is set before this runs)

    def _add_waiter(self, pending: PendingResults) -> None:
        version, sg = pending.version, pending.subgroup_id
        if version == INVALID_VERSION:
            pending.local_persisted.set()  # delivered in a raw subgroup: nothing is ever persisted
            pending.global_persisted.set()
            return
        holder = self.objects.get(sg)
        with self._lock:
            fr = self._frontiers[sg]
            if holder is not None and holder.persisted >= version:
                pending.local_persisted.set()
            if fr.global_persisted >= version:
                pending.global_persisted.set()
                return
            fr.waiters.append((version, pending))
        if holder is not None:
            self.group._post(lambda: self._publish(holder))

    def _forget_if_done(self, pending: PendingResults) -> None:
        if pending.done:
            with self._lock:
                self._pending.pop(pending.invocation_id, None)

    def on_shard_progress(self, progress: ShardProgress) -> None:
        done: list[tuple[int, PendingResults]] = []
        with self._frontier_cv:
            fr = self._frontiers[progress.subgroup_id]
            grew = progress.persisted > fr.global_persisted
            fr.global_persisted = max(fr.global_persisted, progress.persisted)
            fr.stability_us = max(fr.stability_us, progress.frontier_us)
            if grew:
                keep: list[tuple[int, PendingResults]] = []
                for version, pending in fr.waiters:
                    (done if version <= fr.global_persisted else keep).append((version, pending))
                fr.waiters = keep
                while fr.own_unpersisted and fr.own_unpersisted[0][0] <= fr.global_persisted:
                    fr.own_unpersisted.popleft()
                self._frontier_cv.notify_all()
        for _version, waiter in done:
            waiter.global_persisted.set()
        if grew:
            cb = self.group._user_callback("global_persistence_callback")
            if cb is not None:
                sg, v = progress.subgroup_id, progress.persisted
                self.group._post(lambda: cb(sg, v))

    # ================================================================== delivery thread
    def on_view(self, view: View) -> None:
        """Objects for a newly installed view: build, transfer state, drop; fail calls to departed nodes."""
        prev = self.view
        self.view = view
        self.views[view.vid] = view
        for vid in [v for v in self.views if v < view.vid - 4]:
            del self.views[vid]
        members = set(view.members)
        with self._lock:
            pendings = list(self._pending.values())
        for pending in pendings:
            for node in pending.awaiting():
                if node not in members and pending.node_removed(node):
                    if pending.kind == "p2p":
                        self._release_window(node)
            self._forget_if_done(pending)
        if not view.is_adequately_provisioned:
            return
        self._build_objects(prev, view)

    def _build_objects(self, prev: View | None, view: View) -> None:
        from . import transfer

        incoming: list[tuple[SubgroupObject, int]] = []
        outgoing: list[tuple[SubgroupObject, list[int]]] = []
        keep: dict[int, SubgroupObject] = {}
        for sg, shards in enumerate(view.subgroup_shard_views):
            subgroup_type, index = _type_and_index(view, sg)
            for shard, sv in enumerate(shards):
                old_leader = _old_shard_leader(sv)
                holder = self.objects.get(sg)
                if self.my_id in sv.members:
                    fresh = holder is None or holder.shard != shard or holder.preloaded
                    if holder is None or holder.shard != shard:
                        if holder is not None:
                            self._close(holder)
                        holder = self._make_object(subgroup_type, index, sg, shard, sv)
                    holder.preloaded = False
                    if fresh and old_leader is not None and old_leader != self.my_id and \
                            not _is_raw_type(subgroup_type):
                        incoming.append((holder, old_leader))
                    keep[sg] = holder
                if old_leader == self.my_id and holder is not None and holder.shard == shard:
                    joiners = [m for m in sv.joined if m != self.my_id]
                    if joiners and not _is_raw_type(subgroup_type):
                        outgoing.append((holder, joiners))
        for sg, holder in self.objects.items():
            if sg not in keep:
                self._close(holder)
                with self._lock:
                    stale = [p for p in self._pending.values() if p.subgroup_id == sg and p.kind == "ordered"]
                for pending in stale:
                    pending.fail(SenderRemovedFromGroupError(
                        f"node {self.my_id} left subgroup {sg} before its call was delivered"))
                    self._drop(pending)
        self.objects = keep
        sending = transfer.Outgoing()
        for holder, joiners in outgoing:
            for joiner in joiners:
                sending.start(self, view, holder, joiner)
        try:
            for holder, leader in incoming:
                self.transfer_from = leader
                try:
                    holder.latest_version = transfer.receive(self, view, holder, leader)
                except BaseException:
                    # an object whose state never arrived must not take updates: they would be logged as
                    # versions of a stale state, and a later rejoin would then skip the tail it lacks
                    self.objects.pop(holder.subgroup_id, None)
                    self._close(holder)
                    raise
                finally:
                    self.transfer_from = None
                if holder.registry is not None and holder.registry.fields:
                    holder.persisted = holder.registry.get_minimum_latest_persisted_version()
                else:
                    holder.persisted = holder.latest_version
                self._publish(holder, force=True)
        finally:
            sending.join()  # nothing of the new view is delivered while a snapshot is being read

    def preload(self, view: View) -> dict[str, int]:
        """Total restart: open this node's objects of its saved view; their persisted versions by "sg/shard".

        The restart leader compares these to pick, per shard, the longest log.
        """
        persisted: dict[str, int] = {}
        for sg, shards in enumerate(view.subgroup_shard_views):
            subgroup_type, index = _type_and_index(view, sg)
            for shard, sv in enumerate(shards):
                if self.my_id not in sv.members or _is_raw_type(subgroup_type):
                    continue
                holder = self._make_object(subgroup_type, index, sg, shard, sv)
                holder.preloaded = True
                self.objects[sg] = holder
                persisted[f"{sg}/{shard}"] = holder.persisted
        return persisted

    def _make_object(self, subgroup_type: Hashable, index: int, sg: int, shard: int, sv: Any) -> SubgroupObject:
        ordered = sv.mode == Mode.ORDERED
        if _is_raw_type(subgroup_type):
            return SubgroupObject(subgroup_type, index, sg, shard, None, None, ordered, sv.profile)
        frontiers = self._frontiers[sg]
        registry = PersistentRegistry.for_subgroup(
            _type_of(subgroup_type), index, shard, self.conf, frontier=lambda: frontiers.stability_us)
        factory = self.group.factories.get(subgroup_type)
        try:
            obj = factory(registry, sg) if factory is not None else _type_of(subgroup_type)()
        except Exception as exc:
            registry.close()
            raise DerechoError(f"the factory of {_name(subgroup_type)} failed for subgroup {sg}: {exc!r}") from exc
        if obj is None:
            raise DerechoError(f"the factory of {_name(subgroup_type)} returned None")
        holder = SubgroupObject(subgroup_type, index, sg, shard, obj, registry, ordered, sv.profile,
                                max_reply=self.conf.get(f"SUBGROUP/{sv.profile}/max_reply_payload_size"))
        holder.latest_version = registry.get_current_version()
        holder.persisted = registry.get_minimum_latest_persisted_version()
        return holder

    def _close(self, holder: SubgroupObject) -> None:
        if holder.registry is not None:
            try:
                holder.registry.close()
            except Exception:
                log.exception("closing the logs of subgroup %d failed", holder.subgroup_id)

    def on_deliveries(self, deliveries: list[Delivery]) -> None:
        if self._stopped:
            return  # this node stopped: nothing more is applied (or logged as a version)
        try:
            self._deliver(deliveries)
        finally:
            # the engine holds the senders' windows until here: a slow handler or disk pushes back
            last: dict[tuple[int, int], int] = {}
            last_raw: dict[tuple[int, int, int], int] = {}
            for d in deliveries:
                if d.seq >= 0:
                    last[(d.vid, d.subgroup_id)] = d.seq
                else:  # raw shards: per-sender FIFO
                    last_raw[(d.vid, d.subgroup_id, d.sender_id)] = d.index
            if last or last_raw:
                self.group._engine.report_applied([(vid, sg, seq) for (vid, sg), seq in last.items()],
                                                  [(vid, sg, sender, i) for (vid, sg, sender), i in last_raw.items()])

    def _deliver(self, deliveries: list[Delivery]) -> None:
        stability_cb = self.group._user_callback("global_stability_callback")
        for d in deliveries:
            holder = self.objects.get(d.subgroup_id)
            if d.cooked:
                self._run_ordered(d, holder)
            elif stability_cb is not None:
                try:
                    stability_cb(d.subgroup_id, d.sender_id, d.index, memoryview(d.payload), d.version)
                except Exception:
                    log.exception("global_stability_callback raised; the group carries on")
            if d.sender_id == self.my_id:
                with self._lock:
                    self._own_sent_done(d.subgroup_id, d.timestamp_ns // 1000)
                    if d.version != INVALID_VERSION:
                        self._frontiers[d.subgroup_id].own_unpersisted.append((d.version, d.timestamp_ns // 1000))
            if holder is not None and d.version != INVALID_VERSION:
                if holder.registry is not None and holder.registry.fields:
                    holder.registry.make_version(d.version, d.timestamp_ns // 1000)
                holder.latest_version = d.version
                self._touched.add(d.subgroup_id)
        self._flush_replies()
        self._persist_touched()

    def _own_sent_done(self, sg: int, ts_us: int) -> None:
        unsent = self._frontiers[sg].own_unsent
        if unsent[ts_us] > 1:
            unsent[ts_us] -= 1
        else:
            unsent.pop(ts_us, None)

    def _run_ordered(self, d: Delivery, holder: SubgroupObject | None) -> None:
        try:
            tag, inv, blob = wire.decode_ordered(d.payload)
        except wire.RpcWireError as exc:
            log.warning("dropped a bad ordered call from node %d in subgroup %d: %s", d.sender_id,
                        d.subgroup_id, exc)
            return
        mine = d.sender_id == self.my_id
        pending = None
        if mine:
            with self._lock:
                pending = self._pending.get(inv)
            if pending is not None:
                view = self.views.get(d.vid, self.view)
                members = view.subgroup_shard_views[d.subgroup_id][d.shard].members if view is not None else []
                pending.fulfil_map(list(members), d.version, d.timestamp_ns // 1000)
                if pending.watched:
                    self._add_waiter(pending)
        if holder is None or holder.obj is None:
            reply: wire.Reply = (wire.ORDERED, inv, wire.RAISED, [
                "DerechoError", f"node {self.my_id} holds no object for subgroup {d.subgroup_id}"])
        else:
            self._current = (d.subgroup_id, d.version, d.timestamp_ns // 1000)
            self.caller_id = d.sender_id
            try:
                reply = self._invoke(holder, tag, inv, blob, wire.ORDERED, "ordered", holder.max_reply,
                                     f"SUBGROUP/{holder.profile}/max_reply_payload_size")
            finally:
                self._current = None
                self.caller_id = None
        if mine:
            if pending is not None:
                self._settle_local(pending, reply)
        else:
            self._replies.setdefault(d.sender_id, []).append(reply)

    def _invoke(self, holder: SubgroupObject, tag: int, inv: int, blob: bytes, kind: int, mode: str,
                limit: int, limit_key: str) -> wire.Reply:
        try:
            method = _lookup(holder, tag, mode)
            decoded = self.serializer.loads(blob)
            if not isinstance(decoded, list) or not 1 <= len(decoded) <= 2 or not isinstance(decoded[0], list) \
                    or (len(decoded) == 2 and not isinstance(decoded[1], dict)):
                raise wire.RpcWireError("RPC arguments must be [args] or [args, kwargs]")
            result = method.function(holder.obj, *decoded[0], **(decoded[1] if len(decoded) == 2 else {}))
        except Exception as exc:
            if not isinstance(exc, (wire.RpcWireError, _UnknownTag)):
                log.debug("RPC handler raised in subgroup %d", holder.subgroup_id, exc_info=True)
            return kind, inv, wire.RAISED, wire.exception_body(exc, limit)
        try:
            body = self.serializer.dumps(result, f"return value of {method.name}")
        except wire.SerializationError as exc:
            return kind, inv, wire.RAISED, wire.exception_body(exc, limit)
        if len(body) > limit:
            return kind, inv, wire.RAISED, ["PayloadTooLargeError",
                                            f"the reply of {method.name} is {len(body)} bytes, over {limit_key} = "
                                            f"{limit}; raise {limit_key}"]
        return kind, inv, wire.OK, body

    def _settle_local(self, pending: PendingResults, reply: wire.Reply) -> None:
        _kind, _inv, status, body = reply
        if status == wire.OK:
            pending.set_reply(self.my_id, self.serializer.loads(body))
        else:
            pending.set_reply(self.my_id, error=RemoteExceptionOccurred(self.my_id, body[0], body[1]))
        self._forget_if_done(pending)

    def on_request(self, node_id: int, data: memoryview) -> None:
        try:
            sg, tag, inv, blob = wire.decode_request(data)
        except wire.RpcWireError as exc:
            log.warning("dropped a bad p2p request from node %d: %s", node_id, exc)
            return
        self._on_request(node_id, sg, tag, inv, blob)

    def _on_request(self, node_id: int, sg: int, tag: int, inv: int, blob: bytes) -> None:
        limit = self._max_p2p_reply
        holder = self.objects.get(sg)
        if holder is None or holder.obj is None:
            reply: wire.Reply = (wire.P2P, inv, wire.RAISED, [
                "DerechoError", f"node {self.my_id} is not a member of subgroup {sg}"])
        else:
            self.caller_id = node_id
            try:
                reply = self._invoke(holder, tag, inv, blob, wire.P2P, "p2p", limit,
                                     "DERECHO/max_p2p_reply_payload_size")
            finally:
                self.caller_id = None
        if node_id == self.my_id:
            with self._lock:
                pending = self._pending.get(inv)
            if pending is not None:
                self._settle_local(pending, reply)
            return
        sink = self.group._external_reply_sink(node_id)
        if sink is not None:
            sink(reply)
        else:
            self.group._engine.send_p2p(node_id, wire.encode_replies([reply]))

    def _flush_replies(self) -> None:
        if not self._replies:
            return
        replies, self._replies = self._replies, {}
        for node, batch in replies.items():
            self.group._engine.send_p2p(node, wire.encode_replies(batch))

    def _persist_touched(self) -> None:
        touched, self._touched = self._touched, set()
        local_cb = self.group._user_callback("local_persistence_callback")
        for sg in sorted(touched):
            holder = self.objects.get(sg)
            if holder is None or not holder.ordered:
                continue
            if holder.persistent:
                assert holder.registry is not None
                try:
                    holder.persisted = holder.registry.persist(holder.latest_version)
                except Exception:
                    # a full disk or a broken log must not be acknowledged as durable: stop this node loudly
                    log.exception("persisting subgroup %d failed; this node stops", sg)
                    self.group._fatal(f"persisting subgroup {sg} failed")
                    return
            else:
                holder.persisted = holder.latest_version
            with self._lock:
                waiters = self._frontiers[sg].waiters
                for version, pending in waiters:
                    if version <= holder.persisted:
                        pending.local_persisted.set()
            if local_cb is not None:
                try:
                    local_cb(sg, holder.persisted)
                except Exception:
                    log.exception("local_persistence_callback raised; the group carries on")
            self._publish(holder)

    def _publish(self, holder: SubgroupObject, force: bool = False) -> None:
        """Push this node's persisted version and frontier to the shard.

        Promptly when someone waits for persistence or the object has
        Persistent fields (the SST push after each persist, spec §7.2), else at
        most once per heartbeat: an update per delivery batch would cost every
        node a message per batch that nobody reads.
        """
        if not holder.ordered:
            return
        now = time.monotonic()
        if not (force or holder.persistent or self._frontiers[holder.subgroup_id].waiters
                or self._callbacks_want_progress or now - holder.published_at >= self._tick_s):
            return
        frontier = self._local_frontier_us(holder.subgroup_id)
        report = (holder.persisted, frontier)
        if force or report != holder.reported:
            holder.reported = report
            holder.published_at = now
            self.group._engine.report_progress(holder.subgroup_id, holder.persisted, frontier)

    def _local_frontier_us(self, sg: int) -> int:
        """Spec §5.8: no message this node sends later can carry an earlier timestamp than this."""
        now = time.time_ns() // 1000
        with self._lock:
            fr = self._frontiers[sg]
            bound = min(fr.own_unsent) if fr.own_unsent else now
            if fr.own_unpersisted:
                bound = min(bound, fr.own_unpersisted[0][1])
        return min(now, bound)

    def tick(self) -> None:
        """Delivery thread, about every heartbeat: move the stability frontier of persistent subgroups."""
        now = time.monotonic()
        if now - self._last_tick < self._tick_s:
            return
        self._last_tick = now
        for holder in list(self.objects.values()):
            self._publish(holder)

    def stop(self, reason: str) -> None:
        self._stopped = True
        with self._lock:
            pendings = list(self._pending.values())
            self._pending.clear()
        for pending in pendings:
            pending.fail(SenderRemovedFromGroupError(f"this node stopped before its call completed: {reason}"))
        with self._p2p_cv:
            self._p2p_cv.notify_all()

    def close(self) -> None:
        for holder in self.objects.values():
            self._close(holder)
        self.objects = {}


# ---------------------------------------------------------------------- helpers


class _UnknownTag(DerechoError, LookupError):
    pass


def _lookup(holder: SubgroupObject, tag: int, mode: str) -> RpcMethod:
    method = method_table(type(holder.obj)).get(tag)
    if method is None or not getattr(method, mode):
        raise _UnknownTag(f"{type(holder.obj).__qualname__} has no {mode} RPC method with tag {tag}")
    return method


def _type_of(subgroup_type: Hashable) -> type:
    if not isinstance(subgroup_type, type):
        raise TypeError(f"subgroup types are classes; {subgroup_type!r} is not")
    return subgroup_type


def _name(subgroup_type: Hashable) -> str:
    return getattr(subgroup_type, "__name__", str(subgroup_type))


def _is_raw_type(subgroup_type: Hashable) -> bool:
    from ..replicated import RawObject

    return subgroup_type is RawObject


def _type_and_index(view: View, sg: int) -> tuple[Hashable, int]:
    for subgroup_type, ids in view.subgroup_ids_by_type.items():
        if sg in ids:
            return subgroup_type, ids.index(sg)
    raise DerechoError(f"view {view.vid} has no type for subgroup {sg}; do all members list the same types "
                       "in the same order?")


def _old_shard_leader(sv: Any) -> int | None:
    """Spec §8: the first member of the shard that was in it in the previous view (``joined`` is the rest).

    Both the leader and the joiners can tell it from the new view alone; a
    joiner has never seen the previous view.
    """
    return next((m for m in sv.members if m not in sv.joined), None)
