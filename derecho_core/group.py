"""``Group``: start or join a group, hold this node's replicated objects, and ask about membership.

The RPC layer (:mod:`derecho_core.rpc.manager`) does the object work; this
class wires it to the engine and runs the delivery thread (DESIGN §4).
"""

from __future__ import annotations

import collections
import logging

import msgpack
import queue
import threading
import time
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

from .conf import Conf
from .engine import Engine, GroupStoppedError
from .errors import DerechoError, SubgroupProvisioningError
from .log import configure_logging
from .callbacks import UserMessageCallbacks
from .protocol.events import Stop
from .protocol.multicast import Delivery
from .protocol.progress import ShardProgress
from .replicated import PeerCaller, Replicated
from .rpc.manager import RpcManager
from .rpc.query_results import PendingResults
from .view import View

log = logging.getLogger("derecho.viewmanager")

ViewUpcall = Callable[[View], None]
T = TypeVar("T")


class Group:
    """A member of a Derecho group.

    ``Group(types, subgroup_info, factories=None, conf=None, view_upcalls=(), callbacks=None)``
    starts a new group when this node is the contact (``local_ip:gms_port`` equals
    ``contact_ip:contact_port``) and joins the contact's group otherwise. It
    blocks until this node is in an adequately provisioned view. Use it as a
    context manager to leave on exit.

    View upcalls run on the delivery thread, outside any lock, in view order;
    they may call every getter of the group.
    """

    def __init__(self, types: Sequence[Hashable] = (), subgroup_info: Any = None,
                 factories: Mapping[Any, Callable[..., Any]] | None = None, conf: Conf | None = None,
                 view_upcalls: Iterable[ViewUpcall] = (), callbacks: Any = None, *,
                 join_timeout: float | None = None) -> None:
        self.conf = conf if conf is not None else Conf.load()
        configure_logging(self.conf)
        if self.conf.get("DERECHO/serializer") == "pickle":
            log.warning("DERECHO/serializer = pickle: RPC arguments, replies and object state are unpickled, "
                        "which runs code chosen by any peer holding the cluster key; use it only when every "
                        "peer is trusted")
        self.types = list(types)
        if self.types and subgroup_info is None:
            from .subgroup_info import SubgroupInfo

            subgroup_info = SubgroupInfo.from_conf(self.conf)
        self.subgroup_info = subgroup_info
        self.factories = dict(factories or {})
        self.callbacks: UserMessageCallbacks | None = callbacks
        self._view_upcalls = list(view_upcalls)
        self._deliveries: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._delivery = threading.Thread(target=self._delivery_loop, name="derecho-delivery", daemon=True)
        self._left = False
        self._ready = threading.Event()       # the first view's objects are built and their state received
        self._ready_error: BaseException | None = None
        self._max_payload_cache: dict[int, tuple[View, int]] = {}
        self._external: Any = None
        self._recent_views: collections.deque[tuple[int, list[int], float]] = collections.deque(maxlen=20)
        self._state_server: Any = None
        self.rpc = RpcManager(self)
        restart = self._load_restart_state()
        self._engine = Engine(self.conf, subgroup_info=subgroup_info, types=self.types, listener=self,
                              restart=restart)
        self._delivery.start()
        try:
            from .state_transfer import StateTransferServer

            if self.types:
                self._state_server = StateTransferServer.from_conf(self.conf)
            self._engine.start()
            try:
                self._engine.wait_for_first_view(join_timeout)
            except GroupStoppedError as exc:
                if exc.kind == "wrong_group":
                    raise GroupStoppedError(exc.kind, (
                        f"{exc.reason}. The logs in {self.conf.get('PERS/file_path')} are from another group's run "
                        "(Derecho issue #82): move them away, or start this node with PERS/reset = true to "
                        "discard them")) from None
                raise
            self._wait_ready(join_timeout)
            if self.types:
                self._start_external_server()
        except BaseException:
            self._engine.close()
            self._deliveries.put(None)
            self.rpc.close()
            if self._state_server is not None:
                self._state_server.close()
            raise

    # ------------------------------------------------------------------ engine callbacks (engine thread)
    # ------------------------------------------------------------------ total restart (spec §3.10)
    SAVED_STATE = "derecho-group"

    def _load_restart_state(self) -> Any:
        """The saved view of this node's last run, with its objects opened so their logs can be measured."""
        from .protocol.restart import RestartInfo
        from .storage import load_object

        if not self.types:
            return None
        blob = load_object(self.conf, self.SAVED_STATE)
        if blob is None:
            return None
        try:
            saved = msgpack.unpackb(blob)
            view = View.from_bytes(saved["view"], my_id=self.conf.get("DERECHO/local_id"),
                                   subgroup_type_order=self.types)
            group_id = str(saved["group"])
        except Exception as exc:
            raise DerechoError(f"the saved view in {self.conf.get('PERS/file_path')} cannot be read ({exc!r}); "
                               "start with PERS/reset = true to discard this node's saved state") from None
        persisted = self.rpc.preload(view)
        log.info("node %d found the saved view %d of group %s: it restarts from its logs (persisted %s)",
                 self.conf.get("DERECHO/local_id"), view.vid, group_id, persisted)
        return RestartInfo(group_id, view, persisted)

    def _save_restart_state(self, view: View) -> None:
        """Delivery thread, after a view's objects are set up: what a total restart starts from."""
        from .storage import save_object

        if not any(h.persistent for h in self.rpc.objects.values()):
            return
        save_object(self.conf, self.SAVED_STATE, msgpack.packb(
            {"group": self._engine.membership.group_id, "view": view.to_bytes()}, use_bin_type=True))

    def view_installed(self, view: View) -> None:
        self._recent_views.append((view.vid, list(view.members), time.time()))
        leader = self.rpc.transfer_from
        if leader is not None and leader not in view.members and self._state_server is not None:
            # the node shipping our state left: it will never finish; stop waiting (this node then stops,
            # and restarting it makes it a joiner again, with a leader that is alive)
            log.error("node %d was receiving its state from node %d, which left the group in view %d; "
                      "the transfer cannot finish", self.get_my_id(), leader, view.vid)
            self._state_server.close()
        self._deliveries.put(lambda: self._on_view(view))

    def _on_view(self, view: View) -> None:
        """Delivery thread: objects first (state transfer included), then the application's upcalls."""
        try:
            self.rpc.on_view(view)
            if view.is_adequately_provisioned:
                self._save_restart_state(view)
        except BaseException as exc:
            if not self._ready.is_set():
                self._ready_error = exc
                self._ready.set()
                return
            log.exception("node %d could not set up its objects for view %d; it stops", self.get_my_id(), view.vid)
            self._fatal(f"setting up the objects of view {view.vid} failed: {exc!r}")
            return
        for holder in list(self.rpc.objects.values()):
            upcall = getattr(holder.obj, "new_view_callback", None)
            if callable(upcall):
                self._guarded(upcall, view, what="new_view_callback")
        for upcall in self._view_upcalls:
            self._guarded(upcall, view, what="a view upcall")
        if view.is_adequately_provisioned or not self.types:
            self._ready.set()

    def _wait_ready(self, timeout: float | None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"node {self.get_my_id()} joined, but its objects were not set up within {timeout} s "
                               "(waiting for an adequately provisioned view or for state transfer)")
        if self._ready_error is not None:
            raise self._ready_error

    def stopped(self, stop: Stop) -> None:
        self.rpc.stop(stop.reason)

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Engine thread: hand a batch of delivered messages to the delivery thread, in order."""
        self._deliveries.put(lambda: self.rpc.on_deliveries(deliveries))

    def send_rejected(self, tag: object, error: Exception) -> None:
        if isinstance(tag, PendingResults):
            self.rpc.send_rejected(tag, error)
        else:
            log.warning("a multicast was not sent: %s", error)

    def rpc_request(self, node_id: int, data: memoryview) -> None:
        payload = bytes(data)
        self._deliveries.put(lambda: self.rpc.on_request(node_id, memoryview(payload)))

    def rpc_replies(self, node_id: int, data: memoryview) -> None:
        self.rpc.on_replies(node_id, data)

    def shard_progress(self, progress: ShardProgress) -> None:
        self.rpc.on_shard_progress(progress)

    # ------------------------------------------------------------------ for the RPC layer
    def _post(self, job: Callable[[], None]) -> None:
        self._deliveries.put(job)

    def _user_callback(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.callbacks, name, None) if self.callbacks is not None else None

    def _external_reply_sink(self, node_id: int) -> Callable[[Any], None] | None:
        ext = self._external
        return ext.reply_sink(node_id) if ext is not None else None

    def _fatal(self, reason: str) -> None:
        self._engine.fail(reason)

    @staticmethod
    def _guarded(fn: Callable[..., Any], *args: Any, what: str) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s raised; the group carries on", what)

    def _delivery_loop(self) -> None:
        tick = max(0.01, self.conf.get("DERECHO/heartbeat_ms") / 1000.0)
        while True:
            try:
                job = self._deliveries.get(timeout=tick)
            except queue.Empty:
                job = None
                if self._left:
                    return
            else:
                if job is None:
                    return
            try:
                if job is not None:
                    job()
                self.rpc.tick()
            except Exception:
                log.exception("the delivery thread caught an error; the group carries on")

    # ------------------------------------------------------------------ membership queries
    def _current(self) -> View:
        stop = self._engine.stop_reason
        if stop is not None and stop.kind != "left":
            raise GroupStoppedError(stop.kind, stop.reason)
        view = self._engine.view
        if view is None:
            raise DerechoError("this node is not in a view yet")
        return view

    def get_members(self) -> list[int]:
        """Node ids of the current view, in rank order."""
        return list(self._current().members)

    def get_my_id(self) -> int:
        return self._engine.node_id

    def get_my_rank(self) -> int:
        return self._current().rank_of(self._engine.node_id)

    def get_view(self) -> View:
        """The current view (a snapshot; views are replaced, never changed in place)."""
        return self._current()

    def _subgroup_shards(self, subgroup_type: Hashable, index: int) -> list[Any]:
        view = self._current()
        if not view.is_adequately_provisioned:
            raise SubgroupProvisioningError(f"view {view.vid} is not adequately provisioned")
        return view.shard_views(subgroup_type, index)

    def get_subgroup_members(self, subgroup_type: Hashable, index: int = 0) -> list[list[int]]:
        """The members of every shard of subgroup ``index`` of ``subgroup_type``."""
        return [list(sv.members) for sv in self._subgroup_shards(subgroup_type, index)]

    def get_my_shard(self, subgroup_type: Hashable, index: int = 0) -> int:
        """The shard of that subgroup this node belongs to, or -1."""
        for shard, sv in enumerate(self._subgroup_shards(subgroup_type, index)):
            if self._engine.node_id in sv.members:
                return shard
        return -1

    def get_num_subgroups(self, subgroup_type: Hashable) -> int:
        return len(self._current().subgroup_ids_by_type.get(subgroup_type, []))

    def get_number_of_shards(self, subgroup_type: Hashable, index: int = 0) -> int:
        return len(self._subgroup_shards(subgroup_type, index))

    # ------------------------------------------------------------------ subgroups
    def get_subgroup(self, subgroup_type: type[T], index: int = 0) -> Replicated[T]:
        """This node's handle on subgroup ``index`` of ``subgroup_type`` (it must be a member)."""
        key: Hashable = subgroup_type  # type: ignore[assignment]  # classes are hashable
        view = self._current()
        if not view.is_adequately_provisioned:
            raise SubgroupProvisioningError(f"view {view.vid} is not adequately provisioned")
        sg = view.subgroup_id(key, index)
        if sg not in view.my_subgroups:
            raise DerechoError(f"node {self.get_my_id()} is not a member of subgroup {index} of "
                               f"{getattr(subgroup_type, '__name__', subgroup_type)} in view {view.vid}; "
                               "use get_nonmember_subgroup for a non-member handle")
        return Replicated(self, key, index, sg)

    def get_nonmember_subgroup(self, subgroup_type: type[T], index: int = 0) -> PeerCaller[T]:
        """A handle for p2p_send to the members of a subgroup this node does not belong to."""
        key: Hashable = subgroup_type  # type: ignore[assignment]  # classes are hashable
        view = self._current()
        if not view.is_adequately_provisioned:
            raise SubgroupProvisioningError(f"view {view.vid} is not adequately provisioned")
        sg = view.subgroup_id(key, index)
        if sg in view.my_subgroups:
            raise DerechoError(f"node {self.get_my_id()} is a member of subgroup {index} of "
                               f"{getattr(subgroup_type, '__name__', subgroup_type)}; use get_subgroup")
        return PeerCaller(self, key, index, sg)

    def _start_external_server(self) -> None:
        from .external_server import ExternalServer

        self._external = ExternalServer.for_group(self)

    def get_client_callback(self, subgroup_type: Hashable, index: int = 0) -> Any:
        """A handle for notifying external clients of this subgroup (see :class:`ExternalGroupClient`)."""
        if self._external is None:
            raise DerechoError("this group serves no external clients (it has no replicated types)")
        return self._external.client_callback(subgroup_type, index)

    def status(self) -> dict[str, Any]:
        """What ``derecho status`` shows: the view, the subgroups, and this node's shards' progress (JSON-able)."""
        view = self._current()
        names = {sg: (getattr(t, "__name__", str(t)), i) for t, ids in view.subgroup_ids_by_type.items()
                 for i, sg in enumerate(ids)}
        members = []
        for rank, node in enumerate(view.members):
            addr = view.member_ips_and_ports[rank]
            members.append({"id": node, "rank": rank, "failed": bool(view.failed[rank]),
                            "address": None if addr is None else f"{addr.ip_address}:{addr.gms_port}",
                            "external_port": None if addr is None else addr.external_port})
        subgroups = []
        for sg, shards in enumerate(view.subgroup_shard_views):
            name, index = names.get(sg, ("?", 0))
            subgroups.append({"subgroup_id": sg, "type": name, "index": index, "shards": [
                {"shard": n, "members": list(sv.members), "senders": list(sv.senders), "mode": sv.mode.name,
                 "profile": sv.profile} for n, sv in enumerate(shards)]})
        progress = {}
        for sg, holder in list(self.rpc.objects.items()):
            progress[str(sg)] = {
                "shard": holder.shard, "latest_version": holder.latest_version, "persisted": holder.persisted,
                "global_persisted": self.rpc.get_global_persistence_frontier(sg),
                "stability_frontier_us": self.rpc.get_stability_frontier_us(sg),
                "persistent_fields": sorted(holder.registry.fields) if holder.registry is not None else []}
        return {"node": self.get_my_id(), "vid": view.vid, "members": members,
                "adequately_provisioned": view.is_adequately_provisioned, "subgroups": subgroups,
                "my_shards": progress,
                "recent_views": [{"vid": v, "members": m, "time": t} for v, m, t in self._recent_views],
                "state_transfers": list(self.rpc.transfers[-20:])}

    def get_rpc_caller_id(self) -> int | None:
        """Inside an RPC handler: the node whose call is being executed."""
        return self.rpc.caller_id

    def get_subgroup_max_payload_size(self, subgroup_type: Hashable, index: int = 0) -> int:
        return self._max_payload(self._current().subgroup_id(subgroup_type, index))

    def _max_payload(self, subgroup_id: int) -> int:
        view = self._engine.view  # the hot path of every send: cached per view
        cached = self._max_payload_cache.get(subgroup_id)
        if cached is not None and cached[0] is view:
            return cached[1]
        view = self._current()
        profiles = {sv.profile for sv in view.subgroup_shard_views[subgroup_id]}
        size: int = max(self.conf.get(f"SUBGROUP/{p}/max_payload_size") for p in profiles)
        self._max_payload_cache[subgroup_id] = (view, size)
        return size

    # ------------------------------------------------------------------ actions
    def report_failure(self, node_id: int) -> None:
        """Tell the group that ``node_id`` has failed (it is removed in the next view)."""
        self._engine.report_failure(node_id)

    def barrier_sync(self, timeout: float | None = None) -> None:
        """Wait until every member of the current view has called ``barrier_sync``."""
        self._engine.barrier_sync(timeout)

    def leave(self) -> None:
        """Leave the group gracefully; the others install a view without this node."""
        if self._left:
            return
        self._left = True
        self._engine.leave()
        self._deliveries.put(None)
        if threading.current_thread() is not self._delivery:
            self._delivery.join(timeout=5)
        if self._external is not None:
            self._external.close()
        if self._state_server is not None:
            self._state_server.close()
        self.rpc.stop("the node left the group")
        self.rpc.close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()
