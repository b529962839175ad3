"""A thin, Pythonic wrapper over the libfabric calls the transport needs.

One :class:`Endpoint` owns a fabric, a domain, an ``FI_EP_RDM`` endpoint, one
completion queue (``FI_CQ_FORMAT_TAGGED``, ``FI_WAIT_NONE``: it is polled)
and an address vector. Errors are :class:`FabricError` exceptions carrying the
libfabric error number and ``fi_strerror`` text. :meth:`Endpoint.close` closes
in the only safe order (MR -> EP -> CQ/AV -> domain -> fabric) and never
retries a failed close (on tcp a retry after ``-FI_EBUSY`` double-frees).

Posting functions (``post_*``) return ``True`` when posted and ``False`` on
``-FI_EAGAIN`` (the caller drives progress with :meth:`Endpoint.poll_cq` and
retries, with a deadline); any other error raises.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from derecho_core.errors import DerechoError

log = logging.getLogger("derecho.transport.verbs")

INSTALL_HINT = (
    "libfabric is not available: install it with `apt-get install libfabric1` "
    "(and `apt-get install libfabric-dev`, then reinstall derecho-transport-verbs, to build the binding)"
)


class LibfabricMissingError(DerechoError, ImportError):
    """libfabric (or the compiled binding) is not installed."""


class FabricError(DerechoError):
    """A libfabric call failed; ``errno`` is the positive FI_* error number."""

    def __init__(self, errno: int, what: str, detail: str = ""):
        self.errno = abs(int(errno))
        self.what = what
        text = strerror(self.errno)
        msg = f"{what}: {text} (FI errno {self.errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


_ffi: Any = None
_lib: Any = None
_load_error: str | None = None


def _load() -> tuple[Any, Any]:
    global _ffi, _lib, _load_error
    if _lib is not None:
        return _ffi, _lib
    if _load_error is not None:
        raise LibfabricMissingError(_load_error)
    try:
        from ._fi_cffi import ffi, lib  # type: ignore[import-not-found]
    except ImportError as exc:
        _load_error = f"{INSTALL_HINT} [{exc}]"
        raise LibfabricMissingError(_load_error) from exc
    _ffi, _lib = ffi, lib
    return ffi, lib


def available() -> tuple[bool, str]:
    """(True, version) when the binding and libfabric load, else (False, why)."""
    try:
        ffi, lib = _load()
    except LibfabricMissingError as exc:
        return False, str(exc)
    v = lib.fi_version()
    return True, f"{v >> 16}.{v & 0xFFFF}"


def strerror(errno: int) -> str:
    try:
        ffi, lib = _load()
    except LibfabricMissingError:
        return f"error {errno}"
    return ffi.string(lib.fi_strerror(abs(int(errno)))).decode(errors="replace")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise FabricError(-ret, what)
    return ret


@dataclass(frozen=True)
class ProviderInfo:
    """What fi_getinfo says about one (provider, domain) pair."""

    provider: str  # as fi_info reports it, e.g. "tcp;ofi_rxm"
    name: str  # the core provider name, e.g. "tcp"
    fabric: str
    domain: str
    caps: int
    mr_mode: int
    data_progress: int
    tx_size: int
    rx_size: int
    inject_size: int
    iov_limit: int
    max_msg_size: int
    msg_order: int = 0


def _c_str(ffi: Any, p: Any) -> str:
    return ffi.string(p).decode() if p != ffi.NULL else ""


def _make_hints(ffi: Any, lib: Any, provider: str | None, domain: str | None, caps: int,
                tx_size: int = 0, rx_size: int = 0) -> Any:
    hints = lib.fi_allocinfo()
    if hints == ffi.NULL:
        raise FabricError(lib.FI_ENOMEM, "fi_allocinfo")
    hints.caps = caps
    hints.mode = 0  # we support no mode bits (FI_CONTEXT, FI_MSG_PREFIX): no provider here needs one
    hints.ep_attr.type = lib.FI_EP_RDM
    hints.tx_attr.msg_order = lib.FI_ORDER_SAS  # per-peer FIFO of messages
    hints.rx_attr.msg_order = lib.FI_ORDER_SAS
    hints.domain_attr.threading = lib.FI_THREAD_SAFE
    hints.domain_attr.data_progress = lib.FI_PROGRESS_MANUAL
    hints.domain_attr.control_progress = lib.FI_PROGRESS_UNSPEC
    hints.domain_attr.av_type = lib.FI_AV_UNSPEC
    # Every mr_mode we know how to honour: the provider keeps the ones it needs.
    hints.domain_attr.mr_mode = (lib.FI_MR_LOCAL | lib.FI_MR_VIRT_ADDR | lib.FI_MR_ALLOCATED
                                 | lib.FI_MR_PROV_KEY | lib.FI_MR_ENDPOINT)
    if provider:
        # fi_freeinfo frees prov_name: it must be malloc'd, never a cffi-owned buffer.
        hints.fabric_attr.prov_name = lib.drc_strdup(provider.encode())
    if domain:
        hints.domain_attr.name = lib.drc_strdup(domain.encode())
    if tx_size:
        hints.tx_attr.size = tx_size
    if rx_size:
        hints.rx_attr.size = rx_size
    return hints


def _info_of(ffi: Any, info: Any) -> ProviderInfo:
    prov = _c_str(ffi, info.fabric_attr.prov_name)
    return ProviderInfo(
        provider=prov,
        name=prov.split(";")[0],
        fabric=_c_str(ffi, info.fabric_attr.name),
        domain=_c_str(ffi, info.domain_attr.name),
        caps=int(info.caps),
        mr_mode=int(info.domain_attr.mr_mode),
        data_progress=int(info.domain_attr.data_progress),
        tx_size=int(info.tx_attr.size),
        rx_size=int(info.rx_attr.size),
        inject_size=int(info.tx_attr.inject_size),
        iov_limit=int(info.tx_attr.iov_limit),
        max_msg_size=int(info.ep_attr.max_msg_size),
        msg_order=int(info.tx_attr.msg_order),
    )


def default_caps() -> int:
    ffi, lib = _load()
    return lib.FI_MSG | lib.FI_TAGGED | lib.FI_RMA


def list_providers(caps: int | None = None, node: str | None = None) -> list[ProviderInfo]:
    """Every (provider, domain) fi_getinfo offers for FI_EP_RDM with ``caps``."""
    ffi, lib = _load()
    hints = _make_hints(ffi, lib, None, None, default_caps() if caps is None else caps)
    out = ffi.new("struct fi_info **")
    try:
        node_c = node.encode() if node else ffi.NULL
        ret = lib.fi_getinfo(lib.drc_fi_version(), node_c, ffi.NULL, 0, hints, out)
        if ret == -lib.FI_ENODATA:
            return []
        _check(ret, "fi_getinfo")
        result = []
        p = out[0]
        while p != ffi.NULL:
            result.append(_info_of(ffi, p))
            p = p.next
        lib.fi_freeinfo(out[0])
        return result
    finally:
        lib.fi_freeinfo(hints)


def provider_names() -> list[str]:
    """Core provider names (``tcp``, ``shm``, ``udp`` ...) fi_getinfo offers here."""
    seen: list[str] = []
    for p in list_providers():
        if p.name not in seen:
            seen.append(p.name)
    return seen


class MemoryRegion:
    """A registered buffer. It keeps the buffer referenced until it is closed."""

    def __init__(self, ep: Endpoint, buffer: Any, access: int, key: int):
        ffi, lib = _load()
        self._ep = ep
        self.buffer = buffer
        self.cbuf = ffi.from_buffer(buffer, require_writable=bool(access & (lib.FI_REMOTE_WRITE | lib.FI_RECV)))
        self.length = len(self.cbuf)
        self.address = int(ffi.cast("uintptr_t", self.cbuf))
        mrp = ffi.new("struct fid_mr **")
        _check(lib.fi_mr_reg(ep._domain, self.cbuf, self.length, access, 0, key, 0, mrp, ffi.NULL),
               f"fi_mr_reg({self.length} bytes, key {key})")
        self._mr = mrp[0]
        if ep.info.mr_mode & lib.FI_MR_ENDPOINT:
            try:
                _check(lib.fi_mr_bind(self._mr, ffi.addressof(ep._ep.fid), 0), "fi_mr_bind")
                _check(lib.fi_mr_enable(self._mr), "fi_mr_enable")
            except FabricError:
                lib.fi_close(ffi.addressof(self._mr.fid))
                raise
        self.key = int(lib.fi_mr_key(self._mr))
        self.desc = lib.fi_mr_desc(self._mr)
        #: what a peer puts in ``addr`` for offset 0 (FI_MR_VIRT_ADDR: the virtual address)
        self.remote_base = self.address if ep.info.mr_mode & lib.FI_MR_VIRT_ADDR else 0
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True  # never retry a failed close
        ffi, lib = _load()
        ret = lib.fi_close(ffi.addressof(self._mr.fid))
        self._ep._mrs.discard(self)
        if ret < 0:
            log.warning("fi_close(mr) failed: %s", strerror(-ret))


@dataclass
class Completion:
    context: int
    flags: int
    length: int
    tag: int
    data: int
    error: int = 0  # positive FI errno when the operation failed
    message: str = ""


class Endpoint:
    """Fabric + domain + RDM endpoint + CQ + AV for one provider and domain."""

    def __init__(self, provider: str | None = None, domain: str | None = None, node: str = "127.0.0.1",
                 service: str | int | None = None, tx_size: int = 0, rx_size: int = 0, caps: int | None = None,
                 cq_size: int = 0, wait_fd: bool = False, inject_size: int = 0):
        ffi, lib = _load()
        self._ffi, self._lib = ffi, lib
        self._closed = False
        self._lock = threading.Lock()
        self._fabric = self._domain = self._ep = self._cq = self._av = None
        self._mrs: set[MemoryRegion] = set()
        self._next_key = 1
        self._want_wait_fd = wait_fd
        #: a file descriptor that becomes readable when the CQ may have completions (FI_WAIT_FD), or None
        self.wait_fd: int | None = None
        caps = default_caps() if caps is None else caps
        hints = _make_hints(ffi, lib, provider, domain, caps, tx_size, rx_size)
        if inject_size:
            hints.tx_attr.inject_size = inject_size  # a wish: the provider may grant less (read info.inject_size)
        infop = ffi.new("struct fi_info **")
        try:
            node_c = node.encode() if node else ffi.NULL
            service_c = str(service).encode() if service is not None else ffi.NULL
            ret = lib.fi_getinfo(lib.drc_fi_version(), node_c, service_c, lib.FI_SOURCE if node else 0, hints, infop)
            if ret < 0:
                raise FabricError(-ret, f"fi_getinfo(provider={provider!r}, domain={domain!r}, node={node!r})",
                                  "no such provider/domain here; `fi_info -l` lists what libfabric offers"
                                  if ret == -lib.FI_ENODATA else "")
        finally:
            lib.fi_freeinfo(hints)
        try:
            self._info = lib.fi_dupinfo(infop[0])  # keep only the first match
        finally:
            lib.fi_freeinfo(infop[0])
        self.info = _info_of(ffi, self._info)
        try:
            self._open(cq_size or max(self.info.tx_size + self.info.rx_size, 64))
        except BaseException:
            self.close()
            raise
        self._entries = ffi.new("struct fi_cq_tagged_entry[]", 64)
        # fi_cq_tagged_entry is six 64-bit words (op_context, flags, len, buf, data, tag):
        # reading them through a uint64_t view is several times faster than attribute access.
        assert ffi.sizeof("struct fi_cq_tagged_entry") == 48
        self._words = ffi.cast("uint64_t *", self._entries)
        self._err = ffi.new("struct fi_cq_err_entry *")

    def _open(self, cq_size: int) -> None:
        ffi, lib = self._ffi, self._lib
        p = ffi.new("struct fid_fabric **")
        _check(lib.fi_fabric(self._info.fabric_attr, p, ffi.NULL), "fi_fabric")
        self._fabric = p[0]
        p = ffi.new("struct fid_domain **")
        _check(lib.fi_domain(self._fabric, self._info, p, ffi.NULL), "fi_domain")
        self._domain = p[0]
        attr = ffi.new("struct fi_cq_attr *")
        attr.size = cq_size
        attr.format = lib.FI_CQ_FORMAT_TAGGED
        attr.wait_obj = lib.FI_WAIT_FD if self._want_wait_fd else lib.FI_WAIT_NONE
        p = ffi.new("struct fid_cq **")
        ret = lib.fi_cq_open(self._domain, attr, p, ffi.NULL)
        if ret < 0 and self._want_wait_fd:  # the provider cannot give an fd: a polled CQ
            log.debug("FI_WAIT_FD completion queue refused (%s); polling only", strerror(-ret))
            attr.wait_obj = lib.FI_WAIT_NONE
            ret = lib.fi_cq_open(self._domain, attr, p, ffi.NULL)
        _check(ret, "fi_cq_open")
        self._cq = p[0]
        if attr.wait_obj == lib.FI_WAIT_FD:
            fd = ffi.new("int *")
            if lib.fi_control(ffi.addressof(self._cq.fid), lib.FI_GETWAIT, fd) == 0:
                self.wait_fd = int(fd[0])
                self._trywait_fids = ffi.new("struct fid *[1]", [ffi.addressof(self._cq.fid)])
        aattr = ffi.new("struct fi_av_attr *")
        aattr.type = lib.FI_AV_TABLE if self._info.domain_attr.av_type == lib.FI_AV_UNSPEC else \
            self._info.domain_attr.av_type
        p = ffi.new("struct fid_av **")
        _check(lib.fi_av_open(self._domain, aattr, p, ffi.NULL), "fi_av_open")
        self._av = p[0]
        p = ffi.new("struct fid_ep **")
        _check(lib.fi_endpoint(self._domain, self._info, p, ffi.NULL), "fi_endpoint")
        self._ep = p[0]
        _check(lib.fi_ep_bind(self._ep, ffi.addressof(self._cq.fid), lib.FI_TRANSMIT | lib.FI_RECV), "fi_ep_bind(cq)")
        _check(lib.fi_ep_bind(self._ep, ffi.addressof(self._av.fid), 0), "fi_ep_bind(av)")
        _check(lib.fi_enable(self._ep), "fi_enable")
        buf = ffi.new("char[]", 256)
        n = ffi.new("size_t *", 256)
        _check(lib.fi_getname(ffi.addressof(self._ep.fid), buf, n), "fi_getname")
        self.name = bytes(ffi.buffer(buf, n[0]))

    # ------------------------------------------------------------------ info
    @property
    def mr_mode(self) -> int:
        return self.info.mr_mode

    @property
    def needs_local_mr(self) -> bool:
        return bool(self.info.mr_mode & self._lib.FI_MR_LOCAL)

    @property
    def has_rma(self) -> bool:
        return bool(self.info.caps & self._lib.FI_RMA)

    # ------------------------------------------------------------------ AV
    def insert(self, name: bytes) -> int:
        ffi, lib = self._ffi, self._lib
        out = ffi.new("fi_addr_t *")
        ret = lib.fi_av_insert(self._av, name, 1, out, 0, ffi.NULL)
        if ret != 1:
            raise FabricError(lib.FI_EINVAL if ret >= 0 else -ret, "fi_av_insert")
        return int(out[0])

    def remove(self, fi_addr: int) -> None:
        ffi, lib = self._ffi, self._lib
        a = ffi.new("fi_addr_t *", fi_addr)
        ret = lib.fi_av_remove(self._av, a, 1, 0)
        if ret < 0:
            log.debug("fi_av_remove: %s", strerror(-ret))

    # ------------------------------------------------------------------ MR
    def register(self, buffer: Any, access: int | None = None, key: int | None = None) -> MemoryRegion:
        """Register ``buffer`` (anything with the buffer protocol) for ``access``.

        Keys are chosen by us, unique per domain, unless the provider picks them
        (FI_MR_PROV_KEY). The buffer stays referenced until the region is closed.
        """
        lib = self._lib
        if access is None:
            access = lib.FI_SEND | lib.FI_RECV | lib.FI_READ | lib.FI_WRITE | lib.FI_REMOTE_READ | lib.FI_REMOTE_WRITE
        with self._lock:
            if key is None:
                key = self._next_key
                self._next_key += 1
        mr = MemoryRegion(self, buffer, access, 0 if self.info.mr_mode & lib.FI_MR_PROV_KEY else key)
        self._mrs.add(mr)
        return mr

    # ------------------------------------------------------------------ posts
    def _post(self, ret: int, what: str) -> bool:
        if ret == 0:
            return True
        if ret == -self._lib.FI_EAGAIN:
            return False
        raise FabricError(-ret, what)

    def post_send(self, buf: Any, length: int, desc: Any, dest: int, context: int) -> bool:
        ffi = self._ffi
        return self._post(self._lib.fi_send(self._ep, buf, length, desc or ffi.NULL, dest, ffi.cast("void *", context)),
                          "fi_send")

    def post_inject(self, buf: Any, length: int, dest: int) -> bool:
        """``fi_inject``: the buffer is reusable at once and no completion is generated.

        Only for ``length <= info.inject_size`` (what the provider granted; tcp does not enforce it).
        """
        return self._post(self._lib.fi_inject(self._ep, buf, length, dest), "fi_inject")

    def post_tsend(self, buf: Any, length: int, desc: Any, dest: int, tag: int, context: int) -> bool:
        ffi = self._ffi
        return self._post(self._lib.fi_tsend(self._ep, buf, length, desc or ffi.NULL, dest, tag,
                                             ffi.cast("void *", context)), "fi_tsend")

    def post_tsendv(self, iov: Any, count: int, dest: int, tag: int, context: int) -> bool:
        """Gather send of ``count`` ``struct iovec`` (no local descriptors: not for FI_MR_LOCAL)."""
        ffi = self._ffi
        return self._post(self._lib.fi_tsendv(self._ep, iov, ffi.NULL, count, dest, tag,
                                              ffi.cast("void *", context)), "fi_tsendv")

    def post_recv(self, buf: Any, length: int, desc: Any, context: Any, src: int | None = None) -> bool:
        """``context``: an int, or a ``void *`` made once with :meth:`context_ptr` (faster)."""
        ffi, lib = self._ffi, self._lib
        if isinstance(context, int):
            context = ffi.cast("void *", context)
        return self._post(lib.fi_recv(self._ep, buf, length, desc or ffi.NULL,
                                      lib.FI_ADDR_UNSPEC if src is None else src, context), "fi_recv")

    def context_ptr(self, context: int) -> Any:
        return self._ffi.cast("void *", context)

    def post_trecv(self, buf: Any, length: int, desc: Any, src: int, tag: int, context: int, ignore: int = 0) -> bool:
        ffi = self._ffi
        return self._post(self._lib.fi_trecv(self._ep, buf, length, desc or ffi.NULL, src, tag, ignore,
                                             ffi.cast("void *", context)), "fi_trecv")

    def post_write(self, buf: Any, length: int, desc: Any, dest: int, remote_addr: int, key: int, context: int,
                   data: int | None = None, delivery_complete: bool = False) -> bool:
        """One-sided write. The caller has checked the bounds (see transport.RemoteWindow)."""
        ffi, lib = self._ffi, self._lib
        ctx = ffi.cast("void *", context)
        if not delivery_complete:
            if data is None:
                return self._post(lib.fi_write(self._ep, buf, length, desc or ffi.NULL, dest, remote_addr, key, ctx),
                                  "fi_write")
            return self._post(lib.fi_writedata(self._ep, buf, length, desc or ffi.NULL, data, dest, remote_addr,
                                               key, ctx), "fi_writedata")
        iov = ffi.new("struct iovec *")
        iov.iov_base = buf
        iov.iov_len = length
        descs = ffi.new("void *[1]", [desc or ffi.NULL])
        riov = ffi.new("struct fi_rma_iov *")
        riov.addr, riov.len, riov.key = remote_addr, length, key
        msg = ffi.new("struct fi_msg_rma *")
        msg.msg_iov, msg.desc, msg.iov_count, msg.addr = iov, descs, 1, dest
        msg.rma_iov, msg.rma_iov_count, msg.context = riov, 1, ctx
        flags = lib.FI_DELIVERY_COMPLETE | lib.FI_COMPLETION
        if data is not None:
            msg.data = data
            flags |= lib.FI_REMOTE_CQ_DATA
        return self._post(lib.fi_writemsg(self._ep, msg, flags), "fi_writemsg")

    # ------------------------------------------------------------------ CQ
    def poll_cq(self, out: list, max_entries: int = 64) -> int:
        """Read completions into ``out`` (appends Completion); returns how many.

        This call is what drives progress for FI_PROGRESS_MANUAL providers.
        """
        lib = self._lib
        n = lib.fi_cq_read(self._cq, self._entries, min(max_entries, 64))
        if n > 0:
            e = self._entries
            ffi = self._ffi
            for i in range(n):
                x = e[i]
                out.append(Completion(int(ffi.cast("uintptr_t", x.op_context)), x.flags, x.len, x.tag, x.data))
            return n
        if n == -lib.FI_EAGAIN or n == 0:
            return 0
        if n == -lib.FI_EAVAIL:
            return self._read_error(out)
        raise FabricError(-n, "fi_cq_read")

    def poll_fast(self) -> list | None:
        """One ``fi_cq_read``: None when empty, else ``[(context, length, error, message)]``.

        ``error`` is 0 on success, else the positive FI errno (normalised).
        """
        lib = self._lib
        n = lib.fi_cq_read(self._cq, self._entries, 64)
        if n > 0:
            w = self._words
            return [(w[i], w[i + 2], 0, "") for i in range(0, 6 * n, 6)]
        if n == -lib.FI_EAGAIN or n == 0:
            return None
        if n == -lib.FI_EAVAIL:
            out: list = []
            if not self._read_error(out):
                return None
            c = out[0]
            return [(c.context, c.length, c.error, c.message)]
        raise FabricError(-n, "fi_cq_read")

    def _read_error(self, out: list) -> int:
        ffi, lib = self._ffi, self._lib
        err = self._err
        ret = lib.fi_cq_readerr(self._cq, err, 0)
        if ret < 0:
            if ret == -lib.FI_EAGAIN:
                return 0
            raise FabricError(-ret, "fi_cq_readerr")
        code = abs(int(err.err))  # negative on shm, positive elsewhere: normalise
        buf = ffi.new("char[]", 256)
        detail = ""
        try:
            p = lib.fi_cq_strerror(self._cq, err.prov_errno, err.err_data, buf, 256)
            if p != ffi.NULL:
                detail = ffi.string(p).decode(errors="replace")
        except Exception:  # pragma: no cover - provider without strerror
            pass
        msg = strerror(code) + (f" ({detail})" if detail else "")
        out.append(Completion(int(ffi.cast("uintptr_t", err.op_context)), err.flags, err.len, err.tag, err.data,
                              code or lib.FI_EIO, msg))
        return 1

    def trywait(self) -> bool:
        """True when it is safe to block on :attr:`wait_fd` (``fi_trywait`` says no completion is pending)."""
        if self.wait_fd is None:
            return False
        return self._lib.fi_trywait(self._fabric, self._trywait_fids, 1) == 0

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Close MR -> EP -> CQ/AV -> domain -> fabric; a failed close is logged, never retried."""
        if self._closed:
            return
        self._closed = True
        ffi, lib = self._ffi, self._lib
        for mr in list(self._mrs):
            mr.close()
        for attr in ("_ep", "_cq", "_av", "_domain", "_fabric"):
            obj = getattr(self, attr)
            setattr(self, attr, None)
            if obj is None:
                continue
            ret = lib.fi_close(ffi.addressof(obj.fid))
            if ret < 0:
                log.warning("fi_close(%s) failed: %s", attr[1:], strerror(-ret))
        if getattr(self, "_info", None) is not None:
            lib.fi_freeinfo(self._info)
            self._info = None

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass
