"""Several test hosts on one machine: network namespaces joined by a bridge (root only).

Addresses live in 10.213.<net>.0/24 *inside namespaces this code creates*, so
no traffic ever leaves the machine. Every namespace is removed on exit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"dpy-probe-{secrets.token_hex(3)}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


@dataclass
class Hosts:
    """``n`` hosts named ``<prefix>-h<i>`` with addresses ``10.213.<net>.<i+1>``."""

    n: int
    prefix: str = field(default_factory=lambda: f"dpy-{secrets.token_hex(3)}")
    net: int = field(default_factory=lambda: 1 + secrets.randbelow(250))

    def __post_init__(self) -> None:
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(self.n)]
        self.addresses = [f"10.213.{self.net}.{i + 1}" for i in range(self.n)]

    def __enter__(self) -> Hosts:
        try:
            subprocess.run(["ip", "netns", "add", self.bridge_ns], check=True, capture_output=True)
            _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
            _ip("link", "set", "br0", "up", ns=self.bridge_ns)
            for i, host in enumerate(self.hosts):
                subprocess.run(["ip", "netns", "add", host], check=True, capture_output=True)
                _ip("link", "set", "lo", "up", ns=host)
                _ip("link", "add", f"e{i}", "netns", host, "type", "veth", "peer", "name", f"b{i}",
                    "netns", self.bridge_ns)
                _ip("addr", "add", f"{self.addresses[i]}/24", "dev", f"e{i}", ns=host)
                _ip("link", "set", f"e{i}", "up", ns=host)
                _ip("link", "set", f"b{i}", "master", "br0", ns=self.bridge_ns)
                _ip("link", "set", f"b{i}", "up", ns=self.bridge_ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self, index: int) -> None:
        """Disconnect host ``index`` from the others (its link goes down; no RST is sent)."""
        _ip("link", "set", f"b{index}", "down", ns=self.bridge_ns)

    def reconnect(self, index: int) -> None:
        _ip("link", "set", f"b{index}", "up", ns=self.bridge_ns)

    def __exit__(self, *exc: object) -> None:
        for ns in self.hosts + [self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
