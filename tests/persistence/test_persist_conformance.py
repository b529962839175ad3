"""The storage contract, checked the same way against every store (``file`` and ``mem``)."""

from __future__ import annotations

import pytest

from derecho_core import plugins
from derecho_core.storage import (
    HLC,
    InvalidIndexError,
    InvalidTimestampError,
    InvalidVersionError,
    LogClosedError,
    LogFullError,
    LogLockedError,
)

pytestmark = pytest.mark.timeout(30)


def fill(log, versions, t0=1000):
    for i, v in enumerate(versions):
        log.append(v, HLC(t0 + 10 * i, 0), f"v{v}".encode())


def test_the_plugin_registers_the_store(store_name, conf):
    factory = plugins.storage(store_name)
    log = factory(conf, "via-plugin")
    try:
        log.append(1, 5, b"x")
        assert log.get_by_version(1).data == b"x"
    finally:
        log.close()


def test_empty_log(open_log):
    log = open_log()
    assert len(log) == 0
    assert log.latest_version == -1
    assert log.latest_persisted_version == -1
    assert log.latest_index == -1
    assert log.earliest_index == log.next_index == 0
    assert log.earliest_version == -1
    assert list(log) == []
    with pytest.raises(InvalidIndexError):
        log.get_by_index(0)
    with pytest.raises(InvalidVersionError):
        log.get_by_version(10)
    with pytest.raises(InvalidTimestampError):
        log.get_by_time(10**15)


def test_append_and_lookups(open_log):
    log = open_log()
    fill(log, [10, 20, 30, 40])
    assert [e.version for e in log] == [10, 20, 30, 40]
    assert [e.index for e in log] == [0, 1, 2, 3]
    assert log.get_by_index(2).data == b"v30"
    assert log.get_by_index(-1).version == 40
    assert log.get_by_index(-4).version == 10
    assert log.get_by_version(30).data == b"v30"
    assert log.get_by_version(35).version == 30  # latest before
    assert log.get_by_version(1000).version == 40
    with pytest.raises(InvalidVersionError):
        log.get_by_version(35, exact=True)
    with pytest.raises(InvalidVersionError):
        log.get_by_version(5)
    with pytest.raises(InvalidIndexError):
        log.get_by_index(4)
    with pytest.raises(InvalidIndexError):
        log.get_by_index(-5)
    assert (log.latest_version, log.latest_index, log.earliest_version, len(log)) == (40, 3, 10, 4)


def test_time_queries(open_log):
    log = open_log()
    log.append(1, HLC(100, 0), b"a")
    log.append(2, HLC(100, 1), b"b")
    log.append(3, HLC(100, 2), b"c")
    log.append(4, HLC(200, 0), b"d")
    assert log.get_by_time(HLC(100, 0)).version == 1
    assert log.get_by_time(HLC(100, 1)).version == 2
    assert log.get_by_time(100).version == 1  # µs alone means logic 0
    assert log.get_by_time(150).version == 3
    assert log.get_by_time(HLC(200, 0)).version == 4
    assert log.get_by_time(10**12).version == 4
    with pytest.raises(InvalidTimestampError):
        log.get_by_time(99)
    assert log.get_by_index(1).timestamp == HLC(100, 1)


def test_out_of_order_timestamps(open_log):
    # versions come from delivery order, timestamps from senders' clocks: they need not agree
    log = open_log()
    log.append(1, 500, b"a")
    log.append(2, 300, b"b")
    log.append(3, 400, b"c")
    assert log.get_by_time(350).version == 2
    assert log.get_by_time(450).version == 3
    assert log.get_by_time(1000).version == 1
    with pytest.raises(InvalidTimestampError):
        log.get_by_time(299)


def test_versions_must_increase(open_log):
    log = open_log()
    fill(log, [5])
    for bad in (5, 4, -1):
        with pytest.raises(InvalidVersionError):
            log.append(bad, 2000, b"x")
    assert len(log) == 1


def test_data_types_and_sizes(open_log):
    log = open_log()
    big = bytes(range(256)) * 4096  # 1 MiB
    log.append(1, 1, b"")
    log.append(2, 2, bytearray(b"ba"))
    log.append(3, 3, memoryview(b"xxmvxx")[2:4])
    log.append(4, 4, big)
    log.append(5, 5, b"s" * 70000)
    assert [e.data for e in log][:3] == [b"", b"ba", b"mv"]
    assert log.get_by_version(4).data == big
    assert log.get_by_version(5).data == b"s" * 70000


def test_persist_marks(open_log):
    log = open_log()
    fill(log, [1, 2, 3])
    assert log.latest_persisted_version == -1
    assert log.persist() == 3
    assert log.latest_persisted_version == 3
    fill(log, [4, 5], t0=5000)
    assert log.latest_persisted_version == 3
    assert log.persist(4) >= 4
    assert log.persist() == 5


def test_trim_keeps_indexes(open_log):
    log = open_log()
    fill(log, [10, 20, 30, 40, 50])
    assert log.trim(25) == 2
    assert log.earliest_index == 2
    assert log.earliest_version == 30
    assert log.get_by_index(2).version == 30
    assert log.get_by_index(-1).version == 50
    with pytest.raises(InvalidIndexError):
        log.get_by_index(1)
    with pytest.raises(InvalidVersionError):
        log.get_by_version(25)
    assert log.trim(5) == 0
    assert log.trim(50) == 3
    assert len(log) == 0
    assert log.latest_version == 50  # remembered, so versions keep increasing
    assert log.latest_persisted_version == 50
    with pytest.raises(InvalidVersionError):
        log.append(50, 1, b"x")
    log.append(60, 1, b"y")
    assert log.get_by_index(5).version == 60
    assert log.earliest_index == 5


def test_truncate(open_log):
    log = open_log()
    fill(log, [10, 20, 30, 40])
    log.persist()
    assert log.truncate(25) == 2
    assert [e.version for e in log] == [10, 20]
    assert log.latest_version == log.latest_persisted_version == 20
    log.append(25, 9999, b"again")
    assert log.get_by_index(2).data == b"again"
    assert log.truncate(0) == 3
    assert len(log) == 0 and log.next_index == 0


def test_truncate_unpersisted_and_trimmed(open_log):
    log = open_log()
    fill(log, [1, 2, 3, 4, 5, 6])
    log.trim(2)
    assert log.truncate(4) == 2
    assert [e.version for e in log] == [3, 4]
    assert log.earliest_index == 2


def test_reopen_keeps_everything(open_log):
    log = open_log("keep")
    fill(log, [1, 2, 3, 4])
    log.trim(1)
    log.append(9, HLC(7777, 3), b"last")
    log.close()
    log = open_log("keep")
    assert [e.version for e in log] == [2, 3, 4, 9]
    assert log.earliest_index == 1
    assert log.get_by_version(9).timestamp == HLC(7777, 3)
    assert log.latest_persisted_version == 9
    log.append(10, 1, b"more")
    assert log.get_by_index(-1).index == 5


def test_reset_wipes(open_log):
    log = open_log("wipe")
    fill(log, [1, 2])
    log.close()
    log = open_log("wipe", reset=True)
    assert len(log) == 0 and log.latest_version == -1


def test_second_open_is_refused(open_log):
    open_log("busy")
    with pytest.raises(LogLockedError, match="already open"):
        open_log("busy")


def test_closed_log_refuses_calls(open_log):
    log = open_log()
    log.close()
    log.close()  # idempotent
    with pytest.raises(LogClosedError):
        log.append(1, 1, b"x")
    with pytest.raises(LogClosedError):
        log.get_by_index(0)


def test_max_log_entry(open_log):
    log = open_log(max_log_entry=3)
    fill(log, [1, 2, 3])
    with pytest.raises(LogFullError, match="max_log_entry"):
        log.append(4, 1, b"x")
    log.trim(1)
    log.append(4, 1, b"x")


def test_max_data_size(open_log):
    log = open_log(max_data_size=1000)
    log.append(1, 1, b"x" * 500)
    with pytest.raises(LogFullError, match="max_data_size"):
        log.append(2, 2, b"y" * 600)
    assert len(log) == 1


def test_distinct_names_are_distinct_logs(open_log):
    a, b = open_log("a/b"), open_log("a_b")  # the same once made file-name safe
    a.append(1, 1, b"a")
    b.append(1, 1, b"b")
    assert a.get_by_index(0).data == b"a" and b.get_by_index(0).data == b"b"


def test_a_reader_thread_beside_the_writer(open_log):
    import threading

    def data(v):
        return bytes([v % 251]) * (70000 if v % 50 == 0 else v % 300)

    log = open_log()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader():
        try:
            while not stop.is_set():
                if len(log):
                    e = log.get_by_index(-1)
                    assert e.data == data(e.version)
                for e in log:
                    assert e.data == data(e.version)
                    break
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 1501):
            log.append(v, v, data(v))
            if v % 7 == 0:
                log.persist()
            if v % 400 == 0:
                log.trim(v - 100)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert log.latest_version == 1500 and log.earliest_version == 1101


def test_a_log_dropped_without_close_can_be_opened_again(open_log, store_name, conf):
    import gc

    from derecho_storage_file import FileLogStore
    from derecho_storage_mem import MemLogStore

    factory = FileLogStore.open if store_name == "file" else MemLogStore.open
    log = factory(conf, "dropped")
    log.append(1, 1, b"kept")
    del log
    gc.collect()
    again = open_log("dropped")
    assert [e.data for e in again] == [b"kept"]
