"""``Group``: start or join a group, and ask it about its membership.

Replicated objects and RPC (``get_subgroup``, ``ordered_send``...) build on
this class; this module holds the membership part of DESIGN §6.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Hashable, Iterable, Sequence

from .conf import Conf
from .engine import Engine, GroupStoppedError
from .errors import DerechoError, SubgroupProvisioningError
from .log import configure_logging
from .callbacks import UserMessageCallbacks
from .protocol.events import Stop
from .protocol.multicast import Delivery
from .replicated import Replicated
from .view import View

log = logging.getLogger("derecho.viewmanager")

ViewUpcall = Callable[[View], None]


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
                 factories: dict[Hashable, Callable[..., Any]] | None = None, conf: Conf | None = None,
                 view_upcalls: Iterable[ViewUpcall] = (), callbacks: Any = None, *,
                 join_timeout: float | None = None) -> None:
        self.conf = conf if conf is not None else Conf.load()
        configure_logging(self.conf)
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
        self._delivery.start()
        self._left = False
        self._max_payload_cache: dict[int, tuple[View, int]] = {}
        self._engine = Engine(self.conf, subgroup_info=subgroup_info, types=self.types, listener=self)
        try:
            self._engine.start()
            self._engine.wait_for_first_view(join_timeout)
        except BaseException:
            self._engine.close()
            self._deliveries.put(None)
            raise

    # ------------------------------------------------------------------ engine callbacks (engine thread)
    def view_installed(self, view: View) -> None:
        for upcall in self._view_upcalls:
            self._deliveries.put(lambda upcall=upcall: upcall(view))

    def stopped(self, stop: Stop) -> None:
        pass

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Engine thread: hand a batch of delivered messages to the delivery thread, in order."""
        cb = self.callbacks.global_stability_callback if self.callbacks is not None else None
        if cb is None:
            return

        def run() -> None:
            for d in deliveries:
                if not d.cooked:
                    cb(d.subgroup_id, d.sender_id, d.index, memoryview(d.payload), d.version)

        self._deliveries.put(run)

    def send_rejected(self, tag: object, error: Exception) -> None:
        log.warning("a multicast was not sent: %s", error)

    def _delivery_loop(self) -> None:
        while True:
            job = self._deliveries.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("a view upcall raised; the group carries on")

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
    def get_subgroup(self, subgroup_type: Hashable, index: int = 0) -> Replicated[Any]:
        """This node's handle on subgroup ``index`` of ``subgroup_type`` (it must be a member)."""
        view = self._current()
        if not view.is_adequately_provisioned:
            raise SubgroupProvisioningError(f"view {view.vid} is not adequately provisioned")
        sg = view.subgroup_id(subgroup_type, index)
        if sg not in view.my_subgroups:
            raise DerechoError(f"node {self.get_my_id()} is not a member of subgroup {index} of "
                               f"{getattr(subgroup_type, '__name__', subgroup_type)} in view {view.vid}; "
                               "use get_nonmember_subgroup for a non-member handle")
        return Replicated(self, subgroup_type, index, sg)

    def _max_payload(self, subgroup_id: int) -> int:
        view = self._engine.view  # the hot path of every send: cached per view
        cached = self._max_payload_cache.get(subgroup_id)
        if cached is not None and cached[0] is view:
            return cached[1]
        view = self._current()
        profiles = {sv.profile for sv in view.subgroup_shard_views[subgroup_id]}
        size = max(self.conf.get(f"SUBGROUP/{p}/max_payload_size") for p in profiles)
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
        self._delivery.join(timeout=5)

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()
