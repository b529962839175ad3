"""Run group members as real processes on 127.0.0.1 (tests and the view-change benchmark).

Each member is ``python -m derecho_core member --json`` with its own
``local_id`` and ports chosen free at run time; its JSON lines are collected
by a reader thread so a test can wait for views.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (kept bound until all are chosen)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class Member:
    """One ``derecho member`` process."""

    def __init__(self, node_id: int, ports: dict[str, int], conf_file: Path, extra: list[str] | None = None,
                 host: str = "127.0.0.1", env: dict[str, str] | None = None, netns: str | None = None,
                 program: list[str] | None = None) -> None:
        self.node_id = node_id
        self.ports = ports
        # ``program``: the module run instead of ``derecho member`` (it takes the same arguments)
        args = [sys.executable, *(program or ["-m", "derecho_core", "member", "--json"]), "--file", str(conf_file),
                f"--DERECHO/local_id={node_id}", f"--DERECHO/local_ip={host}"]
        args += [f"--DERECHO/{k}={v}" for k, v in ports.items()]
        args += extra or []
        if netns:
            args = ["ip", "netns", "exec", netns] + args
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            with self._cond:
                if is_stdout:
                    try:
                        self.events.append(json.loads(line))
                    except json.JSONDecodeError:
                        self.stderr.append("stdout: " + line)
                else:
                    self.stderr.append(line)
                self._cond.notify_all()

    def command(self, line: str) -> None:
        """Write one command line to the member's stdin (for programs that read commands)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def event(self, name: str, timeout: float = 30, after: int = 0) -> dict[str, Any]:
        """The first event called ``name`` at position ``after`` or later in the event list."""
        return self.wait_for(lambda evs: next((e for e in evs[after:] if e.get("event") == name), None), timeout)

    def views(self) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "view"]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.events)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"node {self.node_id}: condition not met within {timeout} s; "
                                       f"events: {self.events[-5:]}; stderr: {''.join(self.stderr[-10:])}")
                self._cond.wait(min(left, 0.2))

    def last_vid(self) -> int:
        views = self.views()
        return views[-1]["vid"] if views else -1

    def wait_for_view(self, members: Any, timeout: float = 30, after_vid: int = -1) -> dict[str, Any]:
        """The first view with exactly ``members`` (any order) and a vid above ``after_vid``."""
        want = sorted(members)
        return self.wait_for(lambda evs: next((e for e in evs if e.get("event") == "view"
                                               and e["vid"] > after_vid and sorted(e["members"]) == want), None),
                             timeout)

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalGroup:
    """Members on 127.0.0.1 sharing one config file; node 0 is the contact."""

    PORT_KEYS = ("gms_port", "state_transfer_port", "sst_port", "rdmc_port", "external_port")

    def __init__(self, workdir: Path, provider: str = "sockets", settings: dict[str, Any] | None = None,
                 extra: list[str] | None = None, program: list[str] | None = None) -> None:
        self.workdir = workdir
        self.program = program
        self.provider = provider
        self.extra = extra or []
        self.members: dict[int, Member] = {}
        self.ports: dict[int, dict[str, int]] = {}
        self.retired: list[Member] = []
        self.settings = {"DERECHO/heartbeat_ms": 50, "DERECHO/suspicion_timeout_ms": 600,
                         "LOGGER/default_log_level": "warning", "RDMA/provider": provider, **(settings or {})}
        self.conf_file = workdir / "derecho.cfg"

    def ports_of(self, node_id: int) -> dict[str, int]:
        if node_id not in self.ports:
            self.ports[node_id] = dict(zip(self.PORT_KEYS, free_ports(5)))
        return self.ports[node_id]

    def write_conf(self) -> None:
        contact = self.ports_of(0)["gms_port"]
        sections: dict[str, list[str]] = {}
        for key, value in {"DERECHO/contact_ip": "127.0.0.1", "DERECHO/contact_port": contact,
                           **self.settings}.items():
            section, name = key.rsplit("/", 1)
            sections.setdefault(section, []).append(f"{name} = {value}")
        self.conf_file.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items()))

    def start(self, node_id: int) -> Member:
        if not self.conf_file.exists():
            self.write_conf()
        old = self.members.get(node_id)
        if old is not None:
            self.retired.append(old)
        member = Member(node_id, self.ports_of(node_id), self.conf_file, self.extra, program=self.program)
        self.members[node_id] = member
        return member

    def start_extra(self, node_id: int) -> Member:
        """A second process claiming ``node_id`` (its own ports)."""
        ports = dict(zip(self.PORT_KEYS, free_ports(5)))
        member = Member(node_id, ports, self.conf_file, self.extra, program=self.program)
        self.retired.append(member)
        return member

    def close(self) -> None:
        for m in list(self.members.values()) + self.retired:
            m.kill()
