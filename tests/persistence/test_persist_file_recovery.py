"""The file store after damage: flipped bytes, torn tails, lost index, a full disk, a second process."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from derecho_storage_file import FileLogStore
from derecho_storage_file import store as file_store

from derecho_core.storage import HLC, DiskFullError, LogCorruptionError, LogLockedError

pytestmark = pytest.mark.timeout(60)

N = 8


def payload(v: int) -> bytes:
    return f"entry-{v}-".encode() * (v + 3)


def make_log(tmp_path, n=N, name="log"):
    log = FileLogStore(tmp_path, name)
    for v in range(1, n + 1):
        log.append(v, HLC(1000 + v, 0), payload(v))
    offsets = list(log._off)
    log.close()
    return log.data_path, log.idx_path, offsets


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def versions(log):
    return [e.version for e in log]


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_last_entry_is_cut_with_a_warning(tmp_path, caplog, where):
    data, _, offs = make_log(tmp_path)
    flip(data, offs[-1] + (file_store.HDR + 5 if where == "payload" else 20))
    with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
        log = FileLogStore(tmp_path, "log")
    try:
        assert versions(log) == list(range(1, N))
        assert [e.data for e in log] == [payload(v) for v in range(1, N)]
        assert log.recovery["cut_entries"] == 1
        msgs = [r.getMessage() for r in caplog.records if r.name == "derecho.persistence"]
        assert any(str(data) in m and f"offset {offs[-1]}" in m for m in msgs), msgs
        log.append(N, HLC(5000, 0), b"replacement")  # the log goes on from the cut
    finally:
        log.close()
    assert os.path.getsize(data) == offs[-1] + file_store.HDR + len(b"replacement")


@pytest.mark.parametrize("victim", [0, 3, N - 2])
@pytest.mark.parametrize("where", ["payload", "header", "magic"])
def test_flipped_middle_entry_is_an_error_naming_file_and_offset(tmp_path, victim, where):
    data, _, offs = make_log(tmp_path)
    delta = {"payload": file_store.HDR + 2, "header": 12, "magic": 0}[where]
    flip(data, offs[victim] + delta)
    with pytest.raises(LogCorruptionError) as info:
        FileLogStore(tmp_path, "log")
    err = info.value
    assert err.path == str(data)
    assert err.offset == offs[victim]
    assert str(data) in str(err) and f"offset {offs[victim]}" in str(err)
    # nothing was cut: the file is untouched, so it can be repaired
    assert os.path.getsize(data) == offs[-1] + file_store.HDR + len(payload(N))


def test_corruption_found_after_open_is_an_error_too(tmp_path):
    data, _, offs = make_log(tmp_path)
    log = FileLogStore(tmp_path, "log")
    try:
        flip(data, offs[2] + file_store.HDR + 1)
        with pytest.raises(LogCorruptionError) as info:
            log.get_by_index(2)
        assert info.value.offset == offs[2]
        assert log.get_by_index(3).data == payload(4)
    finally:
        log.close()


@pytest.mark.parametrize("cut", [1, file_store.HDR - 1, file_store.HDR + 3])
def test_torn_tail_write_is_cut(tmp_path, caplog, cut):
    data, _, offs = make_log(tmp_path)
    with open(data, "r+b") as f:  # the last entry was only partly written
        f.truncate(offs[-1] + cut)
    with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
        log = FileLogStore(tmp_path, "log")
    try:
        assert versions(log) == list(range(1, N))
        assert any("torn" in r.getMessage() for r in caplog.records)
    finally:
        log.close()


def test_garbage_after_the_last_entry_is_cut(tmp_path, caplog):
    data, _, _ = make_log(tmp_path)
    size = os.path.getsize(data)
    with open(data, "ab") as f:
        f.write(os.urandom(100))
    with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
        log = FileLogStore(tmp_path, "log")
    try:
        assert versions(log) == list(range(1, N + 1))
        assert any(f"offset {size}" in r.getMessage() for r in caplog.records)
    finally:
        log.close()
    assert os.path.getsize(data) == size


def test_lost_or_damaged_index_is_rebuilt_from_the_data(tmp_path, caplog):
    data, idx, _ = make_log(tmp_path)
    flip(idx, file_store.FILE_HDR + 3 * file_store.REC + 4)
    with caplog.at_level(logging.WARNING, logger="derecho.persistence"):
        log = FileLogStore(tmp_path, "log")
    assert versions(log) == list(range(1, N + 1))
    assert log.recovery["recovered_from_data"] == N - 3
    log.close()
    os.unlink(idx)
    log = FileLogStore(tmp_path, "log")
    assert [e.data for e in log] == [payload(v) for v in range(1, N + 1)]
    assert log.get_by_time(1004).version == 4
    log.close()


def test_unpersisted_entries_written_to_the_os_survive_a_reopen(tmp_path):
    # entries flushed to the OS but never persisted are found by the data scan (the index never saw them)
    log = FileLogStore(tmp_path, "log")
    for v in range(1, 4):
        log.append(v, v, b"x" * 100000)
    log.append(4, 4, b"y")
    assert log.get_by_index(-1).data == b"y"  # reading an entry hands the write buffer to the kernel
    log.append(5, 5, b"lost")  # still in the buffer when the process dies
    log._close_fds()  # as if the process died: no persist, no index
    log._closed = True
    log = FileLogStore(tmp_path, "log")
    assert versions(log) == [1, 2, 3, 4]
    assert log.latest_persisted_version == 4  # open made them durable
    log.close()


def test_directory_is_private_and_files_named_after_the_log(tmp_path):
    d = tmp_path / "deep" / "plog"
    FileLogStore(d, "my.Type-0-1.field").close()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert sorted(os.listdir(d)) == ["my.Type-0-1.field.data", "my.Type-0-1.field.idx", "my.Type-0-1.field.lock"]


def test_trim_does_not_rewrite_the_log(tmp_path):
    log = FileLogStore(tmp_path, "log")
    for v in range(1, 65):
        log.append(v, v, os.urandom(16384))
    log.persist()
    size = os.path.getsize(log.data_path)
    blocks = os.stat(log.data_path).st_blocks
    ino = os.stat(log.data_path).st_ino
    log.trim(48)
    assert os.path.getsize(log.data_path) == size and os.stat(log.data_path).st_ino == ino
    assert os.stat(log.data_path).st_blocks <= blocks  # holes punched where the file system can
    log.close()
    log = FileLogStore(tmp_path, "log")
    assert versions(log) == list(range(49, 65)) and log.earliest_index == 48
    log.close()


CHILD_OPEN = """
import sys
from derecho_storage_file import FileLogStore
from derecho_core.storage import LogLockedError
try:
    FileLogStore(sys.argv[1], "log")
except LogLockedError as e:
    print("LOCKED:", e)
    sys.exit(3)
print("OPENED")
"""


def test_a_second_process_gets_a_clear_error(tmp_path):
    log = FileLogStore(tmp_path, "log")
    try:
        r = subprocess.run([sys.executable, "-c", CHILD_OPEN, str(tmp_path)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"already open by process {os.getpid()}" in r.stdout
    finally:
        log.close()
    r = subprocess.run([sys.executable, "-c", CHILD_OPEN, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "OPENED" in r.stdout, r.stdout + r.stderr


def test_lock_error_in_process(tmp_path):
    log = FileLogStore(tmp_path, "log")
    with pytest.raises(LogLockedError, match="this process"):
        FileLogStore(tmp_path, "log")
    log.close()


CHILD_FULL = """
import resource, signal, sys
from derecho_storage_file import FileLogStore
from derecho_core.storage import DiskFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
log = FileLogStore(sys.argv[1], "log")
resource.setrlimit(resource.RLIMIT_FSIZE, (300000, 300000))
v = 0
try:
    while True:
        v += 1
        log.append(v, v, bytes([v % 256]) * (1000 + 7919 * v % 30000))
        if v % 3 == 0:
            log.persist()
            print("persisted", log.latest_persisted_version, flush=True)
except DiskFullError as e:
    print("FULL", e, flush=True)
latest = log.latest_version
assert latest >= log.latest_persisted_version
assert [e.version for e in log] == list(range(1, latest + 1))  # still readable
print("LATEST", latest, flush=True)
log.close()
"""


def test_full_disk_is_a_clear_error_and_the_log_stays_readable(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD_FULL, str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    full = [line for line in lines if line.startswith("FULL")]
    assert full and "no space left for log 'log'" in full[0] and "intact up to version" in full[0], r.stdout
    persisted = max(int(line.split()[1]) for line in lines if line.startswith("persisted"))
    latest = int(lines[-1].split()[1])
    log = FileLogStore(tmp_path, "log")
    try:
        got = versions(log)
        assert got == list(range(1, len(got) + 1)) and len(got) >= persisted and got[-1] == latest
        for e in log:
            assert e.data == bytes([e.version % 256]) * (1000 + 7919 * e.version % 30000)
    finally:
        log.close()


def test_enospc_on_sync_rolls_back_to_the_persisted_entries(tmp_path, monkeypatch):
    log = FileLogStore(tmp_path, "log")
    try:
        for v in (1, 2, 3):
            log.append(v, v, b"keep")
        log.persist()
        for v in (4, 5):
            log.append(v, v, b"lost")

        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(file_store.os, "fdatasync", no_space)
        with pytest.raises(DiskFullError, match="intact up to version 3") as info:
            log.persist()
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert versions(log) == [1, 2, 3] and log.latest_version == 3
        log.append(4, 4, b"again")
        log.persist()
    finally:
        log.close()
    log = FileLogStore(tmp_path, "log")
    assert [e.data for e in log] == [b"keep"] * 3 + [b"again"]
    log.close()


def test_index_sync_every_persist_when_asked(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(file_store.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    log = FileLogStore(tmp_path, "log", index_sync_interval=0)
    calls.clear()
    log.append(1, 1, b"x")
    log.persist()
    assert calls == [log._dfd, log._ifd]  # data before index
    log.close()


def test_readonly_open_reports_without_touching(tmp_path, caplog):
    data, _, offs = make_log(tmp_path)
    with open(data, "ab") as f:
        f.write(b"junk")
    before = data.read_bytes()
    ro = FileLogStore(tmp_path, "log", readonly=True)
    assert versions(ro) == list(range(1, N + 1)) and ro.recovery["cut_bytes"] == 4
    ro.close()
    assert data.read_bytes() == before


def test_child_source_is_valid_python():
    compile(textwrap.dedent(CHILD_FULL), "child", "exec")
