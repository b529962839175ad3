"""Random append / trim / truncate / persist / reopen sequences against a plain-list model, for both stores.

The file store also gets "crash" steps: the process drops its files without
persisting, and the reopened log must be a prefix of the model that holds
every persisted entry; the model then adopts what survived.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass

import pytest
from derecho_storage_file import FileLogStore
from derecho_storage_mem import MemLogStore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from derecho_core.storage import HLC, InvalidIndexError, InvalidTimestampError, InvalidVersionError

_roots = itertools.count()


@dataclass
class E:
    index: int
    version: int
    ts: HLC
    data: bytes


class LogMachine(RuleBasedStateMachine):
    store = "file"

    @initialize()
    def setup(self):
        self.dir = tempfile.mkdtemp(prefix="derecho-sm-")
        self.root = f"sm-{next(_roots)}"
        self.entries: list[E] = []  # the model: retained entries, oldest first
        self.head = 0  # index of the first retained entry
        self.floor = -1  # version of the last trimmed entry
        self.persisted_tail = 0  # entries with index < this are durable
        self.next_version = 1
        self.clock = 1000
        self.log = self._open()

    def _open(self):
        if self.store == "file":
            return FileLogStore(self.dir, "sm", index_sync_interval=0.0 if next(_roots) % 2 else 10.0)
        return MemLogStore("sm", root=self.root)

    def teardown(self):
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.store == "mem" and hasattr(self, "root"):
            MemLogStore.discard(self.root, "sm")
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- model helpers
    @property
    def tail(self) -> int:
        return self.head + len(self.entries)

    @property
    def latest_version(self) -> int:
        return self.entries[-1].version if self.entries else self.floor

    def _persist_all(self):
        self.persisted_tail = self.tail

    # ---------------------------------------------------------------- steps
    @rule(gap=st.integers(1, 3), size=st.sampled_from([0, 1, 7, 100, 5000, 70000]),
          dt=st.integers(-2, 5), logic=st.integers(0, 2))
    def append(self, gap, size, dt, logic):
        version = self.latest_version + gap
        self.clock += dt  # sometimes backwards: senders' clocks disagree
        ts = HLC(self.clock, logic)
        data = bytes([version % 251]) * size
        assert self.log.append(version, ts, data) == self.tail
        self.entries.append(E(self.tail, version, ts, data))

    @rule(back=st.integers(0, 3))
    def append_stale_version_fails(self, back):
        with pytest.raises(InvalidVersionError):
            self.log.append(self.latest_version - back, 1, b"x")

    @rule()
    def persist(self):
        assert self.log.persist() == self.latest_version
        self._persist_all()

    @rule(data=st.data())
    def trim(self, data):
        version = data.draw(st.integers(self.floor - 1, self.latest_version + 2))
        keep = [e for e in self.entries if e.version > version]
        dropped = len(self.entries) - len(keep)
        assert self.log.trim(version) == dropped
        if dropped:
            self.floor = self.entries[dropped - 1].version
            self.head += dropped
        self.entries = keep
        self._persist_all()

    @rule(data=st.data())
    def truncate(self, data):
        version = data.draw(st.integers(self.floor - 1, self.latest_version + 2))
        keep = [e for e in self.entries if e.version <= version]
        assert self.log.truncate(version) == len(self.entries) - len(keep)
        self.entries = keep
        self._persist_all()

    @rule()
    def reopen(self):
        self.log.close()
        self.log = self._open()
        self._persist_all()

    # ---------------------------------------------------------------- checks
    @invariant()
    def metadata_agrees(self):
        if not hasattr(self, "log"):
            return
        log = self.log
        assert len(log) == len(self.entries)
        assert log.earliest_index == self.head
        assert log.next_index == self.tail
        assert log.latest_version == self.latest_version
        durable = self.persisted_tail - self.head
        expect = self.entries[durable - 1].version if durable > 0 else self.floor
        assert log.latest_persisted_version == expect

    @invariant()
    def lookups_agree(self):
        if not hasattr(self, "log") or not self.entries:
            return
        log = self.log
        picks = {0, len(self.entries) - 1, len(self.entries) // 2}
        for p in picks:
            m = self.entries[p]
            e = log.get_by_index(m.index)
            assert (e.version, e.timestamp, e.data) == (m.version, m.ts, m.data)
            assert log.get_by_version(m.version, exact=True).index == m.index
            assert log.get_by_version(m.version + 1).index == (
                m.index if p + 1 == len(self.entries) or self.entries[p + 1].version > m.version + 1
                else m.index + 1)
            # time: the entry with the largest timestamp <= ts, the latest on ties
            best = max((x for x in self.entries if x.ts <= m.ts), key=lambda x: (x.ts, x.index))
            assert log.get_by_time(m.ts).index == best.index
        assert log.get_by_index(-1).index == self.tail - 1
        with pytest.raises(InvalidIndexError):
            log.get_by_index(self.tail)
        if self.head > 0:
            with pytest.raises(InvalidIndexError):
                log.get_by_index(self.head - 1)
        with pytest.raises(InvalidVersionError):
            log.get_by_version(self.entries[0].version - 1, exact=True)
        earliest_ts = min(x.ts for x in self.entries)
        if earliest_ts.logic > 0 or earliest_ts.rtc_us > 0:
            with pytest.raises(InvalidTimestampError):
                log.get_by_time(HLC(earliest_ts.rtc_us, earliest_ts.logic - 1) if earliest_ts.logic
                                else HLC(earliest_ts.rtc_us - 1, 10**6))


class FileLogMachine(LogMachine):
    store = "file"

    @rule()
    def crash(self):
        self.log._close_fds()  # as if killed: no persist, nothing more written
        self.log._closed = True
        self.log = self._open()
        got = list(self.log)
        durable = self.persisted_tail - self.head
        assert len(got) >= durable, "lost persisted entries"
        assert len(got) <= len(self.entries)
        for e, m in zip(got, self.entries):
            assert (e.index, e.version, e.timestamp, e.data) == (m.index, m.version, m.ts, m.data)
        self.entries = self.entries[:len(got)]
        self._persist_all()


    @rule(garbage=st.binary(max_size=200), idx_keep=st.floats(0, 1))
    def power_loss(self, garbage, idx_keep):
        """Only what was synced survives: the data file up to the last persist (plus a torn write), and
        any prefix of the index file (its records are synced lazily)."""
        log = self.log
        synced_end = log._synced_end
        log._close_fds()
        log._closed = True
        with open(log.data_path, "r+b") as f:
            f.truncate(synced_end)
            f.seek(synced_end)
            f.write(garbage)
        size = os.path.getsize(log.idx_path)
        with open(log.idx_path, "r+b") as f:
            f.truncate(int(size * idx_keep))
        self.log = self._open()
        durable = self.persisted_tail - self.head
        got = list(self.log)
        assert len(got) == durable
        for e, m in zip(got, self.entries):
            assert (e.index, e.version, e.timestamp, e.data) == (m.index, m.version, m.ts, m.data)
        self.entries = self.entries[:durable]
        self._persist_all()


class MemLogMachine(LogMachine):
    store = "mem"


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

TestFileLogStateMachine = pytest.mark.timeout(120)(FileLogMachine.TestCase)
TestFileLogStateMachine.settings = _settings
TestMemLogStateMachine = pytest.mark.timeout(120)(MemLogMachine.TestCase)
TestMemLogStateMachine.settings = _settings
