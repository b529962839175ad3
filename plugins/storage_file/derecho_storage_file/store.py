"""The ``file`` log store: one data file and one index file per log, every entry checksummed.

Layout under ``[PERS] file_path`` (directory mode 0700) for a log named N
(``safe_log_name(N)`` on disk):

``N.data``   16-byte file header (magic, checksum name), then entries back to
             back. Each entry is a 48-byte header ``magic "DRE1", crc(payload),
             length, version, hlc_us, hlc_logic, crc(header)`` and the payload.
             The data file alone is enough to rebuild the log: it is the authority.
``N.idx``    16-byte file header, then one 48-byte record per entry at
             ``16 + 48 * index`` (indexes are absolute, as in Derecho): a copy
             of the entry's header, so its own CRC vouches for it; offsets
             follow from the lengths, since entries are contiguous.
``N.meta``   JSON ``{head, head_offset, floor_version}``: where the log starts
             after trims. Replaced atomically (temporary file, fsync, rename).
``N.lock``   holds a ``flock`` while the log is open, and the owner's pid.

Durability: ``persist`` writes the buffered entries, ``fdatasync``s the data
file, and only then writes their index records, so an index record on disk
always points at synced data. One sync covers every append since the last
persist. The index is a cache of the data file's headers, so it is synced
lazily (on close, trim, truncate, and at most ``index_sync_interval`` seconds
apart while persisting; 0 syncs it on every persist): a crash can lose index
records, never entries, because opening rescans the data after the last
index record.

Checksums are CRC-32C, computed in hardware by google-crc32c (zlib's CRC-32
runs at about 2 GB/s here, which cost a third of the throughput on 64 KB
entries). Opening verifies every checksum. A bad entry followed by a good one where
the index says entries are is corruption: :class:`LogCorruptionError` naming
file and offset. A bad entry with nothing good after it, or garbage after the
last indexed entry, is a torn write: cut, with a warning on the
``derecho.persistence`` logger.

Trims move the head recorded in ``N.meta`` and punch holes in the dropped
prefix (where the file system allows), so a trim never rewrites the log.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import mmap
import os
import struct
import sys
import threading
import time
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator

from google_crc32c import value as _crc

from derecho_core.storage import (
    HLC,
    INVALID_VERSION,
    NO_SPACE_ERRNOS,
    DiskFullError,
    EntryIndex,
    LogClosedError,
    LogCorruptionError,
    LogEntry,
    LogFullError,
    LogLockedError,
    LogStore,
    StorageError,
    check_append,
    ensure_dir,
    locked,
    fsync_dir,
    safe_log_name,
)

log = logging.getLogger("derecho.persistence")

DATA_MAGIC = b"DRCHDAT1"
IDX_MAGIC = b"DRCHIDX1"
#: the rest of each file header names the checksum: CRC-32C (Castagnoli), done in hardware by google-crc32c
CHECKSUM_TAG = b"crc32c\0\0"
FILE_HDR = 16
ENTRY_MAGIC = b"DRE1"
_H40 = struct.Struct("<4sIQqqq")  # magic, payload crc, length, version, hlc_us, hlc_logic
_HCRC = struct.Struct("<I4x")  # crc of the 40 bytes above, padding
HDR = _H40.size + _HCRC.size  # 48
_HDR_FULL = struct.Struct("<4sIQqqqI4x")
#: an index record is a copy of its entry's header: the header's own CRC vouches for it, and offsets
#: follow from the lengths (entries are contiguous), so indexing an entry costs no extra checksum
REC = HDR

#: payloads this large are not copied: the caller's bytes go to the kernel by reference (one writev)
DIRECT_WRITE = 64 * 1024
#: pending appends are written out once this many bytes wait (or at persist)
WRITE_BUFFER = 1 << 20
LARGE_BATCH = 8 << 20
_IOV_MAX = 1024


def _check_header(view: Any) -> tuple[int, int, int, int, int] | str:
    """``(payload crc, length, version, us, logic)`` of the 48-byte header in ``view``, or why it is bad."""
    magic, pcrc, length, version, us, logic, hcrc = _HDR_FULL.unpack_from(view)
    if magic != ENTRY_MAGIC:
        return f"bad entry magic {bytes(magic)!r}"
    if _crc(view[:_H40.size]) != hcrc:
        return "entry header fails its checksum"
    return pcrc, length, version, us, logic


class _Reader:
    """Sequential reads through a large window (google-crc32c takes ``bytes``, not memoryviews, so slices copy)."""

    def __init__(self, fd: int, size: int, window: int = 8 << 20):
        self._fd, self.size, self._window = fd, size, window
        self._start = 0
        self._buf = b""

    def view(self, off: int, n: int) -> bytes:
        """Bytes ``[off, off + n)``; the caller checked they are inside the file."""
        if off < self._start or off + n > self._start + len(self._buf):
            self._buf = os.pread(self._fd, max(n, self._window), off)
            self._start = off
        return self._buf[off - self._start:off - self._start + n]


# ----------------------------------------------------------------------------- hole punching

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_libc: Any = None


def _punch_hole(fd: int, start: int, end: int) -> None:
    """Give the file system back the pages of ``[start, end)`` without changing offsets (best effort)."""
    global _libc
    page = mmap.PAGESIZE
    start = -(-start // page) * page
    end = end // page * page
    if end <= start:
        return
    try:
        if _libc is None:
            # the libc already loaded in this process: ctypes.util.find_library would run ldconfig in a
            # subprocess, and a child forked at that moment inherits (and keeps) the log's lock
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start)
    except (OSError, AttributeError):  # not Linux, or no fallocate: the space stays used, nothing breaks
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the store


class FileLogStore(LogStore):
    """A durable log in ``directory``; see the module docstring for the format and guarantees."""

    def __init__(self, directory: str | os.PathLike[str], name: str, *, reset: bool = False,
                 max_entries: int | None = None, max_bytes: int | None = None,
                 index_sync_interval: float = 1.0, readonly: bool = False, base: str | None = None):
        self.name = name
        self.directory = Path(directory)
        base = base or safe_log_name(name)  # ``base``: open by on-disk name (``derecho log``)
        self.data_path = self.directory / f"{base}.data"
        self.idx_path = self.directory / f"{base}.idx"
        self.meta_path = self.directory / f"{base}.meta"
        self.lock_path = self.directory / f"{base}.lock"
        self.readonly = readonly
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._index_sync_interval = index_sync_interval
        self._closed = True
        self._mutex = threading.RLock()
        self._lfd = self._dfd = self._ifd = -1
        #: what opening found and cut, for ``derecho log verify`` and tests
        self.recovery: dict[str, Any] = {"cut_entries": 0, "cut_bytes": 0, "recovered_from_data": 0}
        try:
            self._open(reset)
        except BaseException:
            self._close_fds()
            raise
        self._closed = False

    @classmethod
    def open(cls, conf: Any, log_name: str) -> FileLogStore:
        """The plugin factory: ``(conf, log_name)`` -> open log."""
        return cls(conf.get("PERS/file_path"), log_name, reset=bool(conf.get("PERS/reset")),
                   max_entries=conf.get("PERS/max_log_entry"), max_bytes=conf.get("PERS/max_data_size"))

    # optional inspection part of the contract, used by ``derecho log`` through the plugin registry
    @classmethod
    def list_logs(cls, directory: str | os.PathLike[str]) -> list[str]:
        """On-disk names of the logs in ``directory``."""
        return list_logs(directory)

    @classmethod
    def open_readonly(cls, directory: str | os.PathLike[str], base: str) -> FileLogStore:
        """Open the log stored as ``base`` without locking or repairing it (tears are reported, not cut)."""
        return cls(directory, base, readonly=True, base=base)

    # ------------------------------------------------------------------ opening and recovery
    def _open(self, reset: bool) -> None:
        if self.readonly:
            if not self.data_path.exists():
                raise StorageError(f"no log {self.name!r} in {self.directory} (no {self.data_path.name})")
        else:
            ensure_dir(self.directory)
            self._lock()
            if reset:
                for p in (self.data_path, self.idx_path, self.meta_path):
                    p.unlink(missing_ok=True)
        head, head_offset, self._floor = self._read_meta()
        flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
        self._dfd = os.open(self.data_path, flags, 0o600)
        try:
            self._ifd = os.open(self.idx_path, flags, 0o600)
        except FileNotFoundError:  # read-only and the index was lost: the data file suffices
            self._ifd = -1
        created = self._init_file(self._dfd, self.data_path, DATA_MAGIC)
        if self._ifd >= 0:
            created |= self._init_file(self._ifd, self.idx_path, IDX_MAGIC)
        if created and not self.readonly:
            fsync_dir(self.directory)

        self._idx = EntryIndex(head)
        self._off = array("q")
        self._head_offset = head_offset
        self._pending = bytearray()  # small entries, copied together
        self._iov: list[Any] = []  # what waits before _pending: runs of small entries, large headers and payloads
        self._iov_bytes = 0
        self._ipending = bytearray()  # index records of the entries after _idx_written_tail
        self._load_index(head, head_offset)
        end, cut = self._verify_indexed()
        self._idx_written_tail = self._idx.tail  # every entry kept so far has its record on disk
        if not cut:
            end = self._scan_tail(end)
        self._end = self._written = self._synced_end = end
        self._synced_tail = self._idx.tail
        self._idx_dirty = False
        self._last_idx_sync = time.monotonic()
        if not self.readonly:
            if self.recovery["cut_bytes"] or self.recovery["cut_entries"]:
                os.ftruncate(self._dfd, end)
            os.fdatasync(self._dfd)  # whatever we recovered from the data file is now durable
            self._write_index_records()
            os.ftruncate(self._ifd, FILE_HDR + self._idx.tail * REC)
            self._sync_index()

    def _lock(self) -> None:
        self._lfd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(self._lfd, 32, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                owner = "unknown"
            os.close(self._lfd)
            self._lfd = -1
            who = "this process" if owner == str(os.getpid()) else f"process {owner}"
            if owner.isdigit() and owner != str(os.getpid()) and not _alive(int(owner)):
                who += " (no longer running: a process it forked still holds the lock file open)"
            raise LogLockedError(f"log {self.name!r} in {self.directory} is already open by {who}; "
                                 "two writers would corrupt it (close the other one first)") from None
        os.ftruncate(self._lfd, 0)
        os.pwrite(self._lfd, f"{os.getpid()}\n".encode(), 0)

    def _read_meta(self) -> tuple[int, int, int]:
        try:
            text = self.meta_path.read_text()
        except FileNotFoundError:
            return 0, FILE_HDR, INVALID_VERSION
        try:
            meta = json.loads(text)
            return int(meta["head"]), int(meta["head_offset"]), int(meta["floor_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LogCorruptionError(self.meta_path, 0, f"unreadable meta file ({exc})") from None

    def _write_meta(self) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        body = json.dumps({"head": self._idx.head, "head_offset": self._head_offset,
                           "floor_version": self._floor}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.meta_path)
        fsync_dir(self.directory)

    def _init_file(self, fd: int, path: Path, magic: bytes) -> bool:
        size = os.fstat(fd).st_size
        if size < FILE_HDR:
            if self.readonly:
                raise LogCorruptionError(path, 0, f"file is {size} bytes, shorter than its header")
            # new file, or one torn while being created: nothing can have been stored in it yet
            os.ftruncate(fd, 0)
            os.pwrite(fd, magic + CHECKSUM_TAG, 0)
            os.fsync(fd)
            return True
        got = os.pread(fd, FILE_HDR, 0)
        if got[:len(magic)] != magic:
            raise LogCorruptionError(path, 0, f"not a derecho log file (magic {got[:len(magic)]!r}, expected {magic!r})")
        if got[len(magic):] != CHECKSUM_TAG:
            raise StorageError(f"{path}: written with checksum {got[len(magic):].rstrip(bytes(1))!r}; this version "
                               f"reads {CHECKSUM_TAG.rstrip(bytes(1))!r} only")
        return False

    def _load_index(self, head: int, head_offset: int) -> None:
        """Read the index records from ``head`` on into memory, up to the first one out of sequence.

        Records are copies of the entry headers, read field by field as
        arrays (no per-record Python work but the sequence check); that each
        one equals its entry's header is checked by ``_verify_indexed``. The
        index only accelerates: where it ends or goes wrong, the data file
        fills in the rest (``_scan_tail``).
        """
        self._indexed_end = head_offset
        self._idx_raw = b""
        if self._ifd < 0:
            return
        start = FILE_HDR + head * REC
        size = os.fstat(self._ifd).st_size
        raw = os.pread(self._ifd, max(0, size - start), start) if size > start else b""
        words = array("q")
        words.frombytes(raw[:len(raw) // REC * REC])
        if sys.byteorder != "little":
            words.byteswap()
        lengths, versions = words[1::6], words[2::6]
        last, count = self._floor, 0
        for version, length in zip(versions, lengths):
            if version <= last or length < 0:
                break
            last = version
            count += 1
        if count < len(versions) and any(raw[count * REC:(count + 1) * REC]):
            log.warning("%s: index record %d at offset %d is out of sequence; rebuilding the index from the "
                        "data file from there", self.idx_path, head + count, start + count * REC)
        idx = self._idx
        idx.versions = versions[:count]
        idx.rtc = words[3::6][:count]
        idx.logic = words[4::6][:count]
        rtc, logic = idx.rtc, idx.logic
        if any(rtc[i] > rtc[i + 1] or (rtc[i] == rtc[i + 1] and logic[i] > logic[i + 1]) for i in range(count - 1)):
            idx.time_sorted = False
        self._off = array("q", accumulate((HDR + n for n in lengths[:count - 1]), initial=head_offset)) \
            if count else array("q")
        self._indexed_end = (self._off[-1] + HDR + lengths[count - 1]) if count else head_offset
        self._idx_raw = raw

    def _entry_end(self, pos: int) -> int:
        return self._off[pos + 1] if pos + 1 < len(self._off) else self._end

    def _verify_indexed(self) -> tuple[int, bool]:
        """Check every indexed entry against its checksums; returns the data offset after the last good one
        and whether a torn tail was cut."""
        n = len(self._off)
        if n == 0:
            return self._head_offset, False
        # lengths come from the index records; the entry after the last ends where the index says
        size = os.fstat(self._dfd).st_size
        lengths = array("q", (self._off[i + 1] - self._off[i] - HDR for i in range(n - 1)))
        lengths.append(self._indexed_end - self._off[-1] - HDR)
        first_bad: tuple[int, str] | None = None
        reader = _Reader(self._dfd, size)
        raw, offs, view, crc = self._idx_raw, self._off, reader.view, _crc
        for pos in range(n):
            off, length = offs[pos], lengths[pos]
            at = pos * REC
            why: str | None = None
            if off + HDR + length > size:
                why = f"missing: the file ends at {size}, before the entry's end {off + HDR + length}"
            else:
                chunk = view(off, HDR + length)
                header = chunk[:HDR]
                if header != raw[at:at + REC] or header[:4] != ENTRY_MAGIC:
                    problem = _check_header(header)
                    if not isinstance(problem, str) and first_bad is None:
                        # a good entry header the index record does not copy: the index is what is wrong
                        log.warning("%s: index record %d disagrees with its entry; rebuilding the index from "
                                    "the data file from there", self.idx_path, self._idx.head + pos)
                        self._idx.drop_back(pos)
                        del offs[pos:]
                        self._idx_raw = b""
                        return off, False
                    why = problem if isinstance(problem, str) else "entry header disagrees with its index record"
                elif crc(chunk[HDR:]) != _HDR_FULL.unpack_from(header)[1]:
                    why = "payload fails its checksum"
            if why is None:
                if first_bad is not None:
                    bad_pos, bad_why = first_bad
                    raise LogCorruptionError(self.data_path, offs[bad_pos],
                                             f"entry {self._idx.head + bad_pos} "
                                             f"(version {self._idx.versions[bad_pos]}): {bad_why}")
            elif first_bad is None:
                first_bad = (pos, why)
        self._idx_raw = b""
        if first_bad is None:
            return self._off[-1] + HDR + lengths[-1], False
        bad_pos, why = first_bad
        cut_off = self._off[bad_pos]
        self._cut_warning(cut_off, n - bad_pos, f"entry {self._idx.head + bad_pos}: {why}")
        self._idx.drop_back(bad_pos)
        del self._off[bad_pos:]
        return cut_off, True

    @staticmethod
    def _header_problem(hdr: bytes) -> str:
        why = _check_header(hdr)
        return why if isinstance(why, str) else "entry header disagrees with its index record"

    def _scan_tail(self, start: int) -> int:
        """Parse entries the index does not cover (appended after the last index write); returns the end."""
        size = os.fstat(self._dfd).st_size
        if start >= size:
            return start
        off = start
        last = self._idx.versions[-1] if len(self._idx) else self._floor
        why = ""
        reader = _Reader(self._dfd, size)
        while True:
            if off == size:
                break
            if off + HDR > size:
                why = f"{size - off} bytes, shorter than an entry header"
                break
            raw_hdr = reader.view(off, HDR)
            hdr = _check_header(raw_hdr)
            if isinstance(hdr, str):
                why = hdr
                break
            pcrc, length, version, us, lg = hdr
            if version <= last:
                why = f"version {version} does not follow {last}"
                break
            if off + HDR + length > size:
                why = f"entry of {length} bytes runs past the end of the file"
                break
            if _crc(reader.view(off + HDR, length)) != pcrc:
                why = "payload fails its checksum"
                break
            self._idx.add(version, HLC(us, lg))
            self._off.append(off)
            self._ipending += raw_hdr
            self.recovery["recovered_from_data"] += 1
            last = version
            off += HDR + length
        if off < size:
            self._cut_warning(off, None, why, size - off)
        return off

    def _cut_warning(self, offset: int, entries: int | None, why: str, nbytes: int | None = None) -> None:
        if entries:
            self.recovery["cut_entries"] += entries
        size = os.fstat(self._dfd).st_size
        self.recovery["cut_bytes"] += nbytes if nbytes is not None else size - offset
        what = f"{entries} entr{'y' if entries == 1 else 'ies'}" if entries else f"{size - offset} bytes"
        action = "ignoring (read-only)" if self.readonly else "cutting"
        log.warning("%s: torn or corrupt tail at offset %d (%s); %s %s: nothing after it is intact, so it "
                    "was never fully written", self.data_path, offset, why, action, what)

    # ------------------------------------------------------------------ writes
    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.name!r} is closed")
        if self.readonly:
            raise StorageError(f"log {self.name!r} is open read-only")

    @locked
    def append(self, version: int, timestamp: HLC | int, data: bytes | bytearray | memoryview) -> int:
        # the hot path: local operations only, one pack and two checksums per entry
        if self._closed or self.readonly:
            self._check_writable()
        idx = self._idx
        versions = idx.versions
        latest = versions[-1] if versions else self._floor
        if version <= latest:
            check_append(latest, version, self.name)
        if type(timestamp) is int:
            us, lg = timestamp, 0
        else:
            us, lg = timestamp if type(timestamp) is HLC else HLC.coerce(timestamp)
        n = len(data)
        off = self._end
        if self._max_entries is not None and len(versions) >= self._max_entries:
            raise LogFullError(f"log {self.name!r} holds max_log_entry={self._max_entries} entries; trim it")
        if self._max_bytes is not None and off + HDR + n - self._head_offset > self._max_bytes:
            raise LogFullError(f"log {self.name!r} would exceed max_data_size={self._max_bytes} bytes; trim it")
        try:
            pcrc = _crc(data)
        except TypeError:
            data = bytes(data)
            pcrc = _crc(data)
        h40 = _H40.pack(ENTRY_MAGIC, pcrc, n, version, us, lg)
        hdr = h40 + _HCRC.pack(_crc(h40))
        try:
            if n >= DIRECT_WRITE:
                iov = self._iov
                if self._pending:
                    iov.append(self._pending)
                    self._iov_bytes += len(self._pending)
                    self._pending = bytearray()
                iov.append(hdr)
                iov.append(data)  # immutable bytes (anything else was copied for the checksum)
                self._iov_bytes += HDR + n
                if self._iov_bytes >= LARGE_BATCH:
                    self._flush_pending()
            else:
                pending = self._pending
                pending += hdr
                pending += data
                if len(pending) >= WRITE_BUFFER:
                    self._flush_pending()
        except OSError as exc:
            self._failed_write(exc, "append")
        self._ipending += hdr
        self._end = off + HDR + n
        rtc, logic = idx.rtc, idx.logic
        if rtc and (us < rtc[-1] or (us == rtc[-1] and lg < logic[-1])):
            idx.time_sorted = False
        versions.append(version)
        rtc.append(us)
        logic.append(lg)
        self._off.append(off)
        return idx.head + len(versions) - 1

    def _write_all(self, bufs: list[Any], offset: int) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            done = os.pwritev(self._dfd, views[:_IOV_MAX], offset)
            offset += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]

    def _flush_pending(self) -> None:
        """Write everything appended but not yet handed to the kernel, in one ``pwritev``."""
        if not self._pending and not self._iov:
            return
        # take the buffers first: a failed write's traceback may still hold views of them
        bufs, self._iov = self._iov, []
        if self._pending:
            bufs.append(self._pending)
            self._pending = bytearray()
        self._iov_bytes = 0
        total = sum(len(b) for b in bufs)
        self._write_all(bufs, self._written)
        self._written += total

    def _failed_write(self, exc: OSError, what: str) -> None:
        """Undo every entry not yet persisted, so the files end at the last durable entry, and raise."""
        kept = self._rollback_to_synced()
        if exc.errno in NO_SPACE_ERRNOS:
            raise DiskFullError(exc.errno, f"no space left for log {self.name!r} in {self.directory} during {what} "
                                f"({exc.strerror}); the entries not yet persisted were dropped and the log "
                                f"is intact up to version {kept}") from exc
        raise StorageError(f"log {self.name!r}: {what} failed: {exc}; the log is intact up to version {kept}") from exc

    def _rollback_to_synced(self) -> int:
        keep = self._synced_tail - self._idx.head
        self._idx.drop_back(keep)
        del self._off[keep:]
        self._pending = bytearray()
        self._iov, self._iov_bytes = [], 0
        del self._ipending[(self._synced_tail - self._idx_written_tail) * REC:]
        self._end = self._written = self._synced_end
        try:
            os.ftruncate(self._dfd, self._synced_end)  # shrinking needs no space
        except OSError as exc:
            log.error("%s: could not cut the unpersisted tail after a failed write: %s "
                      "(it will be checked and cut when the log is next opened)", self.data_path, exc)
        return self.latest_version

    @locked
    def persist(self, up_to_version: int | None = None) -> int:
        if self._closed:
            raise LogClosedError(f"log {self.name!r} is closed")
        if self._synced_tail == self._idx.tail or self.readonly:
            return self.latest_persisted_version
        try:
            self._flush_pending()
            os.fdatasync(self._dfd)  # data first: an index record must never point at unsynced bytes
        except OSError as exc:
            self._failed_write(exc, "persist")
        self._synced_end = self._end
        self._synced_tail = self._idx.tail
        self._write_index_records()
        if time.monotonic() - self._last_idx_sync >= self._index_sync_interval:
            self._sync_index()
        return self.latest_persisted_version

    def _write_index_records(self) -> None:
        """Write the index records of the persisted entries not yet indexed (only after the data sync)."""
        start, stop = self._idx_written_tail, self._synced_tail
        if start >= stop:
            return
        nbytes = (stop - start) * REC
        if nbytes == len(self._ipending):
            out, self._ipending = self._ipending, bytearray()
        else:
            out = self._ipending[:nbytes]
            del self._ipending[:nbytes]
        try:
            os.pwrite(self._ifd, out, FILE_HDR + start * REC)
        except OSError as exc:
            # the entries are durable in the data file; the index is rebuilt from it on the next open
            self._ipending[:0] = out
            log.warning("%s: could not write index records %d..%d (%s); they will be rebuilt from the data file",
                        self.idx_path, start, stop - 1, exc)
            return
        self._idx_written_tail = stop
        self._idx_dirty = True

    def _sync_index(self) -> None:
        if self._idx_dirty:
            try:
                os.fdatasync(self._ifd)
            except OSError as exc:
                log.warning("%s: index sync failed (%s); it will be rebuilt from the data file if needed",
                            self.idx_path, exc)
        self._idx_dirty = False
        self._last_idx_sync = time.monotonic()

    @locked
    def trim(self, version: int) -> int:
        self._check_writable()
        self.persist()
        idx = self._idx
        count = 0 if not len(idx) or version < idx.versions[0] else idx.pos_of_version(version) + 1
        if not count:
            return 0
        self._sync_index()  # the kept entries' index records are durable before the head moves past them
        old_head_offset = self._head_offset
        self._floor = idx.versions[count - 1]
        self._head_offset = self._off[count] if count < len(self._off) else self._end
        idx.drop_front(count)
        del self._off[:count]
        self._write_meta()
        _punch_hole(self._dfd, max(FILE_HDR, old_head_offset), self._head_offset)
        _punch_hole(self._ifd, FILE_HDR, FILE_HDR + idx.head * REC)
        return count

    @locked
    def truncate(self, version: int) -> int:
        self._check_writable()
        self.persist()
        idx = self._idx
        keep = 0 if not len(idx) or version < idx.versions[0] else idx.pos_of_version(version) + 1
        dropped = len(idx) - keep
        if not dropped:
            return 0
        new_end = self._off[keep]
        # data first: if we crash before the index is cut, its extra records point past the data and are cut
        os.ftruncate(self._dfd, new_end)
        os.fdatasync(self._dfd)
        idx.drop_back(keep)
        del self._off[keep:]
        os.ftruncate(self._ifd, FILE_HDR + min(idx.tail, self._idx_written_tail) * REC)
        os.fdatasync(self._ifd)
        # records still waiting (a failed index write) for entries that are gone are dropped too
        del self._ipending[max(0, idx.tail - self._idx_written_tail) * REC:]
        self._idx_written_tail = min(self._idx_written_tail, idx.tail)
        self._end = self._written = self._synced_end = new_end
        self._synced_tail = idx.tail
        return dropped

    @locked
    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.readonly:
                self.persist()
                self._sync_index()
        finally:
            self._closed = True
            self._close_fds()

    def __del__(self) -> None:
        # a log dropped without close(): hand what it buffered to the kernel and release the lock (as a crash
        # would, but without losing the buffer); durability needs close() or persist()
        if not hasattr(self, "_lfd"):  # __init__ failed before any file was opened
            return
        if not self._closed and not self.readonly:
            try:
                self._flush_pending()
            except Exception:  # nothing to report to at this point; the data file is checked on open
                pass
        self._closed = True
        self._close_fds()

    def _close_fds(self) -> None:
        for attr in ("_dfd", "_ifd", "_lfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)  # closing the lock file releases the flock
                setattr(self, attr, -1)

    # ------------------------------------------------------------------ reads
    def _read(self, pos: int) -> LogEntry:
        off = self._off[pos]
        end = self._entry_end(pos)
        if end > self._written:
            self._flush_pending()  # the entry is still in our write buffer
        buf = os.pread(self._dfd, end - off, off)
        if len(buf) < HDR:
            raise LogCorruptionError(self.data_path, off, "entry missing (file shorter than the index says)")
        hdr = _check_header(buf[:HDR])
        if isinstance(hdr, str):
            raise LogCorruptionError(self.data_path, off, hdr)
        pcrc, length, version, us, lg = hdr
        payload = buf[HDR:]
        if length != len(payload) or _crc(payload) != pcrc:
            raise LogCorruptionError(self.data_path, off, "payload fails its checksum (changed since open)")
        return LogEntry(self._idx.head + pos, version, HLC(us, lg), payload)

    @locked
    def get_by_index(self, index: int) -> LogEntry:
        self._check_open()
        return self._read(self._idx.pos_of_index(index))

    @locked
    def get_by_version(self, version: int, exact: bool = False) -> LogEntry:
        self._check_open()
        return self._read(self._idx.pos_of_version(version, exact))

    @locked
    def get_by_time(self, timestamp: HLC | int) -> LogEntry:
        self._check_open()
        return self._read(self._idx.pos_of_time(timestamp if type(timestamp) is HLC else HLC.coerce(timestamp)))

    def __iter__(self) -> Iterator[LogEntry]:
        index = self.earliest_index
        while True:
            with self._mutex:  # per entry: a writer may go on between two
                self._check_open()
                idx = self._idx
                index = max(index, idx.head)  # trimmed meanwhile
                if index >= idx.tail:
                    return
                entry = self._read(index - idx.head)
            yield entry
            index += 1

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.name!r} is closed")

    # ------------------------------------------------------------------ metadata
    @property
    @locked
    def latest_version(self) -> int:
        self._check_open()
        return self._idx.versions[-1] if self._idx.versions else self._floor

    @property
    @locked
    def latest_persisted_version(self) -> int:
        self._check_open()
        idx = self._idx
        if self._synced_tail > idx.head:
            return idx.versions[self._synced_tail - 1 - idx.head]
        return self._floor  # trim persists first, so everything trimmed was persisted

    @locked
    def __len__(self) -> int:
        self._check_open()
        return len(self._idx)

    @property
    @locked
    def earliest_index(self) -> int:
        self._check_open()
        return self._idx.head

    @property
    @locked
    def next_index(self) -> int:
        self._check_open()
        return self._idx.tail

    @property
    @locked
    def data_bytes(self) -> int:
        """Bytes the retained entries take in the data file (headers included)."""
        return self._end - self._head_offset

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} entries"
        return f"<FileLogStore {self.name!r} in {self.directory} {state}>"


def list_logs(directory: str | os.PathLike[str]) -> list[str]:
    """The on-disk base names of the logs in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".data")] for p in d.iterdir() if p.name.endswith(".data"))


__all__ = ["FileLogStore", "list_logs"]
