"""``QueryResults``: what ``ordered_send`` and ``p2p_send`` return (spec §6.5).

An ordered call's reply map is known when the caller delivers its own
message: it holds one future per member of the shard in the view that
delivered it. A p2p call's map is known at once and holds its one target.
Replies may arrive before the map is known (another member delivered first),
so futures are created on first touch by either side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Generator, Generic, TypeVar

from ..errors import DerechoError, NodeRemovedFromGroupError, SenderRemovedFromGroupError

R = TypeVar("R")

INVALID_VERSION = -1


class DeadlockError(DerechoError, RuntimeError):
    """Waiting here could never end (for instance on an ordered call from inside an RPC handler)."""


class PendingResults:
    """The caller's side of one call; shared between the engine thread (replies) and the delivery thread."""

    def __init__(self, kind: str, subgroup_id: int, invocation_id: int,
                 delivery_thread: Callable[[], bool], *, persistent: bool = False) -> None:
        self.kind = kind
        self.subgroup_id = subgroup_id
        self.invocation_id = invocation_id
        self._on_delivery_thread = delivery_thread
        self.persistent = persistent
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Any]] = {}
        self._members: list[int] | None = None
        self._map_ready = threading.Event()
        self._map_error: BaseException | None = None
        self.version = INVALID_VERSION
        self.timestamp_us = 0
        # persistence events exist only once someone waits for them (most calls never do: they cost)
        self.watch_hook: Callable[[PendingResults], None] | None = None
        self.watched = False
        self._local_persisted: threading.Event | None = None
        self._global_persisted: threading.Event | None = None

    @property
    def local_persisted(self) -> threading.Event:
        self._watch()
        assert self._local_persisted is not None
        return self._local_persisted

    @property
    def global_persisted(self) -> threading.Event:
        self._watch()
        assert self._global_persisted is not None
        return self._global_persisted

    def _watch(self) -> None:
        if self._local_persisted is not None:
            return
        with self._lock:
            if self._local_persisted is None:
                self._global_persisted = threading.Event()
                self._local_persisted = threading.Event()
                if self._map_error is not None:
                    self._local_persisted.set()
                    self._global_persisted.set()
        if self.watch_hook is not None and not self.watched:
            self.watched = True
            self.watch_hook(self)

    # -------------------------------------------------------------- filled in by the RPC manager
    def _future(self, node_id: int) -> Future[Any]:
        fut = self._futures.get(node_id)
        if fut is None:
            fut = self._futures[node_id] = Future()
            fut.set_running_or_notify_cancel()
        return fut

    def fulfil_map(self, members: list[int], version: int = INVALID_VERSION, timestamp_us: int = 0) -> None:
        with self._lock:
            if self._members is not None or self._map_error is not None:
                return
            self._members = list(members)
            self.version = version
            self.timestamp_us = timestamp_us
            for m in members:
                self._future(m)
            for node in [n for n in self._futures if n not in members]:
                del self._futures[node]  # cannot happen with a correct peer; never shown to the user
        self._map_ready.set()

    def set_reply(self, node_id: int, value: Any = None, error: BaseException | None = None) -> bool:
        """Record ``node_id``'s reply; False if it came too late (the node was declared removed)."""
        with self._lock:
            if self._members is not None and node_id not in self._members:
                return False
            fut = self._future(node_id)
            if fut.done():
                return False
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
            return True

    def node_removed(self, node_id: int) -> bool:
        return self.set_reply(node_id, error=NodeRemovedFromGroupError(node_id))

    def fail(self, error: BaseException) -> None:
        """The caller itself was removed (or stopped): nothing more will arrive."""
        with self._lock:
            if self._members is None:
                self._map_error = error
            else:
                for fut in self._futures.values():
                    if not fut.done():
                        fut.set_exception(error)
        self._map_ready.set()
        if self._local_persisted is not None:
            self._local_persisted.set()
        if self._global_persisted is not None:
            self._global_persisted.set()

    def awaiting(self) -> list[int]:
        """Members whose reply has not arrived (empty while the map is unknown)."""
        with self._lock:
            if self._members is None:
                return []
            return [m for m in self._members if not self._futures[m].done()]

    @property
    def done(self) -> bool:
        with self._lock:
            return self._map_error is not None or (
                self._members is not None and all(self._futures[m].done() for m in self._members))

    def wait_map(self, timeout: float | None) -> dict[int, Future[Any]] | None:
        if not self._map_ready.is_set():
            if self.kind == "ordered" and self._on_delivery_thread():
                raise DeadlockError(
                    "waiting for the results of an ordered_send from inside an RPC handler or upcall would "
                    "deadlock: the call is delivered on this same delivery thread, after the handler returns. "
                    "Issue the call and return; collect its results from another thread")
            if not self._map_ready.wait(timeout):
                return None
        if self._map_error is not None:
            raise self._map_error
        with self._lock:
            assert self._members is not None
            return {m: self._futures[m] for m in self._members}


class QueryResults(Generic[R]):
    """The replies to one RPC call.

    ``get(timeout)`` returns ``{node_id: concurrent.futures.Future}``; each
    future gives that node's return value, or raises
    :class:`~derecho_core.NodeRemovedFromGroupError` (it left before
    replying), :class:`~derecho_core.RemoteExceptionOccurred` (its handler
    raised) or :class:`~derecho_core.SenderRemovedFromGroupError`.
    ``await results`` gives the same map to asyncio code.
    """

    def __init__(self, pending: PendingResults) -> None:
        self._pending = pending

    @property
    def subgroup_id(self) -> int:
        return self._pending.subgroup_id

    def get(self, timeout: float | None = None) -> dict[int, Future[R]]:
        """The reply map; blocks until the call is delivered (ordered) — ``TimeoutError`` after ``timeout`` s."""
        result = self._pending.wait_map(timeout)
        if result is None:
            raise TimeoutError(f"the {self._pending.kind} call in subgroup {self._pending.subgroup_id} was not "
                               f"delivered within {timeout} s")
        return result

    def wait(self, timeout: float) -> dict[int, Future[R]] | None:
        """Like :meth:`get`, but returns None on timeout."""
        return self._pending.wait_map(timeout)

    def is_ready(self) -> bool:
        """True once the reply map is known (the futures may still be pending)."""
        return self._pending._map_ready.is_set()

    def values(self, timeout: float | None = None) -> dict[int, R]:
        """Every reply's value, waiting up to ``timeout`` s in all; the first failed reply raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[int, R] = {}
        for node, fut in self.get(timeout).items():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out[node] = fut.result(left)
        return out

    @property
    def version(self) -> int:
        """The version ``(vid << 32) | seq`` the ordered call was delivered as (waits for delivery)."""
        self.get()
        return self._pending.version

    @property
    def timestamp_us(self) -> int:
        self.get()
        return self._pending.timestamp_us

    def await_local_persistence(self, timeout: float | None = None) -> None:
        """Wait until this node persisted the call's version (ordered calls only)."""
        self._await(self._pending.local_persisted, "persisted locally", timeout)

    def await_global_persistence(self, timeout: float | None = None) -> None:
        """Wait until every shard member persisted the call's version (ordered calls only)."""
        self._await(self._pending.global_persisted, "persisted on every shard member", timeout)

    def local_persistence_is_ready(self) -> bool:
        return self._pending.local_persisted.is_set()

    def global_persistence_is_ready(self) -> bool:
        return self._pending.global_persisted.is_set()

    def _await(self, event: threading.Event, what: str, timeout: float | None) -> None:
        if self._pending.kind != "ordered":
            raise DerechoError("persistence can be awaited only for ordered_send calls; a p2p_send creates no "
                               "version")
        if not event.is_set() and self._pending._on_delivery_thread():
            raise DeadlockError(f"waiting until a call is {what} from inside an RPC handler or upcall would "
                                "deadlock: persistence happens on this same delivery thread")
        if not event.wait(timeout):
            raise TimeoutError(f"the call was not {what} within {timeout} s")
        if self._pending._map_error is not None:
            raise self._pending._map_error

    def __await__(self) -> Generator[Any, None, dict[int, Future[R]]]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self.get).__await__()

    def __repr__(self) -> str:
        p = self._pending
        state = "delivered" if self.is_ready() else "pending"
        return f"<QueryResults {p.kind} subgroup={p.subgroup_id} {state}>"


__all__ = ["QueryResults", "PendingResults", "DeadlockError", "SenderRemovedFromGroupError"]
