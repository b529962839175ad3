"""Fuzzing every decoder a peer's bytes reach (DESIGN §7: garbage is a clear error, never a crash).

::

    python -m derecho_core.testing.fuzz --inputs 1000000 [--seed S] [--targets a,b] [--live N]
                                        [--live-keyed N] [--json report.json] [--jobs J] [--timeout 1.0]
    python -m derecho_core.testing.fuzz --list
    python -m derecho_core.testing.fuzz --replay TARGET:INDEX [--from START] [--seed S]

**In-process targets.** Each target wraps one decoder (or one whole receive
path: a node in an installed view, a member's RPC layer, a state-transfer
receiver...) and says which exceptions it documents. The driver generates
inputs per target: random bytes; byte mutations (flips, interesting integers
over length fields, inserts, deletes, truncations, splices) of VALID messages
built with the real encoders; structure-aware mutations of their msgpack
trees (wrong types, huge ints, deep nesting, extra or missing fields), framed
correctly so they reach the decoder behind the framing; and raw msgpack
gadgets (absurd array/map/str lengths, 100,000-deep nesting). Every input is
classified as

* ``accepted`` (decoded and handled),
* ``rejected`` (the documented error, or a decoder that drops and logs), or
* ``crash`` (any other exception, or an exception a server thread had to log
  with a traceback): its input and traceback are recorded, or
* ``hang`` (the input took longer than ``--timeout``, 1 s by default: a
  SIGALRM interrupts it; a worker stuck in C code is killed by a watchdog).

Targets run in worker subprocesses (``--jobs`` at a time) with an address
space limit, so a runaway allocation becomes a recorded crash, not an
out-of-memory machine. Input ``i`` of a target is a pure function of
``(seed, target, i)`` (and, for stateful targets, of the inputs since the last
state reset, every ``reset_every`` inputs and after any crash or hang), so
``--replay`` reproduces any recorded finding.

**Live targets** (``--live N``): a real 3-member group of
``derecho_core.testing.rpc_member`` processes; N connections carry garbage to
every listening port of one member (the transport's ``sst_port``: raw bytes,
and a valid handshake followed by garbage frames on every channel; the
``gms_port``; the ``external_port``: raw bytes, and a valid HELLO followed by
garbage requests; the ``state_transfer_port``). Afterwards the member must be
alive, still in the view, answer a ``burst 10`` of ordered calls from every
member, and report the same state and log digests as the others.

docs/fuzzing.md describes every target and the last full run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import itertools
import json
import logging
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import msgpack

__all__ = ["TARGETS", "Harness", "Mutator", "Seed", "main", "run_fuzz", "run_live"]

DEFAULT_TIMEOUT = 1.0
DEFAULT_MEMORY_MB = 3072
PROGRESS_EVERY_S = 0.3
MAX_EXAMPLES = 5  # crash examples kept per (target, signature)
MAX_HEX = 4096  # hex characters of an input kept in a report


class _Hang(BaseException):
    """Raised by SIGALRM inside an input that ran past the time limit (a BaseException: no decoder catches it)."""


# ============================================================================ mutation engine

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 63, 64, 127, 128, -128, -129, 255, 256, 511, 512, 1023, 1024,
                    4095, 4096, 4097, 32767, 32768, -32768, -32769, 65535, 65536, 1 << 20, (1 << 24) - 1, 1 << 24,
                    1 << 30, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 1, (1 << 32) - 1, 1 << 32,
                    1 << 53, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 63)]
INTERESTING_BYTES = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc1, 0xc2, 0xc3, 0x90, 0x91, 0x9f, 0x80, 0x81, 0x8f,
                     0xa0, 0xa1, 0xbf, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
                     0xd0, 0xd3, 0xd4, 0xd7, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff]

#: raw msgpack that msgpack.packb cannot (or will not) produce: absurd lengths, deep nesting, invalid bytes
GADGETS: list[bytes] = [
    b"\xdd\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff\xc0", b"\xdf\xff\xff\xff\xff", b"\xdc\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xda\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc5\xff\xff",
    b"\xc9\xff\xff\xff\xff\x01", b"\xc7\x00\x05", b"\xd4\xff\x00", b"\xd6\xff\x00\x00\x00\x00",
    b"\xd7\xff" + b"\xff" * 8, b"\xc7\x0c\xff" + b"\xff" * 12, b"\xc1", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x01",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\x91" * 600 + b"\xc0", b"\x91" * 100_000 + b"\xc0", b"\x81\xa1k" * 2000 + b"\xc0",
    b"\x81\xc0\xc0", b"\x81\x90\xc0", b"\x81\x80\xc0", b"\x82\xa1a\x01\xa1a\x02",
    b"\xdc\x00\x10" + b"\xc0" * 16, b"\xa5\xff\xfe\xfd\xfc\xfb", b"\xd9\x03\xed\xa0\x80",
]


#: text that json, int() and config parsers choke on
TEXT_GADGETS: list[bytes] = [b"[" * 5000, b'{"a":' * 3000, b"9" * 5000, "\u00b2".encode(), "\u0663".encode(),
                             b"\xff\xfe", b"\x00", b"'", b'"', b"\r\n", "\u2028".encode(), b"[" * 50 + b"]" * 50,
                             b"-1", b"1e999", b"NaN", b"\\", b"%s%d", b"\t"]


def deep_ext(depth: int, code: int) -> bytes:
    """msgpack of ``depth`` nested ext values of ``code`` (each holding a one-element array of the next)."""
    inner = msgpack.packb([])
    for _ in range(depth):
        body = b"\x91" + inner
        inner = msgpack.packb(msgpack.ExtType(code, body))
    return inner


@dataclass
class Seed:
    """A valid message: ``obj`` (usually a msgpack tree) and ``encode`` turning a (mutated) obj into bytes."""

    obj: Any
    encode: Callable[[Any], bytes] = field(default=lambda o: msgpack.packb(o, use_bin_type=True))
    data: bytes = b""
    tag: str = ""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = self.encode(self.obj)


def raw_seed(data: bytes, tag: str = "") -> Seed:
    """A seed that is only bytes (no tree to mutate)."""
    return Seed(None, lambda o: b"", bytes(data), tag)


def packed_seed(prefix: bytes, obj: Any, tag: str = "") -> Seed:
    return Seed(obj, lambda o, p=prefix: p + msgpack.packb(o, use_bin_type=True), tag=tag)


class Mutator:
    """Random values, msgpack tree mutations and byte mutations, all drawn from one ``random.Random``."""

    def __init__(self, rng: random.Random, tokens: Sequence[bytes] = (), gadgets: Sequence[bytes] = ()) -> None:
        self.rng = rng
        self.tokens = list(tokens)
        self.gadgets = list(gadgets) or GADGETS[:18]

    # ---------------------------------------------------------------- values
    def scalar(self) -> Any:
        r = self.rng
        k = r.randrange(16)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k in (2, 3, 4):
            return r.choice(INTERESTING_INTS)
        if k == 5:
            return r.randrange(-1000, 1000)
        if k == 6:
            return r.choice([0.0, -0.0, 1.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 2.0 ** 63])
        if k in (7, 8):
            return self.text()
        if k in (9, 10):
            return self.blob()
        if k == 11:
            if r.random() < 0.2:
                return msgpack.Timestamp(r.getrandbits(34), r.randrange(10 ** 9))
            return msgpack.ExtType(r.choice([0, 1, 2, 3, 4, 5, 6, 7, 127, r.randrange(128)]), self.blob(16))
        if k == 12:
            return r.getrandbits(64)
        if k == 13:
            return -r.getrandbits(63)
        if k == 14:
            return self.token_text()
        return r.choice(["", "\x00", "☃", "a" * 70_000, "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")])

    def text(self, limit: int = 24) -> str:
        r = self.rng
        n = r.choice([0, 1, 2, 4, 8, limit])
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789/:._-*\x00\u00e9\u2603 "
        return "".join(r.choice(alphabet) for _ in range(n))

    def token_text(self) -> str:
        if not self.tokens:
            return self.text()
        return self.rng.choice(self.tokens).decode("latin-1")

    def blob(self, limit: int = 64) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 4, 8, 32, r.randrange(limit + 1)])
        return r.randbytes(n)

    def value(self, depth: int = 0) -> Any:
        """A random msgpack-able tree."""
        r = self.rng
        if depth > 4 or r.random() < 0.55:
            return self.scalar()
        if r.random() < 0.6:
            return [self.value(depth + 1) for _ in range(r.choice([0, 1, 2, 3, 5, 9]))]
        out: dict[Any, Any] = {}
        for _ in range(r.choice([0, 1, 2, 4])):
            key = self.scalar() if r.random() < 0.3 else self.token_text()
            try:
                hash(key)
            except TypeError:
                key = self.text()
            out[key] = self.value(depth + 1)
        return out

    # ---------------------------------------------------------------- trees
    def _nodes(self, tree: Any) -> list[tuple[Any, Any]]:
        """(container, key) of every node of ``tree`` (breadth first, at most 300), the root as (None, None)."""
        out: list[tuple[Any, Any]] = [(None, None)]
        queue: collections.deque[Any] = collections.deque([tree])
        while queue and len(out) < 300:
            node = queue.popleft()
            if isinstance(node, list):
                for i, child in enumerate(node):
                    out.append((node, i))
                    queue.append(child)
            elif isinstance(node, dict):
                for key, child in node.items():
                    out.append((node, key))
                    queue.append(child)
        return out

    def mutate_value(self, v: Any) -> Any:
        r = self.rng
        k = r.randrange(12)
        if k == 0:
            return self.scalar()
        if k == 1:
            return self.value(1)
        if k == 2:
            return [v]
        if k == 3:
            return {self.token_text(): v}
        if isinstance(v, bool):
            return r.choice([int(v), not v, None, str(v).lower()])
        if isinstance(v, int):
            return r.choice([v + 1, v - 1, -v, v ^ (1 << r.randrange(64)), r.choice(INTERESTING_INTS),
                             bool(v & 1), float(v), str(v)])
        if isinstance(v, str):
            ops = [v + self.text(4), v[: r.randrange(len(v) + 1)], v * r.choice([2, 100]), v.encode(),
                   self.token_text(), v.upper(), "/".join([v, v])]
            return r.choice(ops)
        if isinstance(v, bytes):
            return r.choice([v[: r.randrange(len(v) + 1)], v + self.blob(8), self.mutate_bytes(v, 1),
                             v.decode("latin-1"), list(v[:8]), b""])
        if isinstance(v, list):
            if v and k < 8:
                i = r.randrange(len(v))
                op = r.randrange(5)
                w = list(v)
                if op == 0:
                    del w[i]
                elif op == 1:
                    w.insert(i, self.value(2))
                elif op == 2:
                    w.append(w[i])
                elif op == 3:
                    j = r.randrange(len(w))
                    w[i], w[j] = w[j], w[i]
                else:
                    w.extend([w[i]] * r.choice([10, 1000]))
                return w
            return r.choice([[], v + [self.scalar()], tuple(v) and list(v)[::-1], {i: x for i, x in enumerate(v)}])
        if isinstance(v, dict):
            w = dict(v)
            op = r.randrange(4)
            if w and op == 0:
                del w[r.choice(list(w))]
            elif w and op == 1:
                key = r.choice(list(w))
                w[self.scalar() if r.random() < 0.5 else self.token_text()] = w.pop(key)
            elif op == 2:
                w[self.token_text()] = self.value(2)
            else:
                return list(w.values())
            return w
        return self.scalar()

    def mutate_tree(self, tree: Any, rounds: int = 0) -> Any:
        """A mutated deep copy of ``tree`` (1-3 node replacements)."""
        tree = copy.deepcopy(tree)
        for _ in range(rounds or self.rng.choice([1, 1, 1, 2, 3])):
            nodes = self._nodes(tree)
            # integers (indices, counts, ids, lengths) carry most of a message's meaning: pick them more often
            weights = [3 if p is not None and type(p[k]) is int else 1 for p, k in nodes]
            parent, key = self.rng.choices(nodes, weights)[0]
            try:
                if parent is None:
                    tree = self.mutate_value(tree)
                elif isinstance(parent, dict):
                    if self.rng.random() < 0.1:
                        del parent[key]
                    else:
                        parent[key] = self.mutate_value(parent[key])
                else:
                    parent[key] = self.mutate_value(parent[key])
            except (TypeError, KeyError, IndexError):
                pass
        return tree

    # ---------------------------------------------------------------- bytes
    def mutate_bytes(self, data: bytes, rounds: int = 0, others: Sequence[bytes] = ()) -> bytes:
        r = self.rng
        b = bytearray(data)
        for _ in range(rounds or r.choice([1, 1, 2, 3, 4])):
            op = r.randrange(13)
            n = len(b)
            pos = r.randrange(n + 1)
            if op == 0 and n:
                i = r.randrange(n)
                b[i] ^= 1 << r.randrange(8)
            elif op == 1 and n:
                b[r.randrange(n)] = r.choice(INTERESTING_BYTES) if r.random() < 0.6 else r.randrange(256)
            elif op == 2:
                b[pos:pos] = r.randbytes(r.choice([1, 2, 4, 16]))
            elif op == 3 and n:
                end = min(n, pos + r.choice([1, 2, 4, 8, 64, n]))
                del b[pos:end]
            elif op == 4 and n:
                end = min(n, pos + r.choice([1, 4, 16, 256]))
                b[pos:pos] = b[pos:end] * r.choice([1, 2, 16])
            elif op == 5 and n:
                del b[r.randrange(n):]
            elif op in (6, 7):
                value = r.choice(INTERESTING_INTS)
                fmt = r.choice(["<B", "<H", "<I", "<Q", ">H", ">I", ">Q", "<b", "<i", "<q"])
                try:
                    packed = struct.pack(fmt, value)
                except struct.error:
                    packed = struct.pack(fmt[0] + fmt[1].upper(), value & ((1 << (8 * struct.calcsize(fmt))) - 1))
                b[pos:pos + len(packed)] = packed
            elif op == 8 and others:
                other = r.choice(others)
                cut = r.randrange(len(other) + 1)
                b[pos:] = other[cut:]
            elif op == 9 and self.tokens:
                tok = r.choice(self.tokens)
                if r.random() < 0.5:
                    b[pos:pos] = tok
                else:
                    b[pos:pos + len(tok)] = tok
            elif op == 10:
                b[pos:pos] = r.choice(self.gadgets)
            elif op == 11 and n:
                b = b * r.choice([2, 3, 10])
            elif op == 12 and n:
                i = r.randrange(n)
                b[i] = (b[i] + r.choice([1, -1, 16, -16])) & 0xFF
        return bytes(b)

    def random_bytes(self) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 2, 3, 4, 5, 8, 9, 13, 16, 32, 64, 256, 1024, 4096, r.randrange(100)])
        if r.random() < 0.2:
            return bytes([r.choice(INTERESTING_BYTES) for _ in range(n)])
        return r.randbytes(n)


class Harness:
    """One fuzz target: ``generate`` an input, ``run`` it (True: accepted, False: rejected without an exception).

    Subclasses set ``name``, ``description``, ``documented`` (exceptions that
    count as a rejection) and the seeds; ``reset`` rebuilds per-target state
    (called first, every ``reset_every`` inputs if that is set, and after a
    crash or a hang).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    documented: ClassVar[tuple[type[BaseException], ...]] = ()
    #: what the docs call the documented outcome
    contract: ClassVar[str] = ""
    reset_every: ClassVar[int] = 0
    weight: ClassVar[float] = 1.0
    tokens: ClassVar[Sequence[bytes]] = ()
    gadgets: ClassVar[Sequence[bytes]] = GADGETS

    def __init__(self) -> None:
        self.seeds: list[Seed] = []
        self.index = -1  # the input being generated and run
        self.mutator = Mutator(random.Random(0), self.tokens,
                               [g for g in self.gadgets if len(g) < 10_000] if self.gadgets is not GADGETS else ())

    # hooks ---------------------------------------------------------------------
    def setup(self) -> None:
        """One-time preparation (seeds); the state itself is built by :meth:`reset`."""

    def reset(self) -> None:
        """(Re)build the state the inputs are fed to."""

    def close(self) -> None:
        """Release what :meth:`setup`/:meth:`reset` opened."""

    def generate(self, rng: random.Random) -> Any:
        self.mutator.rng = rng
        return self.fuzz_bytes(rng)

    def run(self, data: Any) -> bool:
        raise NotImplementedError

    def describe(self, data: Any) -> dict[str, Any]:
        """A JSON-able description of an input for a report (hex of bytes, repr otherwise)."""
        return _describe(data)

    # generation helpers ---------------------------------------------------------
    def fuzz_bytes(self, rng: random.Random, seeds: Sequence[Seed] | None = None) -> bytes:
        seeds = self.seeds if seeds is None else seeds
        m = self.mutator
        m.rng = rng
        x = rng.random()
        if not seeds or x < 0.07:
            return m.random_bytes()
        if x < 0.11:
            if rng.random() < 0.5:
                return rng.choice(self.gadgets)
            try:
                return msgpack.packb(m.value(), use_bin_type=True)
            except (OverflowError, ValueError, TypeError):
                return m.random_bytes()
        seed = rng.choice(seeds)
        if seed.obj is None:
            return m.mutate_bytes(seed.data, others=[s.data for s in seeds[:64]]) if x < 0.95 else seed.data
        if x < 0.3:
            return m.mutate_bytes(seed.data, others=[s.data for s in seeds[:64]])
        if x < 0.95:
            tree = m.mutate_tree(seed.obj)
            try:
                out = seed.encode(tree)
            except Exception:  # the mutated tree does not fit the seed's framing: mutate its bytes instead
                return m.mutate_bytes(seed.data)
            if rng.random() < 0.1:
                out = m.mutate_bytes(out, 1)
            return out
        return seed.data


def _describe(data: Any) -> dict[str, Any]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        b = bytes(data)
        return {"len": len(b), "hex": b.hex()[:MAX_HEX] + ("..." if len(b) * 2 > MAX_HEX else "")}
    try:
        text = repr(data)
    except Exception as exc:  # an input whose repr fails is still an input
        text = f"<unrepresentable: {exc!r}>"
    return {"repr": text[:MAX_HEX] + ("..." if len(text) > MAX_HEX else "")}


class _FixedSecrets:
    """Stands in for ``secrets`` in the handshake and client modules while fuzzing: fixed nonces, so a
    generator can build valid MACs and every run of an input is the same."""

    NONCE = bytes(range(0x40, 0x60))

    def token_bytes(self, n: int | None = None) -> bytes:
        n = 32 if n is None else n
        return (self.NONCE * (n // 32 + 1))[:n]

    def randbits(self, k: int) -> int:
        return 0x5EED & ((1 << k) - 1) or 1


_PATCHED = False


def patch_for_fuzzing() -> None:
    """Fixed nonces in the handshake, external-client and state-transfer modules (this process only)."""
    global _PATCHED
    if _PATCHED:
        return
    from .. import external_client, external_server, handshake, state_transfer

    for module in (handshake, external_client, external_server, state_transfer):
        module.secrets = _FixedSecrets()  # type: ignore[attr-defined]
    _PATCHED = True


TARGETS: dict[str, type[Harness]] = {}


def default_targets() -> list[str]:
    """Every target but the driver's self-tests."""
    return [n for n, cls in TARGETS.items() if not getattr(cls, "selftest", False)]


def target(cls: type[Harness]) -> type[Harness]:
    TARGETS[cls.name] = cls
    return cls


# ============================================================================ shared fixtures

M32, M64 = (1 << 32) - 1, (1 << 64) - 1
KEY = b"fuzz-cluster-key-0123456789abcdef"


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random points (a peer's bytes arrive in arbitrary pieces)."""
    if len(data) < 2 or rng.random() < 0.5:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.choice([1, 2, 5]))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return a, b


def _feed(sock: socket.socket, data: bytes) -> threading.Thread | None:
    """Write ``data`` into the peer end and end the stream (the reader then sees EOF).

    What does not fit in the socket buffer is written by a thread (returned: join it after closing the
    reader's end), so a large input never blocks the harness.
    """
    sock.settimeout(10.0)
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:sent + (1 << 16)])
    except BlockingIOError:
        def rest() -> None:
            try:
                sock.setblocking(True)
                sock.settimeout(10.0)
                sock.sendall(data[sent:])
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=rest, daemon=True)
        t.start()
        return t
    sock.setblocking(True)
    sock.shutdown(socket.SHUT_WR)
    return None


def _close_fed(a: socket.socket, b: socket.socket, feeder: threading.Thread | None) -> None:
    a.close()  # the feeder's writes then fail, and it ends
    if feeder is not None:
        feeder.join(10)
    b.close()


def _drain(sock: socket.socket) -> bytes:
    out = bytearray()
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            out += chunk
    except (BlockingIOError, OSError):
        pass
    return bytes(out)


def _conf(workdir: Path, **overrides: Any) -> Any:
    from ..conf import Conf

    return Conf.load(environ={}, overrides={"PERS/storage": "mem", "PERS/reset": True,
                                            "PERS/file_path": str(workdir / "plog"),
                                            "LOGGER/default_log_level": "error", **overrides})


def _key_file(workdir: Path) -> Path:
    path = workdir / "cluster.key"
    if not path.exists():
        path.write_bytes(KEY)
    return path


def _workdir() -> Path:
    d = Path(tempfile.gettempdir()) / f"derecho-fuzz-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


@dataclass
class SimWorld:
    """A 3-member group run in the simulator, with every message it sent (the real encoders' output).

    ``nodes`` are the NodeProtocols at time ``now`` (templates: deep-copy before use), in the middle of
    the traffic. ``future[node]`` is everything that node was given after that moment, in order, with
    the time: messages in flight, traffic, ticks, the crash of node 1 (a view change with its ragged
    trim), node 3 joining. Replaying it from a template reproduces the run; fuzz inputs interleave it
    with garbage.
    """

    kind: str
    nodes: dict[int, Any]
    member_msgs: list[tuple[int, int, bytes]]  # (src, dst, data) on the transport
    gms_msgs: list[tuple[int, int, bytes]]     # (src, dst, data) on the GMS channel
    now: float
    views: list[Any]
    future: dict[int, list[tuple[float, Any]]]


_SIM_CACHE: dict[str, SimWorld] = {}


def clone(obj: Any) -> Any:
    """A deep copy in which memoryviews (RDMC blocks held without a copy) become bytes."""
    dispatch = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    had = memoryview in dispatch
    dispatch[memoryview] = lambda x, memo: bytes(x)
    try:
        return copy.deepcopy(obj)
    finally:
        if not had:
            del dispatch[memoryview]


def sim_world(kind: str = "ordered") -> SimWorld:
    """``ordered`` (small messages), ``rdmc`` (large ones, in RDMC blocks) or ``raw`` (unordered)."""
    if kind in _SIM_CACHE:
        return _SIM_CACHE[kind]
    from ..sim.cluster import Cluster, SimParams

    params = {"ordered": SimParams(traffic="ordered", message_size=64),
              "rdmc": SimParams(traffic="ordered", message_size=700, max_smc_payload_size=512, block_size=256),
              "raw": SimParams(traffic="raw", message_size=64)}[kind]
    cluster = Cluster(7, params)
    member_msgs: list[tuple[int, int, bytes]] = []
    gms: list[tuple[int, int, bytes]] = []
    future: dict[int, list[tuple[float, Any]]] = collections.defaultdict(list)
    recording = [False]
    transmit, deliver = cluster._transmit, cluster._deliver

    def capture(src: Any, channel: Any, dst: int, data: Any, member: bool) -> None:
        (member_msgs if member else gms).append((src.node_id, dst, bytes(data)))
        transmit(src, channel, dst, data, member)

    def record(node: Any, event: Any) -> None:
        if recording[0] and node.alive and node.stop is None:
            future[node.node_id].append((cluster.now, event))
        deliver(node, event)

    cluster._transmit = capture  # type: ignore[method-assign]
    cluster._deliver = record  # type: ignore[method-assign]
    cluster.start_leader(0)
    cluster.run_until(5)
    cluster.start_joiner(1, 0)
    cluster.start_joiner(2, 0)
    cluster.run_until(300)
    views = [n.proto.view for n in cluster.nodes.values()]
    assert all(v is not None and sorted(v.members) == [0, 1, 2] for v in views), views
    templates = {nid: clone(n.node) for nid, n in cluster.nodes.items()}
    now = cluster.now
    recording[0] = True
    cluster.run_until(now + 150)
    cluster.crash(1)
    cluster.run_until(now + 900)
    cluster.start_joiner(3, 0)
    cluster.run_until(now + 2500)
    recording[0] = False
    world = SimWorld(kind, templates, member_msgs, gms, now,
                     [v for n in cluster.nodes.values() for v in n.views], dict(future))
    _SIM_CACHE[kind] = world
    return world


def _member_seed(data: bytes) -> Seed:
    """A transport message as a seed whose msgpack tree is mutable (channel byte kept, blocks re-framed)."""
    from ..protocol.multicast import _HEADER_LEN

    channel, body = data[:1], data[1:]
    if channel == b"K":
        (n,) = _HEADER_LEN.unpack(body[:4])
        header = msgpack.unpackb(body[4:4 + n], raw=False)
        payload = body[4 + n:]

        def enc(o: Any) -> bytes:
            h = msgpack.packb(o[0], use_bin_type=True)
            p = o[1] if isinstance(o[1], bytes) else msgpack.packb(o[1], use_bin_type=True)
            return b"K" + _HEADER_LEN.pack(len(h) & M32) + h + p

        return Seed([header, payload], enc, tag="K")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return raw_seed(data, channel.decode("latin-1"))
    return packed_seed(channel, obj, channel.decode("latin-1"))


def _sample(items: Sequence[Any], n: int, rng: random.Random | None = None) -> list[Any]:
    rng = rng or random.Random(1)
    items = list(items)
    return items if len(items) <= n else rng.sample(items, n)


MEMBERSHIP_TOKENS = [b"sst", b"hb", b"join", b"jrep", b"welcome", b"suspected", b"changes", b"num_changes",
                     b"num_acked", b"num_committed", b"num_installed", b"wedged", b"rip", b"OK", b"ID_IN_USE",
                     b"LEADER_REDIRECT", b"WRONG_GROUP", b"127.0.0.1", b"group", b"view", b"persisted", b"0/0"]
MULTICAST_TOKENS = [b"d", b"s", b"t", b"e", b"M", b"C", b"K", b"G", b"Q", b"R", b"B"]


# ============================================================================ transport: handshake, sockets, GMS


def _handshake_pair(key: bytes | None) -> dict[str, bytes]:
    """A real initiator/acceptor exchange (fixed nonces): HELLO, WELCOME, CONFIRM, REFUSE bytes."""
    from .. import handshake as hs

    init = hs.Handshake("initiator", 9, 0x1111, key=key, expected_peer=5, address=("127.0.0.1", 4000))
    acc = hs.Handshake("acceptor", 5, 0x2222, key=key, address=("127.0.0.1", 5000), extra=b"endpoint")
    hello = init.start()
    welcome = acc.receive(hello)
    confirm = init.receive(welcome)
    acc.receive(confirm)
    assert init.done and acc.done
    return {"hello": hello, "welcome": welcome, "confirm": confirm,
            "refuse": hs.encode_refuse(hs.REFUSE_DUPLICATE, 5, "already connected")}


def _hello_fields_seed(kind: int, key: bool, mac: bytes = b"") -> Seed:
    """A HELLO/WELCOME as a field list: the tree mutator then changes one field and the record stays framed."""
    from .. import handshake as hs

    fields = [kind, hs.PROTOCOL_VERSION, 9, 0x1111, 1 if key else 0, _FixedSecrets.NONCE, 4000, "127.0.0.1",
              b"endpoint", mac]

    def enc(o: Any) -> bytes:
        kind, version, node, inc, flags, nonce, port, host, extra, mac = o
        hb = host.encode() if isinstance(host, str) else bytes(host)
        body = (struct.pack("<IQH32sHB", node & M32, inc & M64, flags & 0xFFFF, bytes(nonce)[:32], port & 0xFFFF,
                            len(hb) & 0xFF) + hb + struct.pack("<H", len(extra) & 0xFFFF) + bytes(extra) + bytes(mac))
        return hs.RECORD_HEADER.pack(hs.MAGIC, kind & 0xFF, version & 0xFFFF, len(body) & M32) + body

    return Seed(fields, enc, tag="fields")


HANDSHAKE_TOKENS = [b"DERECHO\x00", b"DERECHO", b"\x01\x01\x00", b"\x04", b"\xff\xff\x00\x00"]


@target
class HandshakeRecord(Harness):
    name = "handshake.record"
    description = "handshake records: decode_record, then parse_hello / parse_refuse, over a byte stream"
    contract = "HandshakeError"
    tokens = HANDSHAKE_TOKENS

    def setup(self) -> None:
        from .. import handshake as hs
        from ..transport import HandshakeError

        type(self).documented = (HandshakeError,)
        self.hs = hs
        for key in (None, KEY):
            pair = _handshake_pair(key)
            self.seeds += [raw_seed(v, k) for k, v in pair.items()]
            self.seeds.append(raw_seed(pair["hello"] + pair["confirm"] + b"\x05\x00\x00\x00\x00hello"))
        self.seeds += [_hello_fields_seed(hs.KIND_HELLO, False), _hello_fields_seed(hs.KIND_WELCOME, True, bytes(32))]

    def run(self, data: bytes) -> bool:
        hs = self.hs
        buf = memoryview(data)
        while True:
            got = hs.decode_record(buf)
            if got is None:
                return True
            rec, used = got
            if rec.kind in (hs.KIND_HELLO, hs.KIND_WELCOME):
                hs.parse_hello(rec)
            elif rec.kind == hs.KIND_REFUSE:
                hs.parse_refuse(rec)
            buf = buf[used:]


class _HandshakeSide(Harness):
    role = "acceptor"
    tokens = HANDSHAKE_TOKENS
    contract = "HandshakeError (or a subclass: VersionMismatchError, AuthenticationError, SelfConnectionError...)"

    def setup(self) -> None:
        from .. import handshake as hs
        from ..transport import HandshakeError

        type(self).documented = (HandshakeError,)
        self.hs = hs
        self.by_key: dict[bool, list[Seed]] = {}
        for keyed in (False, True):
            pair = _handshake_pair(KEY if keyed else None)
            if self.role == "acceptor":
                seeds = [raw_seed(pair["hello"]), raw_seed(pair["hello"] + pair["confirm"]),
                         raw_seed(pair["hello"] + pair["confirm"] + struct.pack("<IB", 3, 0) + b"abc"),
                         _hello_fields_seed(hs.KIND_HELLO, keyed)]
            else:
                seeds = [raw_seed(pair["welcome"]), raw_seed(pair["refuse"]), raw_seed(pair["hello"]),
                         raw_seed(pair["welcome"] + b"\x00\x00\x00\x00\x00"),
                         _hello_fields_seed(hs.KIND_WELCOME, keyed, pair["welcome"][-32:])]
            self.by_key[keyed] = seeds
            self.seeds += seeds

    def generate(self, rng: random.Random) -> Any:
        keyed = rng.random() < 0.5
        data = self.fuzz_bytes(rng, self.by_key[keyed])
        return keyed, [c for c in _chunks(rng, data)], rng.random() < 0.1

    def describe(self, data: Any) -> dict[str, Any]:
        keyed, chunks, refuse = data
        return {"cluster_key": keyed, "refuse_in_accept": refuse, "chunks": [len(c) for c in chunks],
                **_describe(b"".join(chunks))}

    def run(self, data: Any) -> bool:
        keyed, chunks, refuse = data
        hs = self.hs
        key = KEY if keyed else None
        if self.role == "acceptor":
            verdict = (hs.REFUSE_DUPLICATE, "fuzz: refused") if refuse else None
            h = hs.Handshake("acceptor", 5, 0x2222, key=key, address=("127.0.0.1", 5000),
                             accept=lambda hello: verdict)
        else:
            h = hs.Handshake("initiator", 9, 0x1111, key=key, expected_peer=5, address=("127.0.0.1", 4000))
        h.start()
        for chunk in chunks:
            out = h.receive(chunk)
            assert isinstance(out, bytes)
        return h.done


@target
class HandshakeAcceptor(_HandshakeSide):
    name = "handshake.acceptor"
    description = "Handshake state machine, acceptor side (HELLO, then CONFIRM), with and without a cluster key"
    role = "acceptor"


@target
class HandshakeInitiator(_HandshakeSide):
    name = "handshake.initiator"
    description = "Handshake state machine, initiator side (WELCOME or REFUSE), with and without a cluster key"
    role = "initiator"


@target
class SocketsTransportTarget(Harness):
    name = "sockets.connection"
    description = ("sockets transport, accepting side: the real handshake, then frame parsing (_io/_read/_parse) "
                   "of a connection that sends a HELLO, CONFIRM and garbage frames")
    contract = "the connection is closed (handshake failure, FrameError, truncated frame); nothing escapes _io"
    weight = 1.5

    def setup(self) -> None:
        from derecho_transport_sockets import transport as st

        from .. import handshake as hs

        self.st = st
        self.hs = hs
        wd = _workdir()
        self.transports = {}
        for keyed in (False, True):
            conf = _conf(wd, **({"DERECHO/cluster_key_file": str(_key_file(wd))} if keyed else {}))
            t = st.SocketsTransport(conf, 5, ("127.0.0.1", 0), max_message_size=4 << 20)
            t.incarnation = 0x2222
            self._wrap(t)
            self.transports[keyed] = t
        self.pairs = {keyed: _handshake_pair(KEY if keyed else None) for keyed in (False, True)}
        world = sim_world("ordered")
        self.payloads = [_member_seed(d) for _, _, d in _sample(world.member_msgs, 60)]
        self.payloads += [raw_seed(b"Q" + msgpack.packb([0, 1, 2, b"M\x90"])), raw_seed(b"R\x90")]
        self.seeds = list(self.payloads)

    def _wrap(self, t: Any) -> None:
        t.fuzz_reasons = []
        fail, hs_failed = t._fail, t._handshake_failed

        def _fail(conn: Any, why: str, clean: bool = False) -> None:
            t.fuzz_reasons.append(why)
            fail(conn, why, clean)

        def _handshake_failed(conn: Any, exc: Exception, log_level: int | None = None) -> None:
            t.fuzz_reasons.append(f"handshake: {exc}")
            hs_failed(conn, exc, log_level)

        t._fail, t._handshake_failed = _fail, _handshake_failed

    def close(self) -> None:
        for t in self.transports.values():
            t.close()

    def reset(self) -> None:
        """Forget the connections an interrupted input left behind."""
        for t in self.transports.values():
            for conn in list(t._conns.values()):
                t._drop(conn)
            t._peers.clear()
            t._accepting.clear()
            t._take_events()

    def generate(self, rng: random.Random) -> Any:
        st = self.st
        m = self.mutator
        m.rng = rng
        keyed = rng.random() < 0.5
        pair = self.pairs[keyed]
        frames = bytearray()
        for _ in range(rng.choice([0, 1, 1, 2, 3, 8])):
            x = rng.random()
            payload = self.fuzz_bytes(rng, self.payloads)
            if x < 0.75:
                frames += st.FRAME.pack(len(payload), st.K_DATA) + payload
            elif x < 0.85:
                frames += st.FRAME.pack(rng.choice(INTERESTING_INTS) & M32, rng.choice([0, 0, 1, 2, 255])) + payload
            elif x < 0.9:
                frames += st.FRAME.pack(0, st.K_BYE)
            else:
                frames += st.FRAME.pack(len(payload) + rng.choice([-2, -1, 1, 7]) & M32, st.K_DATA) + payload
        head = pair["hello"] + pair["confirm"]
        x = rng.random()
        if x < 0.15:
            stream = m.mutate_bytes(head + bytes(frames), others=[pair["welcome"]])
        elif x < 0.25:
            stream = m.mutate_bytes(head) + bytes(frames)
        else:
            stream = head + bytes(frames)
        return keyed, _chunks(rng, stream)

    def describe(self, data: Any) -> dict[str, Any]:
        keyed, chunks = data
        return {"cluster_key": keyed, "chunks": [len(c) for c in chunks], **_describe(b"".join(chunks))}

    def run(self, data: Any) -> bool:
        keyed, chunks = data
        st, hs = self.st, self.hs
        t = self.transports[keyed]
        t.fuzz_reasons = []
        a, b = _socketpair()
        a.setblocking(False)
        try:
            conn = st._Conn(a, False, None, None)
            conn.deadline = time.monotonic() + 30
            conn.hs = hs.Handshake("acceptor", t.node_id, t.incarnation, key=t.key, address=t._address,
                                   accept=lambda h, c=conn: t._accept_hello(c, h))
            t._conns[conn.fd] = conn
            t._set_mask(conn, st._R)
            b.setblocking(False)
            for chunk in chunks:
                view = memoryview(chunk)
                while view and conn.state != "closed":  # the peer writes what the socket takes, the transport reads
                    try:
                        view = view[b.send(view):]
                    except BlockingIOError:
                        pass
                    except OSError:  # the transport already closed the connection
                        break
                    t._io(conn, st._R, True)
                    _drain(b)
                if conn.state == "closed":
                    break
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)
            for _ in range(10_000):
                if conn.state == "closed":
                    break
                t._io(conn, st._R, True)
            else:
                raise AssertionError(f"connection still {conn.state} after its peer closed")
            events = t._take_events()
            for ev in events:
                assert type(ev).__name__ in ("PeerConnected", "PeerFailed", "MessageReceived"), ev
                if type(ev).__name__ == "MessageReceived":
                    assert len(ev.data) <= t.max_message_size
            assert not t._peers and not t._accepting, (t._peers, t._accepting)
        finally:
            b.close()
            a.close()
        return any("closed by peer" in r for r in t.fuzz_reasons) and \
            not any(r.startswith(("protocol error", "handshake")) for r in t.fuzz_reasons)


@target
class GmsFrame(Harness):
    name = "gms.frame"
    description = "GMS channel (gms_port): one length-prefixed frame per connection, HMAC-checked with a key"
    contract = "the frame is dropped and the connection closed; nothing escapes _read_one"

    def setup(self) -> None:
        from .. import gms_channel as gc

        self.gc = gc
        world = sim_world("ordered")
        self.servers = {}
        for keyed in (False, True):
            srv = gc.GmsChannel.detached(KEY if keyed else None)
            srv.received = []
            srv.on_message = srv.received.append
            # stamps are fixed (inputs are a function of the seed), so the clock check is off here; the
            # stamp bytes themselves are still mutated and parsed
            srv.replay_window_s = float("inf")
            self.servers[keyed] = srv
        bodies = [d for _, _, d in world.gms_msgs] + [m for m in (_join_message(3),)]
        self.by_key = {keyed: [Seed(msgpack.unpackb(d, raw=False),
                                    lambda o, s=self.servers[keyed]: s._frame(msgpack.packb(o, use_bin_type=True),
                                                                              now_ns=0, nonce=b"fuzzfuzz"))
                               for d in bodies] for keyed in (False, True)}
        self.seeds = self.by_key[False] + self.by_key[True]

    def generate(self, rng: random.Random) -> Any:
        keyed = rng.random() < 0.5
        return keyed, self.fuzz_bytes(rng, self.by_key[keyed])

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        keyed, stream = data
        srv = self.servers[keyed]
        srv.received.clear()
        srv._seen.clear()  # every input on its own: a repeated stamp is judged within one input only
        a, b = _socketpair()
        feeder = None
        try:
            feeder = _feed(b, stream)
            srv._read_one(a, ("fuzz", 0))
        finally:
            _close_fed(a, b, feeder)
        return bool(srv.received)


def _join_message(node: int, nonce: int = 77, info: Any = None) -> bytes:
    from ..protocol import wire

    return wire.encode(wire.JOIN, node, ["127.0.0.1", 1, 2, 3, 4, 5], nonce, info)


# ============================================================================ membership

@target
class MembershipWire(Harness):
    name = "membership.wire"
    description = "protocol.wire.decode: [kind, ...] membership messages (member channel and GMS channel)"
    contract = "WireError"
    tokens = MEMBERSHIP_TOKENS

    def setup(self) -> None:
        from ..protocol import wire

        type(self).documented = (wire.WireError,)
        self.wire = wire
        world = sim_world("ordered")
        msgs = [d[1:] for _, _, d in world.member_msgs if d[:1] == b"M"] + [d for _, _, d in world.gms_msgs]
        self.seeds = [Seed(msgpack.unpackb(d, raw=False, strict_map_key=False)) for d in _sample(msgs, 80)]
        self.seeds.append(Seed(msgpack.unpackb(_join_message(4), raw=False)))

    def run(self, data: bytes) -> bool:
        self.wire.decode(data)
        return True


@target
class MembershipRow(Harness):
    name = "membership.row"
    description = "Row.apply (an SST row update) and Change.decode (a proposed change), on decoded msgpack"
    contract = "WireError (the row is left untouched)"
    tokens = MEMBERSHIP_TOKENS

    def setup(self) -> None:
        from ..protocol import membership, wire

        type(self).documented = (wire.WireError,)
        self.mb, self.wire = membership, wire
        world = sim_world("ordered")
        rows = []
        for _, _, d in world.member_msgs:
            if d[:1] == b"M":
                msg = msgpack.unpackb(d[1:], raw=False, strict_map_key=False)
                if msg[0] == wire.SST:
                    rows.append(msg[2])
        self.seeds = [Seed(r) for r in _sample(rows, 40)]
        self.seeds += [Seed(c.encode()) for r in rows for c in membership.Row([False] * 3).changes] or []
        self.seeds.append(Seed(membership.Change(0, 3, True, membership.IpAndPorts("127.0.0.1", 1, 2, 3, 4, 5),
                                                 9).encode()))
        self.seeds.append(Seed(membership.Row([False, True, False]).encode(membership.ROW_FIELDS)))

    def run(self, data: bytes) -> bool:
        value = self.wire.decode_any(data)
        row = self.mb.Row([False] * 3)
        before = copy.deepcopy(row)
        try:
            row.apply(value, 3)
        except self.wire.WireError:
            assert row == before, "a rejected update changed the row"
            raise
        if isinstance(value, list):
            self.mb.Change.decode(value)
        return True


@target
class MembershipRestartInfo(Harness):
    name = "membership.restart_info"
    description = "RestartInfo.decode: what a restarting node sends in its JOIN (group id, last view, versions)"
    contract = "WireError"
    tokens = MEMBERSHIP_TOKENS

    def setup(self) -> None:
        from ..protocol import restart, wire

        type(self).documented = (wire.WireError,)
        self.restart = restart
        self.wire = wire
        world = sim_world("ordered")
        for v in world.views[-3:]:
            info = restart.RestartInfo("group-1", v, {"0/0": 12, "1/0": -1})
            self.seeds.append(Seed(info.encode()))

    def run(self, data: bytes) -> bool:
        self.restart.RestartInfo.decode(self.wire.decode_any(data), ["sim"])
        return True


@target
class ViewFromBytes(Harness):
    name = "view.from_bytes"
    description = "View.from_bytes: a serialized view (in WELCOMEs, restart info, external clients, saved views)"
    contract = "ValueError"
    documented = (ValueError,)
    tokens = [b"DEFAULT", b"sim", b"127.0.0.1"]

    def setup(self) -> None:
        from ..view import View

        self.View = View
        world = sim_world("ordered")
        raw = sim_world("raw")
        for v in world.views[-3:] + raw.views[-1:]:
            self.seeds.append(Seed(msgpack.unpackb(v.to_bytes(), raw=False)))
        self.seeds.append(Seed(msgpack.unpackb(View(3, [4, 1, 9], [False, True, False], 2).to_bytes(), raw=False)))

    def generate(self, rng: random.Random) -> Any:
        return rng.choice([None, 0, 1, 7]), rng.random() < 0.5, self.fuzz_bytes(rng)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"my_id": data[0], "type_order": data[1], **_describe(data[2])}

    def run(self, data: Any) -> bool:
        my_id, typed, raw = data
        view = self.View.from_bytes(raw, my_id=my_id, subgroup_type_order=["sim"] if typed else ())
        view.to_bytes()
        repr(view)
        return True


class _MembershipHarness(Harness):
    """A Membership fed GMS and member messages; it never raises, bad messages become WARNING Log actions."""

    contract = "never raises: a bad message is dropped with a WARNING Log action"
    tokens = MEMBERSHIP_TOKENS
    reset_every = 200

    def _dropped(self, actions: list[Any]) -> bool:
        return any(type(a).__name__ == "Log" and a.level >= logging.WARNING and "dropped" in a.message
                   for a in actions)


@target
class MembershipJoiner(_MembershipHarness):
    name = "membership.joiner"
    description = ("Membership of a node that asked to join (no view yet): JOIN_REPLY and WELCOME on the GMS "
                   "channel and the member channel (the welcome's view, leader row and group id)")

    def setup(self) -> None:
        from ..protocol import events, membership

        self.ev, self.mb = events, membership
        world = sim_world("ordered")
        self.seeds = [Seed(msgpack.unpackb(d, raw=False)) for _, dst, d in world.gms_msgs if dst == 2]
        self.seeds.append(Seed(msgpack.unpackb(msgpack.packb(["jrep", "LEADER_REDIRECT", 0, ["127.0.0.1", 1], ""]),
                                               raw=False)))
        self.seeds.append(Seed(["jrep", "ID_IN_USE", 0, None, "id in use"]))
        assert any(s.obj[0] == "welcome" for s in self.seeds), "the simulator sent no WELCOME to node 2"

    def reset(self) -> None:
        from ..view import IpAndPorts

        self.m = self.mb.Membership(2, IpAndPorts("127.0.0.1", 11, 12, 13, 14, 15), subgroup_type_order=["sim"],
                                    nonce=5)
        self.m.start_join(("127.0.0.1", 1), 0.0)
        self.now = 1.0

    def generate(self, rng: random.Random) -> Any:
        return rng.random() < 0.8, self.fuzz_bytes(rng)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"gms_channel": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        on_gms, raw = data
        if self.m.view is not None or self.m.stopped is not None:
            self.reset()
        self.now += 0.01
        event = self.ev.ReceivedAtAddress(raw) if on_gms else self.ev.Received(0, raw)
        return not self._dropped(self.m.handle(event, self.now))


# ============================================================================ node (membership + multicast)

class _NodeHarness(Harness):
    """A NodeProtocol in an installed 3-member view (a simulator template), fed garbage and the real future.

    An input is a list of steps: ``valid k`` replays the next k events the node got in the simulator
    (traffic, the crash of node 1 and its view change with the ragged trim, node 3 joining), and the
    other steps are garbage: Received events from members (mostly mutations of the messages due next)
    on every channel, GMS messages, ticks, a member reported unreachable.
    """

    node_id = 0
    contract = "never raises (handle_many): bad messages are dropped with WARNING Log actions"
    tokens = MEMBERSHIP_TOKENS + MULTICAST_TOKENS
    reset_every = 250
    weight = 2.0
    kinds = ("ordered", "rdmc", "raw")

    def setup(self) -> None:
        from ..protocol import events
        from ..protocol.progress import LocalProgress

        self.ev = events
        self.worlds = [sim_world(k) for k in self.kinds]
        self.upcoming: list[list[tuple[int, int, Seed]]] = []  # per world: (future index, sender, seed)
        self.by_sender: dict[int, list[Seed]] = collections.defaultdict(list)
        rng = random.Random(3)
        for w in self.worlds:
            mine = []
            for i, (_, event) in enumerate(w.future.get(self.node_id, [])):
                if type(event).__name__ == "Received":
                    mine.append((i, event.node_id, _member_seed(bytes(event.data))))
            self.upcoming.append(mine)
            for _, sender, seed in _sample(mine, 300, rng):
                self.by_sender[sender].append(seed)
            # progress reports (channel G) are not in the simulator: the real encoder makes them
            for sender in (0, 1, 2):
                tracker = clone(w.nodes[sender].progress)
                for p in (3, 9, 1 << 40):
                    for _, data in tracker.local(LocalProgress(0, p, p * 10))[0]:
                        self.by_sender[sender].append(packed_seed(b"G", msgpack.unpackb(data, raw=False)))
        self.gms = [Seed(msgpack.unpackb(d, raw=False)) for w in self.worlds for _, _, d in w.gms_msgs]
        self.gms.append(Seed(msgpack.unpackb(_join_message(7, 99), raw=False)))
        self.seeds = [s for v in self.by_sender.values() for s in v]
        self.resets = 0

    def reset(self) -> None:
        self.world_index = self.resets % len(self.worlds)
        self.resets += 1
        world = self.worlds[self.world_index]
        self.node = clone(world.nodes[self.node_id])
        self.future = world.future.get(self.node_id, [])
        self.cursor = 0
        self.now = world.now

    def generate(self, rng: random.Random) -> Any:
        others = [m for m in (0, 1, 2, 3) if m != self.node_id]
        upcoming = [u for u in self.upcoming[self.world_index] if self.cursor <= u[0] < self.cursor + 150]
        steps: list[tuple[Any, ...]] = []
        for _ in range(rng.choice([1, 1, 2, 3, 6])):
            x = rng.random()
            if x < 0.3:
                steps.append(("valid", rng.choice([1, 1, 2, 5, 20])))
            elif x < 0.85:
                if upcoming and rng.random() < 0.7:
                    _, sender, seed = rng.choice(upcoming)
                    seeds = [seed]
                else:
                    sender = rng.choice(others)
                    seeds = self.by_sender.get(sender) or self.seeds
                if rng.random() < 0.08:
                    sender = rng.choice([7, self.node_id, 1 << 31, *others])
                steps.append(("recv", sender, self.fuzz_bytes(rng, seeds)))
            elif x < 0.93:
                steps.append(("gms", self.fuzz_bytes(rng, self.gms)))
            elif x < 0.98:
                steps.append(("tick",))
            else:
                steps.append(("unreachable", rng.choice(others)))
        return steps

    def describe(self, data: Any) -> dict[str, Any]:
        out = []
        for e in data:
            if e[0] == "recv":
                out.append({"event": "recv", "from": e[1], **_describe(e[2])})
            elif e[0] == "gms":
                out.append({"event": "gms", **_describe(e[1])})
            else:
                out.append({"event": e[0], "args": list(e[1:])})
        return {"node": self.node_id, "steps": out}

    def _handle(self, events: list[Any], now: float) -> bool:
        actions = self.node.handle_many(events, now)
        assert isinstance(actions, list)
        dropped = False
        for a in actions:
            name = type(a).__name__
            assert name in ("Send", "SendToAddress", "Connect", "Disconnect", "WedgeView", "InstallView", "Stop",
                            "Log", "Deliver", "SendRejected", "ShardProgress"), a
            if name == "Log":
                a.message % a.args  # noqa: B018  (a Log whose arguments do not format is a bug too)
                dropped = dropped or (a.level >= logging.WARNING and "dropped" in a.message)
        return dropped

    def run(self, data: Any) -> bool:
        ev = self.ev
        dropped = False
        batch: list[Any] = []
        for step in data:
            if step[0] == "valid":
                if batch:
                    dropped |= self._handle(batch, self.now)
                    batch = []
                for t, event in self.future[self.cursor:self.cursor + step[1]]:
                    self.now = max(self.now, t)
                    self._handle([event], self.now)
                self.cursor = min(len(self.future), self.cursor + step[1])
            elif step[0] == "recv":
                batch.append(ev.Received(step[1], step[2]))
            elif step[0] == "gms":
                batch.append(ev.ReceivedAtAddress(step[1]))
            elif step[0] == "tick":
                batch.append(ev.Tick())
            else:
                batch.append(ev.PeerUnreachable(step[1], "fuzz"))
        if batch:
            dropped |= self._handle(batch, self.now)
        return not dropped


@target
class NodeFollower(_NodeHarness):
    name = "node.follower"
    description = ("NodeProtocol.handle_many of node 2 (not the leader) in an installed view: garbage Received "
                   "events on every channel (M, C, K, G, unknown) from members, GMS messages, ticks")
    node_id = 2


@target
class NodeLeader(_NodeHarness):
    name = "node.leader"
    description = "NodeProtocol.handle_many of node 0, the leader (joins, proposals, commits), same inputs"
    node_id = 0


@target
class MulticastBlock(Harness):
    name = "multicast.block"
    description = "decode_block: an RDMC block frame (u32 header length, msgpack header, raw block bytes)"
    contract = "WireError"
    tokens = MULTICAST_TOKENS

    def setup(self) -> None:
        from ..protocol import multicast, wire

        type(self).documented = (wire.WireError,)
        self.mc = multicast
        world = sim_world("rdmc")
        blocks = [d for _, _, d in world.member_msgs if d[:1] == b"K"]
        assert blocks, "the simulator sent no RDMC block"
        for d in _sample(blocks, 40):
            s = _member_seed(d)
            self.seeds.append(Seed(s.obj, lambda o, e=s.encode: e(o)[1:]))

    def run(self, data: bytes) -> bool:
        header, payload = self.mc.decode_block(data)
        assert isinstance(header, list) and len(header) == 9
        return True


@target
class MulticastView(Harness):
    name = "multicast.view"
    description = ("ViewMulticast.on_message / on_block of an installed view (DATA, STATUS, TRIM, ECHO, blocks), "
                   "then a delivery step, as NodeProtocol runs them")
    contract = "WireError"
    tokens = MULTICAST_TOKENS
    reset_every = 300
    kinds = ("ordered", "rdmc", "raw")

    def setup(self) -> None:
        from ..protocol import multicast, wire

        type(self).documented = (wire.WireError,)
        self.mcmod, self.wire = multicast, wire
        self.worlds = [sim_world(k) for k in self.kinds]
        rng = random.Random(4)
        for w in self.worlds:
            msgs = [d for _, dst, d in w.member_msgs if dst == 2 and d[:1] in (b"C", b"K")]
            for d in _sample(msgs, 100, rng):
                s = _member_seed(d)
                self.seeds.append(Seed(s.obj, lambda o, e=s.encode: e(o)))
        self.resets = 0

    def reset(self) -> None:
        w = self.worlds[self.resets % len(self.worlds)]
        self.resets += 1
        self.mc = clone(w.nodes[2].multicast)

    def generate(self, rng: random.Random) -> Any:
        return rng.choice([0, 1, 1, 1, 7]), self.fuzz_bytes(rng)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"from": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        sender, raw = data
        mc = self.mc
        if raw[:1] == b"K":
            header, payload = self.mcmod.decode_block(raw[1:])
            self.wire.check_int(header[0], "vid")
            mc.on_block(sender, header, payload)
        else:
            mc.on_message(sender, raw[1:])
        mc.step()
        mc.flush()
        mc.take_deliveries()
        return True


@target
class ProgressReport(Harness):
    name = "progress.report"
    description = "ProgressTracker.on_message: a shard member's persisted version and stability frontier"
    contract = "WireError"
    reset_every = 500

    def setup(self) -> None:
        from ..protocol import wire
        from ..protocol.progress import LocalProgress

        type(self).documented = (wire.WireError,)
        self.world = sim_world("ordered")
        for p in (0, 5, 1 << 33):
            tracker = clone(self.world.nodes[1].progress)
            for _, data in tracker.local(LocalProgress(0, p, p + 1))[0]:
                self.seeds.append(Seed(msgpack.unpackb(data, raw=False)))

    def reset(self) -> None:
        self.tracker = clone(self.world.nodes[2].progress)

    def generate(self, rng: random.Random) -> Any:
        return rng.choice([0, 1, 1, 7]), self.fuzz_bytes(rng)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"from": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        out = self.tracker.on_message(data[0], data[1])
        assert isinstance(out, list)
        return True


# ============================================================================ RPC

RPC_TOKENS = [b"M", b"P", b"D", b"derecho_core.view:Mode", b"derecho_core.state_transfer:PersistentFieldRef",
              b"builtins:", b":", b"\xc7\x01\x02", b"\xd4\x05\x00", b"\xc7\x00\x06"]


class FuzzObject:
    """The replicated type the RPC targets call: ordered and p2p methods over a bounded dict."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.n = 0

    def put(self, key: Any, value: Any) -> int:
        if len(self.data) > 256:
            self.data.clear()
        self.data[str(key)[:64]] = value
        return len(self.data)

    def add(self, x: int) -> int:
        self.n += x
        return self.n

    def get(self, key: Any) -> Any:
        return self.data.get(str(key)[:64])

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]


def _decorate_fuzz_object() -> None:
    from ..rpc.methods import ordered, p2p

    if getattr(FuzzObject, "_fuzz_decorated", False):
        return
    for name, deco in (("put", ordered), ("add", ordered), ("get", p2p), ("echo", p2p)):
        marked = deco(FuzzObject.__dict__[name])
        setattr(FuzzObject, name, marked)
        marked.__set_name__(FuzzObject, name)
    FuzzObject._fuzz_decorated = True  # type: ignore[attr-defined]


def _rpc_values() -> list[Any]:
    """Arguments and results of every shape the serializer encodes (ext types included)."""
    from ..state_transfer import PersistentFieldRef
    from ..view import Mode

    return [[[1]], [["k", {"a": [1, 2.5, None]}]], [[], {"x": b"\x00" * 8}], [[(1, 2), {3, 4}, frozenset([5])]],
            [[Mode.ORDERED, 1 << 100, -(1 << 70)]], [[PersistentFieldRef("state")]], [["é☃", True, False]],
            [[[[[[1]]]]]], [[{"nested": {"deep": [(), set()]}}]]]


def _rpc_manager(workdir: Path, view: Any, my_id: int = 0) -> tuple[Any, Any]:
    """A real RpcManager of node ``my_id`` holding a FuzzObject in subgroup 0, on a fake group."""
    from ..rpc import manager as rm

    _decorate_fuzz_object()
    conf = _conf(workdir, **{"DERECHO/local_id": my_id})
    group = _FakeGroup(conf, view)
    rpc = rm.RpcManager(group)  # type: ignore[arg-type]
    group.rpc = rpc
    rpc.view = view
    rpc.views[view.vid] = view
    rpc.objects[0] = rm.SubgroupObject(FuzzObject, 0, 0, 0, FuzzObject(), None, True, "DEFAULT",
                                       max_reply=conf.get("SUBGROUP/DEFAULT/max_reply_payload_size"))
    for node in (1, 2):
        p = rpc._new_pending("p2p", 0)
        p.fulfil_map([node])
        rpc._p2p_outstanding[node] += 1
        q = rpc._new_pending("ordered", 0)
        q.fulfil_map([0, 1, 2], version=5 << 32, timestamp_us=7)
    return rpc, group


class _FakeEngine:
    def __init__(self, view: Any) -> None:
        self.view = view
        self.sent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=64)

    def send_p2p(self, node: int, data: Any) -> None:
        self.sent.append((node, bytes(data)))

    def report_progress(self, *args: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # any other notification the RPC layer gives its engine
        return lambda *args, **kwargs: None


class _FakeGroup:
    """What RpcManager and ExternalServer use of a Group: conf, engine, delivery thread, posting jobs."""

    def __init__(self, conf: Any, view: Any) -> None:
        self.conf = conf
        self._engine = _FakeEngine(view)
        self._delivery = threading.current_thread()
        self.factories: dict[Any, Any] = {}
        self.external: Any = None
        self.rpc: Any = None

    def _user_callback(self, name: str) -> Any:
        return None

    def _external_reply_sink(self, node_id: int) -> Any:
        return self.external.reply_sink(node_id) if self.external is not None else None

    def _post(self, job: Callable[[], None]) -> None:
        job()

    def _fatal(self, message: str) -> None:
        raise AssertionError(f"the RPC layer asked the group to stop: {message}")

    def _current(self) -> Any:
        return self._engine.view


class _RpcDecoder(Harness):
    tokens = RPC_TOKENS
    contract = "RpcWireError"

    def setup(self) -> None:
        from ..rpc import methods, wire

        type(self).documented = (wire.RpcWireError,)
        self.wire = wire
        self.ser = wire.Serializer("msgpack")
        self.tags = [methods.rpc_name(n) for n in ("put", "add", "get", "echo")]
        self.blobs = [self.ser.dumps(v) for v in _rpc_values()]


@target
class RpcOrdered(_RpcDecoder):
    name = "rpc.ordered"
    description = "rpc.wire.decode_ordered: the payload of a cooked multicast, [tag, invocation id, args]"

    def setup(self) -> None:
        super().setup()
        self.seeds = [Seed([t, i, b]) for t in self.tags for i, b in enumerate(self.blobs)]

    def run(self, data: bytes) -> bool:
        self.wire.decode_ordered(data)
        return True


@target
class RpcRequest(_RpcDecoder):
    name = "rpc.request"
    description = "rpc.wire.decode_request: a p2p request, [subgroup id, tag, invocation id, args]"

    def setup(self) -> None:
        super().setup()
        self.seeds = [Seed([0, t, i, b]) for t in self.tags for i, b in enumerate(self.blobs)]

    def run(self, data: bytes) -> bool:
        self.wire.decode_request(data)
        return True


@target
class RpcReplies(_RpcDecoder):
    name = "rpc.replies"
    description = "rpc.wire.decode_replies: a batch of [kind, invocation id, status, body] replies"

    def setup(self) -> None:
        super().setup()
        w = self.wire
        self.seeds = [Seed([[w.P2P, 1, w.OK, b], [w.ORDERED, 2, w.RAISED, ["ValueError", "bad"]]]) for b in self.blobs]

    def run(self, data: bytes) -> bool:
        self.wire.decode_replies(data)
        return True


@target
class RpcSerializer(_RpcDecoder):
    name = "rpc.serializer"
    description = ("Serializer('msgpack').loads: RPC arguments, replies, notifications and object state "
                   "(ext types: tuple, set, frozenset, enum, big int, objects by __getstate__)")

    def setup(self) -> None:
        super().setup()
        from .. import persistent as pers

        self.seeds = []
        for v in _rpc_values():
            blob = self.ser.dumps(v)
            self.seeds.append(Seed(msgpack.unpackb(blob[1:], raw=False, strict_map_key=False),
                                   lambda o: b"M" + msgpack.packb(o, use_bin_type=True)))
            self.seeds.append(raw_seed(blob))
        for code in (pers._EXT_TUPLE, pers._EXT_SET, pers._EXT_ENUM, pers._EXT_OBJECT):
            self.seeds.append(raw_seed(b"M" + deep_ext(3000, code)))
        self.seeds.append(raw_seed(b"M" + msgpack.packb(msgpack.ExtType(pers._EXT_BIGINT, b"9" * 5000))))
        self.seeds.append(raw_seed(b"M" + msgpack.packb(msgpack.ExtType(
            pers._EXT_ENUM, msgpack.packb(["derecho_core.view:Mode", 7])))))

    def run(self, data: bytes) -> bool:
        self.ser.loads(data)
        return True


@target
class RpcManagerTarget(Harness):
    name = "rpc.manager"
    description = ("RpcManager of a member: on_request (channel Q), on_replies (channel R) and ordered calls "
                   "delivered by the multicast (on_deliveries), running a real replicated object")
    contract = "never raises: bad messages are logged and dropped, handler errors become error replies"
    tokens = RPC_TOKENS
    reset_every = 200

    def setup(self) -> None:
        from ..protocol.multicast import Delivery
        from ..rpc import methods, wire

        self.Delivery = Delivery
        self.wire = wire
        ser = wire.Serializer("msgpack")
        self.view = sim_world("ordered").views[-1]
        tags = {n: methods.rpc_name(n) for n in ("put", "add", "get", "echo")}
        args = {"put": [["k", [1, 2]]], "add": [[3]], "get": [["k"]], "echo": [[1, (2,)], {"kw": {3}}]}
        self.requests = [Seed([0, tags[n], 40 + i, ser.dumps(a)]) for i, (n, a) in enumerate(args.items())]
        self.replies = [Seed([[wire.P2P, inv, wire.OK, ser.dumps(inv)], [wire.ORDERED, inv + 1, wire.RAISED,
                                                                           ["KeyError", "k"]]]) for inv in range(1, 5)]
        self.ordered = [Seed([tags[n], 50 + i, ser.dumps(a)]) for i, (n, a) in enumerate(args.items())]
        self.seeds = self.requests + self.replies + self.ordered
        self.dropped = _Counting()

    def reset(self) -> None:
        self.rpc, self.group = _rpc_manager(_workdir(), self.view)
        rpc_log = logging.getLogger("derecho.rpc")
        if self.dropped not in rpc_log.handlers:
            rpc_log.addHandler(self.dropped)
            rpc_log.setLevel(logging.WARNING)

    def generate(self, rng: random.Random) -> Any:
        kind = rng.choice(["request", "request", "replies", "ordered", "ordered"])
        seeds = {"request": self.requests, "replies": self.replies, "ordered": self.ordered}[kind]
        return kind, rng.choice([0, 1, 1, 2, 2, 9]), self.fuzz_bytes(rng, seeds)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"kind": data[0], "from": data[1], **_describe(data[2])}

    def run(self, data: Any) -> bool:
        kind, sender, raw = data
        rpc = self.rpc
        self.dropped.count = 0
        if kind == "request":
            rpc.on_request(sender, memoryview(raw))
        elif kind == "replies":
            rpc.on_replies(sender, memoryview(raw))
        else:
            rpc.on_deliveries([self.Delivery(self.view.vid, 0, 0, sender, 3, 9, (self.view.vid << 32) | 9,
                                             time.time_ns(), True, raw)])
        raised = answered = 0
        for _node, reply in self.group._engine.sent:
            for r in self.wire.decode_replies(reply[1:]):  # what this node answers must decode at the caller
                answered += 1
                raised += r[2] == self.wire.RAISED
        self.group._engine.sent.clear()
        return not self.dropped.count and not (answered and raised == answered)


class _Counting(logging.Handler):
    """Counts the 'dropped a bad ...' warnings of a logger (a decoder that rejects by logging)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("dropped"):
            self.count += 1


# ============================================================================ external clients

EXTERNAL_TOKENS = [b"DEXT", b"DEXT\x01", b"\x01\x01\x00\x00", b"\x01\x06\x01\x00"]


def _external_server(workdir: Path, keyed: bool) -> tuple[Any, Any]:
    """A real ExternalServer object (no selector thread) of node 0, with a real RpcManager behind it."""
    import selectors

    from .. import external_server as es
    from ..rpc import wire

    view = sim_world("ordered").views[-1]
    rpc, group = _rpc_manager(workdir, view)
    srv = object.__new__(es.ExternalServer)
    conf = group.conf
    srv.group = group
    srv.node_id = 0
    srv.host = "127.0.0.1"
    srv.key = KEY if keyed else None
    srv.key_name = getattr(es, "CLUSTER_KEY", "DERECHO/cluster_key_file")
    srv.max_clients = 1024
    srv.hello_timeout = 10.0
    srv._max_request = conf.get("DERECHO/max_p2p_request_payload_size")
    srv._max_frame = 2 * srv._max_request + 64 * 1024
    srv._window = conf.get("DERECHO/p2p_window_size")
    srv._serializer = wire.Serializer("msgpack")
    srv._lock = threading.Lock()
    srv._clients = {}
    srv._conns = set()
    srv._dirty = set()
    srv._tls = threading.local()
    srv._last_vid = -1
    srv._closing = threading.Event()
    srv._sel = selectors.DefaultSelector()
    srv._wake_r, srv._wake_w = socket.socketpair()
    srv._wake_r.setblocking(False)
    srv._wake_w.setblocking(False)
    srv._thread = threading.current_thread()
    srv.port = 0
    group.external = srv
    return srv, group


def _close_external_server(srv: Any) -> None:
    for conn in list(srv._conns):
        srv._drop(conn, None)
    srv._sel.close()
    srv._wake_r.close()
    srv._wake_w.close()


@target
class ExternalServerTarget(Harness):
    name = "external.server"
    description = ("a member's external-client server: frame header, MAC, HELLO, GET_VIEW, GET_STATUS and "
                   "P2P_REQUEST frames of one connection (ExternalServer._process), p2p calls run by a real "
                   "RpcManager")
    contract = "the connection is closed (_Garbage, or a REFUSE frame); nothing else escapes _process"
    tokens = EXTERNAL_TOKENS + RPC_TOKENS
    reset_every = 300

    def setup(self) -> None:
        from .. import external_server as es
        from ..rpc import methods, wire

        type(self).documented = (es._Garbage,)
        self.es = es
        ser = wire.Serializer("msgpack")
        tags = [methods.rpc_name(n) for n in ("get", "echo", "put")]
        self.bodies: list[tuple[int, Any]] = [(es.K_GET_VIEW, [1]), (es.K_GET_STATUS, [2])]
        self.bodies += [(es.K_P2P_REQUEST, [0, t, 10 + i, ser.dumps([[i, "x"]])]) for i, t in enumerate(tags)]
        self.servers: dict[bool, Any] = {}

    def reset(self) -> None:
        for srv in self.servers.values():
            _close_external_server(srv)
        self.servers = {keyed: _external_server(_workdir(), keyed)[0] for keyed in (False, True)}

    def close(self) -> None:
        for srv in self.servers.values():
            _close_external_server(srv)

    def _codec(self, keyed: bool) -> Any:
        codec = self.es.FrameCodec(KEY if keyed else None, client_side=True)
        codec.nonce_c = bytes(range(32))
        return codec

    def generate(self, rng: random.Random) -> Any:
        es = self.es
        m = self.mutator
        m.rng = rng
        keyed = rng.random() < 0.5
        codec = self._codec(keyed)
        client_id = rng.choice([900, 901, 0, 1, (1 << 32) - 1])
        frames: list[bytes] = []
        hello = [client_id, codec.nonce_c]
        if rng.random() < 0.2:
            hello = m.mutate_tree(hello)
        try:
            frames.append(codec.encode(es.K_HELLO, hello))
        except Exception:
            frames.append(codec.encode(es.K_HELLO, [client_id, codec.nonce_c]))
        codec.nonce_s = _FixedSecrets.NONCE
        for _ in range(rng.choice([0, 1, 2, 3, 5])):
            kind, body = rng.choice(self.bodies)
            x = rng.random()
            if x < 0.45:
                body = m.mutate_tree(body)
            elif x < 0.55:
                kind = rng.choice([rng.randrange(256), es.K_HELLO, es.K_VIEW, es.K_REFUSE, es.K_NOTIFY])
            try:
                frame = codec.encode(kind, body)
            except Exception:
                frame = codec.encode(es.K_GET_VIEW, [3])
            if rng.random() < 0.15:
                frame = m.mutate_bytes(frame)
            frames.append(frame)
        stream = b"".join(frames)
        if rng.random() < 0.15:
            stream = m.mutate_bytes(stream)
        elif rng.random() < 0.05:
            stream = m.random_bytes()
        return keyed, _chunks(rng, stream)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], "chunks": [len(c) for c in data[1]], **_describe(b"".join(data[1]))}

    def run(self, data: Any) -> bool:
        keyed, chunks = data
        srv = self.servers[keyed]
        a, b = _socketpair()
        a.setblocking(False)
        conn = self.es._Conn(a, ("fuzz", 1), srv.key, srv.key_name)
        srv._conns.add(conn)
        try:
            for chunk in chunks:
                if conn.closed or conn.closing:
                    break
                conn.inbuf += chunk
                srv._process(conn)
                srv._service_dirty()
                _drain(b)
            return not conn.closing
        finally:
            srv._drop(conn, None)
            b.close()


class _FakeClient:
    """What a _MemberConnection uses of its ExternalGroupClient."""

    def __init__(self, keyed: bool) -> None:
        from ..rpc import wire

        self.my_id = 900
        self.timeout = 2.0
        self._key = KEY if keyed else None
        self._key_name = "DERECHO/cluster_key_file"
        self._window = 16
        self._invocations = itertools.count(1)
        self._requests = itertools.count(1)
        self._serializer = wire.Serializer("msgpack")
        self.notes = 0
        self.lost: list[str] = []

    def _on_notify(self, node_id: int, subgroup_id: int, blob: bytes) -> None:
        from ..rpc import wire

        try:  # what the client's notification thread does with it
            self._serializer.loads(blob)
        except wire.RpcWireError:
            pass
        self.notes += 1

    def _connection_lost(self, conn: Any, reason: str, *, broken: bool) -> None:
        self.lost.append(reason)


def _member_frames(codec: Any, es: Any, ser: Any) -> list[tuple[int, Any]]:
    from ..rpc import wire

    view = sim_world("ordered").views[-1]
    return [(es.K_P2P_REPLY, [wire.P2P, 1, wire.OK, ser.dumps([1, (2, 3)])]),
            (es.K_P2P_REPLY, [wire.P2P, 2, wire.RAISED, ["KeyError", "missing"]]),
            (es.K_VIEW, [1, view.to_bytes(), True]), (es.K_STATUS, [2, {"vid": 2, "members": [0, 1, 2]}]),
            (es.K_ERROR, [3, "no view"]), (es.K_NOTIFY, [0, ser.dumps({"event": (1, 2)})])]


@target
class ExternalClientFrames(Harness):
    name = "external.client"
    description = ("an external client's reader (_MemberConnection._read_loop): P2P_REPLY, VIEW, STATUS, ERROR "
                   "and NOTIFY frames from a member, with calls and requests outstanding")
    contract = "the connection is closed with a reason; nothing escapes _read_loop and nothing is logged as a bug"
    tokens = EXTERNAL_TOKENS + RPC_TOKENS

    def setup(self) -> None:
        from .. import external_client as ec
        from .. import external_server as es
        from ..rpc import wire

        self.ec, self.es = ec, es
        self.ser = wire.Serializer("msgpack")

    def _codec(self, keyed: bool) -> Any:
        codec = self.es.FrameCodec(KEY if keyed else None, client_side=False)  # the member's side encodes
        codec.nonce_c, codec.nonce_s = bytes(range(32)), _FixedSecrets.NONCE
        return codec

    def generate(self, rng: random.Random) -> Any:
        m = self.mutator
        m.rng = rng
        keyed = rng.random() < 0.5
        codec = self._codec(keyed)
        frames = []
        options = _member_frames(codec, self.es, self.ser)
        for _ in range(rng.choice([1, 1, 2, 4])):
            kind, body = rng.choice(options)
            if rng.random() < 0.6:
                body = m.mutate_tree(body)
            if rng.random() < 0.05:
                kind = rng.randrange(256)
            try:
                frames.append(codec.encode(kind, body))
            except Exception:
                frames.append(codec.encode(self.es.K_ERROR, [3, "x"]))
        stream = b"".join(frames)
        if rng.random() < 0.2:
            stream = m.mutate_bytes(stream)
        return keyed, stream

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        from concurrent.futures import Future

        from ..rpc.query_results import PendingResults

        keyed, stream = data
        ec = self.ec
        a, b = _socketpair()
        feeder = None
        try:
            feeder = _feed(b, stream)
            client = _FakeClient(keyed)
            conn = object.__new__(ec._MemberConnection)
            conn.client, conn.sock, conn.address, conn.node_id = client, a, ("fuzz", 1), 0
            conn.codec = self._codec(keyed)
            conn.codec._send_label, conn.codec._recv_label = conn.codec._recv_label, conn.codec._send_label
            conn._send_lock = threading.Lock()
            conn._lock = threading.Lock()
            conn._cv = threading.Condition(conn._lock)
            conn._calls = {}
            for inv in (1, 2, 3):
                p = PendingResults("p2p", 0, inv, lambda: False)
                p.fulfil_map([0])
                conn._calls[inv] = p
            conn._requests = {req: Future() for req in (1, 2, 3)}
            conn._outstanding = 3
            conn.closed = False
            conn.reason = ""
            conn._read_loop()
            assert conn.closed and client.lost, "the reader returned without closing"
            return client.lost[0] == "the member closed the connection" or "closed" in client.lost[0] and \
                "garbage" not in client.lost[0]
        finally:
            _close_fed(a, b, feeder)


@target
class ExternalClientHello(Harness):
    name = "external.client_hello"
    description = "ExternalGroupClient connecting to a member: its HELLO, then the member's WELCOME or REFUSE"
    contract = "ExternalWireError, ExternalClientRefusedError, DerechoError, EOFError or OSError from open()"
    tokens = EXTERNAL_TOKENS

    def setup(self) -> None:
        from .. import external_client as ec
        from .. import external_server as es
        from ..errors import DerechoError

        type(self).documented = (DerechoError, EOFError, OSError)
        self.ec, self.es = ec, es
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.addr = self.listener.getsockname()
        real = socket
        harness = self

        class _SocketModule:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            @staticmethod
            def create_connection(address: Any, timeout: float | None = None) -> socket.socket:
                sock = real.create_connection(harness.addr, timeout=timeout)
                srv, _ = harness.listener.accept()
                harness.peer = srv
                harness.feeder = _feed(srv, harness.pending)
                return sock

        ec.socket = _SocketModule()  # type: ignore[attr-defined]
        self.pending = b""
        self.peer: socket.socket | None = None
        self.feeder: threading.Thread | None = None

    def close(self) -> None:
        self.listener.close()

    def generate(self, rng: random.Random) -> Any:
        es = self.es
        m = self.mutator
        m.rng = rng
        keyed = rng.random() < 0.5
        codec = es.FrameCodec(KEY if keyed else None, client_side=False)
        codec.nonce_c, codec.nonce_s = _FixedSecrets.NONCE, _FixedSecrets.NONCE
        x = rng.random()
        if x < 0.6:
            body = [5, _FixedSecrets.NONCE, 2]
            if rng.random() < 0.7:
                body = m.mutate_tree(body)
            try:
                frame = codec.encode(es.K_WELCOME, body)
            except Exception:
                frame = codec.encode(es.K_WELCOME, [5, _FixedSecrets.NONCE, 2])
        elif x < 0.8:
            body = m.mutate_tree(["ID_IN_USE", "taken"]) if rng.random() < 0.7 else ["AUTH", "no"]
            try:
                frame = codec.encode(es.K_REFUSE, body, authenticate=False)
            except Exception:
                frame = codec.encode(es.K_REFUSE, ["X", "y"], authenticate=False)
        else:
            frame = codec.encode(rng.randrange(256), [1, 2, 3])
        follow = b""
        if rng.random() < 0.3:
            follow = codec.encode(es.K_NOTIFY, [0, b"M\x01"])
        stream = frame + follow
        if rng.random() < 0.3:
            stream = m.mutate_bytes(stream)
        return keyed, rng.choice([None, 5, 6]), stream

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], "expect_id": data[1], **_describe(data[2])}

    def run(self, data: Any) -> bool:
        keyed, expect_id, stream = data
        client = _FakeClient(keyed)
        self.pending = stream
        conn = None
        try:
            conn = self.ec._MemberConnection.open(client, ("fuzz.invalid", 1), expect_id)  # type: ignore[arg-type]
            conn._reader.join(5)
            assert not conn._reader.is_alive(), "the reader thread did not end at EOF"
            return True
        finally:
            if conn is not None:
                conn.lost("fuzz input done")
            if self.feeder is not None:
                self.feeder.join(10)
                self.feeder = None
            if self.peer is not None:
                self.peer.close()
                self.peer = None


# ============================================================================ state transfer

ST_TOKENS = [b"DRST", b"v", b"vid", b"sg", b"node", b"nonce", b"min", b"fields", b"snapshot", b"total",
             b"serializer", b"upto", b"entries", b"bytes", b"error", b"pickle", b"msgpack", b"state", b"pad"]


class StateObject:
    """The replicated object the state-transfer targets ship: two Persistent fields and a plain attribute."""

    def __init__(self, registry: Any) -> None:
        from ..persistent import Persistent

        self.state = Persistent(lambda: {"n": 0}, registry, "state")
        self.pad = Persistent(bytes, registry, "pad")
        self.calls_seen = 0


def _st_frames(key: bytes | None, role: bytes, session: bytes, start_seq: int,
               frames: list[tuple[int, bytes]]) -> bytes:
    """Frames as a real _Channel writes them (MACs included), read back from a socket pair."""
    from .. import state_transfer as st

    a, b = _socketpair()
    try:
        chan = st._Channel(a, key, role)
        chan.session = session
        chan.send_seq = start_seq
        out = bytearray()
        b.setblocking(False)
        for kind, payload in frames:
            chan.send(kind, payload)
            out += _drain(b)
        return bytes(out)
    finally:
        a.close()
        b.close()


NONCE_L = bytes(range(100, 132))


@target
class StateTransferGreet(Harness):
    name = "state_transfer.greet"
    description = "the state-transfer port (StateTransferServer._greet): a leader's HELLO frame, MAC, fields"
    contract = "the connection is refused (a REFUSE frame) and closed; nothing escapes or is logged as a bug"
    tokens = ST_TOKENS

    def setup(self) -> None:
        from .. import state_transfer as st

        self.st = st
        self.servers = {}
        for keyed in (False, True):
            srv = object.__new__(st.StateTransferServer)
            srv.key = KEY if keyed else None
            srv.hello_timeout = 2.0
            srv._lock = threading.Lock()
            srv._cond = threading.Condition(srv._lock)
            srv._held = {}
            srv._newest_vid = -1
            srv._refusals = collections.deque(maxlen=32)
            srv._slots = threading.BoundedSemaphore(4)
            srv._closing = threading.Event()
            srv.port = 0
            self.servers[keyed] = srv
        hello = {"v": st.PROTOCOL_VERSION, "vid": 3, "sg": 0, "node": 1, "nonce": NONCE_L}
        self.by_key = {keyed: [Seed(hello, lambda o, k=keyed: _st_frames(
            KEY if k else None, st._LEADER, b"", 0, [(st.K_HELLO, msgpack.packb(o, use_bin_type=True))]))]
            for keyed in (False, True)}
        self.seeds = self.by_key[False] + self.by_key[True]

    def generate(self, rng: random.Random) -> Any:
        keyed = rng.random() < 0.5
        return keyed, self.fuzz_bytes(rng, self.by_key[keyed])

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        keyed, stream = data
        srv = self.servers[keyed]
        a, b = _socketpair()
        feeder = None
        try:
            feeder = _feed(b, stream)
            assert srv._slots.acquire(blocking=False)
            srv._greet(a, ("fuzz", 1))
            held = [h for hs in srv._held.values() for h in hs]
            srv._held.clear()
            for h in held:
                h.chan.close()
                srv._slots.release()
            return bool(held)
        finally:
            _close_fed(a, b, feeder)


def _st_registry(workdir: Path, prefix: str, entries: int = 0) -> tuple[Any, Any]:
    from ..persistent import PersistentRegistry

    conf = _conf(workdir)
    reg = PersistentRegistry(prefix, conf)
    obj = StateObject(reg)
    for v in range(entries):
        obj.state.value = {"n": v}
        obj.pad.value = bytes([v]) * v
        reg.make_version(v, 1000 + v)
    if entries:
        reg.persist()
    return reg, obj


@target
class StateTransferReceive(Harness):
    name = "state_transfer.receive"
    description = ("a joiner receiving state (StateTransferServer.expect): HEADER, DATA (snapshot and log "
                   "entries), END frames from the leader; log tails merged into real logs, the object restored")
    contract = "StateTransferError"
    tokens = ST_TOKENS

    def setup(self) -> None:
        from .. import state_transfer as st

        type(self).documented = (st.StateTransferError,)
        self.st = st
        wd = _workdir()
        self.by_key: dict[bool, list[Seed]] = {}
        for keyed in (False, True):
            key = KEY if keyed else None
            src, obj = _st_registry(wd, f"fuzz-src-{keyed}", entries=6)
            snapshot = st.snapshot_object(obj)
            tail = src.export_log_tail(-1)
            fields = [[f.name, f.after_version, f.current_version, f.num_entries, f.num_bytes] for f in tail.fields]
            index_of = {f.name: i for i, f in enumerate(tail.fields)}
            entries = [[index_of[e.field], e.version, e.timestamp.rtc_us, e.timestamp.logic, bytes(e.data)]
                       for e in tail]
            src.close()
            total = len(snapshot) + sum(st.ENTRY.size + len(e[4]) for e in entries)
            header = {"snapshot": len(snapshot), "total": total, "serializer": "msgpack", "upto": None,
                      "fields": fields}
            tree = [header, msgpack.unpackb(snapshot[1:], raw=False, strict_map_key=False), entries,
                    {"entries": len(entries), "bytes": total}]
            self.by_key[keyed] = [Seed(tree, lambda o, k=key: self._encode(o, k, fix=False)),
                                  Seed(tree, lambda o, k=key: self._encode(o, k, fix=True))]
        self.seeds = self.by_key[False] + self.by_key[True]

    def _encode(self, o: Any, key: bytes | None, *, fix: bool) -> bytes:
        st = self.st
        header, snap, entries, end = o
        snapshot = b"M" + msgpack.packb(snap, use_bin_type=True)
        stream = bytearray(snapshot)
        for idx, version, rtc, logic, blob in entries:
            blob = bytes(blob)
            stream += st.ENTRY.pack(idx & M32, version, rtc, logic, len(blob)) + blob
        if fix and isinstance(header, dict):  # sizes that add up, so the mutation reaches the logs
            header = dict(header)
            header["snapshot"] = len(snapshot)
            header["total"] = len(stream)
            if isinstance(end, dict):
                end = dict(end, bytes=len(stream), entries=len(entries))
        frames = [(st.K_HEADER, msgpack.packb(header, use_bin_type=True))]
        for i in range(0, len(stream), 4096):
            frames.append((st.K_DATA, bytes(stream[i:i + 4096])))
        frames.append((st.K_END, msgpack.packb(end, use_bin_type=True)))
        return _st_frames(key, st._LEADER, NONCE_L + _FixedSecrets.NONCE, 1, frames)

    def generate(self, rng: random.Random) -> Any:
        keyed = rng.random() < 0.5
        return keyed, self.fuzz_bytes(rng, self.by_key[keyed])

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        st = self.st
        keyed, stream = data
        srv = object.__new__(st.StateTransferServer)
        srv.key = KEY if keyed else None
        srv.node_id = 3
        srv.serializer = "msgpack"
        srv._newest_vid = -1
        srv._lock = threading.Lock()
        srv._cond = threading.Condition(srv._lock)
        srv._refusals = collections.deque(maxlen=32)
        srv._slots = threading.BoundedSemaphore(4)
        srv._closing = threading.Event()
        srv._is_dead = lambda sock: False  # the fuzzed bytes are already waiting in the socket
        take = srv._take
        calls = []

        def take_once(key: Any, deadline: float) -> Any:  # no second connection will come: do not wait for one
            calls.append(key)
            return take(key, deadline) if len(calls) == 1 else None

        srv._take = take_once
        a, b = _socketpair()
        registry, obj = _st_registry(_workdir(), "fuzz-dst", entries=2)
        feeder = None
        try:
            feeder = _feed(b, stream)
            chan = st._Channel(a, srv.key, st._JOINER)
            chan.session = NONCE_L
            chan.recv_seq = 1
            assert srv._slots.acquire(blocking=False)
            srv._held = {(3, 0): [st._Held(chan, ("fuzz", 1), 3, 0, 1, NONCE_L)]}
            srv.expect(3, 0, obj, registry, timeout=0.5, progress=False)
            return True
        finally:
            registry.close()
            _close_fed(a, b, feeder)


@target
class StateTransferSend(Harness):
    name = "state_transfer.send"
    description = ("an old shard leader sending state (send_state): the joiner's READY, then its ACK or ERROR "
                   "once the leader's END went out")
    contract = "StateTransferError"
    tokens = ST_TOKENS

    def setup(self) -> None:
        from .. import state_transfer as st

        type(self).documented = (st.StateTransferError,)
        self.st = st
        self.joiner: threading.Thread | None = None
        self.peer: socket.socket | None = None
        self.pending: tuple[bytes, bytes] = (b"", b"")
        harness = self

        def connect(address: Any, deadline: float) -> socket.socket:
            a, b = _socketpair()
            harness.peer = b
            harness.joiner = threading.Thread(target=harness._joiner, args=(b, *harness.pending), daemon=True)
            harness.joiner.start()
            return a

        st._connect = connect  # type: ignore[assignment]
        self.source = _st_registry(_workdir(), "fuzz-leader", entries=4)
        ready = {"v": st.PROTOCOL_VERSION, "node": 3, "nonce": NONCE_L, "min": 1, "fields": {"state": 1, "pad": -1}}
        self.by_key: dict[bool, list[Seed]] = {}
        for keyed in (False, True):
            key = KEY if keyed else None
            nonce_l = _FixedSecrets.NONCE  # the leader's nonce (fixed while fuzzing)

            def enc(o: Any, key: bytes | None = key, nonce_l: bytes = nonce_l) -> bytes:
                r, tail = o
                head = _st_frames(key, st._JOINER, nonce_l, 0, [(st.K_READY, msgpack.packb(r, use_bin_type=True))])
                kind = {"ack": st.K_ACK, "error": st.K_ERROR}.get(tail[0], st.K_ACK)
                nonce_j = r.get("nonce", b"") if isinstance(r, dict) and isinstance(r.get("nonce"), bytes) else b""
                rest = _st_frames(key, st._JOINER, nonce_l + nonce_j, 1,
                                  [(kind, msgpack.packb(tail[1], use_bin_type=True))])
                return struct.pack("<I", len(head)) + head + rest

            self.by_key[keyed] = [Seed([ready, ["ack", {}]], enc), Seed([ready, ["error", {"error": "full"}]], enc)]
        self.seeds = self.by_key[False] + self.by_key[True]

    def _joiner(self, sock: socket.socket, ready: bytes, rest: bytes) -> None:
        """A joiner: answers the HELLO with ``ready``, skips the leader's frames up to END, then sends ``rest``.

        A leader that sends nothing for 20 ms after the READY waits for more of it (a truncated READY):
        the joiner then ends its stream, so the leader sees EOF instead of waiting for its timeout.
        """
        st = self.st
        mac = st.MAC_LEN if self.keyed else 0
        buf = bytearray()
        frames = 0
        try:
            sock.settimeout(2.0)
            while True:
                while len(buf) >= st.FRAME.size:
                    _, kind, _, length = st.FRAME.unpack_from(buf)
                    if len(buf) < st.FRAME.size + length + mac:
                        break
                    del buf[:st.FRAME.size + length + mac]
                    frames += 1
                    if frames == 1:  # the HELLO
                        sock.sendall(ready)
                        sock.settimeout(0.02)
                    elif kind == st.K_END:
                        sock.sendall(rest)
                        sock.shutdown(socket.SHUT_WR)
                        return
                    else:
                        sock.settimeout(2.0)
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(2.0)
                    continue
                if not chunk:
                    return
                buf += chunk
        except OSError:
            pass

    def close(self) -> None:
        self.source[0].close()

    def generate(self, rng: random.Random) -> Any:
        keyed = rng.random() < 0.5
        return keyed, self.fuzz_bytes(rng, self.by_key[keyed])

    def describe(self, data: Any) -> dict[str, Any]:
        return {"cluster_key": data[0], "first_4_bytes": "length of the READY part", **_describe(data[1])}

    def run(self, data: Any) -> bool:
        st = self.st
        keyed, stream = data
        self.keyed = keyed
        n = struct.unpack("<I", stream[:4])[0] if len(stream) >= 4 else 0
        self.pending = (stream[4:4 + n], stream[4 + n:])
        registry, obj = self.source
        try:
            st.send_state(("fuzz", 1), 3, 0, 1, obj, registry, None, KEY if keyed else None, timeout=0.5,
                          progress=False)
            return True
        finally:
            if self.joiner is not None:  # it ends at the EOF of the leader's closed socket
                self.joiner.join(3)
                self.joiner = None
            if self.peer is not None:
                self.peer.close()
                self.peer = None


# ============================================================================ configuration


def _config_tree() -> list[Any]:
    """A realistic configuration: every section with a few keys, a profile, an application section."""
    return [["DERECHO", [["contact_ip", "127.0.0.1"], ["contact_port", "23580"], ["local_id", "0"],
                         ["max_node_id", "1024"], ["heartbeat_ms", "100"], ["restart_leaders", "127.0.0.1,10.0.0.2"],
                         ["restart_leader_ports", "23580,23581"], ["serializer", "msgpack"],
                         ["cluster_key_file", "cluster.key"]]],
            ["RDMA", [["provider", "sockets"], ["tx_depth", "256"]]],
            ["SUBGROUP/DEFAULT", [["max_payload_size", "10240"], ["window_size", "16"]]],
            ["SUBGROUP/large", [["max_payload_size", "1048576"], ["block_size", "1048576"]]],
            ["LAYOUT", [["json_layout_file", "layout.json"]]],
            ["PERS", [["file_path", ".plog"], ["reset", "false"]]],
            ["LOGGER", [["default_log_level", "info"]]],
            ["MYAPP", [["anything", "'quoted # not a comment'"]]]]


LAYOUT = [{"type_alias": "Foo", "layout": [{"min_nodes_by_shard": [2], "max_nodes_by_shard": ["3"],
                                            "reserved_node_ids_by_shard": [["*1", "2", "3"]],
                                            "delivery_modes_by_shard": ["Ordered"],
                                            "profiles_by_shard": ["DEFAULT"]}]},
          {"type_alias": "Bar", "layout": [{"min_nodes_by_shard": [1, 1], "max_nodes_by_shard": [2, 2],
                                            "delivery_modes_by_shard": ["Raw", "Ordered"]}]}]


def _config_text(o: Any) -> bytes:
    lines = []
    for section, keys in o:
        lines.append(f"[{section}]")
        for k, v in keys:
            lines.append(f"{k} = {v}")
        lines.append("")
    return "\n".join(lines).encode("utf-8", "surrogateescape")


CONF_TOKENS = [b"[DERECHO]", b"[SUBGROUP/", b"[LAYOUT]", b"json_layout = '", b"'", b"\"", b"#", b"=", b"\n",
               b"local_id", b"max_node_id", b"json_layout_file", b"restart_leaders", b"restart_leader_ports",
               b",", b"\xff", b"\xc3\x28", b"--DERECHO/", b"--", b"--LAYOUT/json_layout="]


@target
class ConfLoad(Harness):
    name = "conf.load"
    description = "Conf.load of a random configuration file (and the layout file it may name)"
    contract = "ConfigError"
    gadgets = TEXT_GADGETS
    tokens = CONF_TOKENS

    def setup(self) -> None:
        from ..errors import ConfigError

        type(self).documented = (ConfigError,)
        self.dir = _workdir() / "conf"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "cluster.key").write_bytes(KEY)
        tree = _config_tree()
        self.seeds = [Seed(tree, _config_text), Seed(tree[:3], _config_text),
                      raw_seed(b"[LAYOUT]\njson_layout = '" + json.dumps(LAYOUT, indent=1).encode() + b"'\n")]
        self.layouts = [Seed(LAYOUT, lambda o: json.dumps(o).encode("utf-8", "surrogateescape"))]

    def generate(self, rng: random.Random) -> Any:
        layout = self.fuzz_bytes(rng, self.layouts) if rng.random() < 0.5 else json.dumps(LAYOUT).encode()
        return self.fuzz_bytes(rng), layout

    def describe(self, data: Any) -> dict[str, Any]:
        return {"config": _describe(data[0]), "layout.json": _describe(data[1])}

    def run(self, data: Any) -> bool:
        from ..conf import Conf

        cfg, layout = data
        path = self.dir / "derecho.cfg"
        path.write_bytes(cfg)
        (self.dir / "layout.json").write_bytes(layout)
        Conf.load(path, environ={})
        return True


@target
class ConfArgs(Harness):
    name = "conf.parse_args"
    description = "Conf.parse_args of a random command line ([options --] application arguments)"
    contract = "ConfigError"
    gadgets = TEXT_GADGETS
    tokens = CONF_TOKENS

    def setup(self) -> None:
        from ..errors import ConfigError

        type(self).documented = (ConfigError,)
        self.dir = _workdir() / "argv"
        self.dir.mkdir(exist_ok=True)
        os.chdir(self.dir)
        argv = ["--DERECHO/local_id=3", "--DERECHO/contact_port", "23580", "--SUBGROUP/big/window_size=4",
                "--RDMA/provider=sockets", "--MYAPP/x=1", "--", "app", "--flag"]
        self.seeds = [Seed(argv, lambda o: json.dumps(o).encode()), Seed(argv[:4], lambda o: json.dumps(o).encode()),
                      Seed(["--LAYOUT/json_layout=" + json.dumps(LAYOUT)], lambda o: json.dumps(o).encode())]

    def generate(self, rng: random.Random) -> Any:
        m = self.mutator
        m.rng = rng
        seed = rng.choice(self.seeds)
        tree = m.mutate_tree(seed.obj) if rng.random() < 0.8 else seed.obj
        argv = tree if isinstance(tree, list) else [tree]
        out = []
        for item in argv:
            if isinstance(item, bytes):
                item = item.decode("utf-8", "surrogateescape")
            out.append(item if isinstance(item, str) else repr(item))
        if out and rng.random() < 0.3:
            i = rng.randrange(len(out))
            out[i] = m.mutate_bytes(out[i].encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
        return out

    def run(self, data: Any) -> bool:
        from ..conf import Conf

        Conf.parse_args(data, environ={})
        return True


# ============================================================================ allocators

class _TypeA:
    pass


class _TypeB:
    pass


@target
class AllocatorJson(Harness):
    name = "allocators.json"
    description = ("DefaultSubgroupAllocator.from_json of a JSON layout (derecho_allocators), then an "
                   "allocation of views of 1 to 7 members")
    contract = "LayoutError (the layout), SubgroupProvisioningError (a view too small for it)"
    gadgets = TEXT_GADGETS
    tokens = [b"min_nodes_by_shard", b"max_nodes_by_shard", b"reserved_node_ids_by_shard",
              b"delivery_modes_by_shard", b"profiles_by_shard", b"type_alias", b"layout", b"Ordered", b"Raw",
              b"\"*", "\u00b2".encode(), b"[", b"]", b"{", b"}"]

    def setup(self) -> None:
        from derecho_allocators import DefaultSubgroupAllocator, LayoutError

        from ..errors import SubgroupProvisioningError

        type(self).documented = (LayoutError, SubgroupProvisioningError)
        self.cls = DefaultSubgroupAllocator
        self.seeds = [Seed(LAYOUT, lambda o: json.dumps(o).encode("utf-8", "surrogateescape")),
                      Seed(LAYOUT[:1], lambda o: json.dumps(o).encode("utf-8", "surrogateescape"))]

    def generate(self, rng: random.Random) -> Any:
        return rng.random() < 0.5, self.fuzz_bytes(rng)

    def describe(self, data: Any) -> dict[str, Any]:
        return {"types_given": data[0], **_describe(data[1])}

    def run(self, data: Any) -> bool:
        from ..errors import SubgroupProvisioningError
        from ..view import View

        typed, raw = data
        text = raw.decode("utf-8", "surrogateescape")
        if typed:
            n = max(1, min(text.count("type_alias"), 2))
            alloc = self.cls.from_json([_TypeA, _TypeB][:n], text)
        else:
            alloc = self.cls.from_json(None, text)
        types = alloc.types or [_TypeA]
        types = [t if isinstance(t, type) else type(f"T{i}", (), {}) for i, t in enumerate(types)]
        if len(set(types)) != len(types):
            types = [type(f"T{i}", (), {}) for i in range(len(types))]
        allocated = False
        for n in (1, 3, 7):
            view = View(n, list(range(n)), next_unassigned_rank=0, subgroup_type_order=types)
            try:
                alloc(types, None, view)
                allocated = True
            except SubgroupProvisioningError:
                pass  # too few members for this layout: documented
        return allocated


# ============================================================================ self-test targets (the driver's own tests)


class _SelfTest(Harness):
    """Targets that misbehave on purpose, to test the driver; not in the default campaign."""

    selftest = True
    contract = "ValueError"
    documented = (ValueError,)

    def generate(self, rng: random.Random) -> Any:
        return rng.randrange(100)


@target
class SelfTestCrash(_SelfTest):
    name = "selftest.crash"
    description = "raises KeyError on inputs divisible by 10, ValueError on odd ones"

    def run(self, data: int) -> bool:
        if data % 10 == 0:
            raise KeyError(data)
        if data % 2:
            raise ValueError(data)
        return True


@target
class SelfTestHang(_SelfTest):
    name = "selftest.hang"
    description = "loops forever in Python on inputs divisible by 25"

    def run(self, data: int) -> bool:
        while data % 25 == 0:
            pass
        return True


@target
class SelfTestDie(_SelfTest):
    name = "selftest.die"
    description = "kills its own process with SIGSEGV on input 3 (as a C stack overflow would)"

    def run(self, data: int) -> bool:
        if self.index == 3:
            os.kill(os.getpid(), signal.SIGSEGV)
        return True


# ============================================================================ running inputs


class _LogCapture(logging.Handler):
    """Records every log record that carries a traceback: a server thread that had to catch the unexpected."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            self.records.append(record)


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _where(tb: Any) -> str:
    """file:line of the innermost traceback frame in derecho code outside this module (the code under test)."""
    frames = traceback.extract_tb(tb)
    own = [f for f in frames if "derecho" in f.filename and not f.filename.endswith("testing/fuzz.py")]
    fr = own[-1] if own else (frames[-1] if frames else None)
    if fr is None:
        return "?"
    here = Path(fr.filename)
    short = "/".join(here.parts[-2:]) if len(here.parts) >= 2 else here.name
    return f"{short}:{fr.lineno} ({fr.name})"


@dataclass
class Finding:
    kind: str            # "crash" or "hang"
    target: str
    index: int
    state_from: int
    signature: str
    exc_type: str
    message: str
    traceback: str
    input: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _finding(kind: str, h: Harness, index: int, state_from: int, exc: BaseException | None, data: Any,
             seconds: float, exc_info: Any = None) -> Finding:
    if exc_info is None and exc is not None:
        exc_info = (type(exc), exc, exc.__traceback__)
    etype, evalue, tb = exc_info if exc_info else (None, None, None)
    text = "".join(traceback.format_exception(etype, evalue, tb)) if etype is not None else ""
    where = _where(tb) if tb is not None else "?"
    name = "hang" if kind == "hang" else (etype.__name__ if etype is not None else "?")
    try:
        desc = h.describe(data)
    except Exception as e:  # describing must not hide the finding
        desc = {"describe_error": repr(e)}
    return Finding(kind, h.name, index, state_from, f"{name} at {where}", name,
                   ("" if kind == "hang" else str(evalue))[:1000], text[-6000:], desc, round(seconds, 4))


@dataclass
class Stats:
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: int = 0
    hangs: int = 0
    max_seconds: float = 0.0
    slow_inputs: int = 0  # over 0.1 s
    slowest_index: int = -1

    def add(self, other: dict[str, Any]) -> None:
        for k in ("inputs", "accepted", "rejected", "crashes", "hangs", "slow_inputs"):
            setattr(self, k, getattr(self, k) + int(other.get(k, 0)))
        if other.get("max_seconds", 0.0) > self.max_seconds:
            self.max_seconds = other["max_seconds"]
            self.slowest_index = other.get("slowest_index", -1)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


#: what a worker writes into its position file before every input (read by the parent if the worker dies):
#: the input index, where its state was last reset, and the counts of the inputs before it
POSITION = struct.Struct("<7q")


def input_rng(seed: int, target_name: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{target_name}/{index}")


def run_inputs(h: Harness, seed: int, start: int, count: int, *, timeout: float = DEFAULT_TIMEOUT,
               on_finding: Callable[[Finding], None] | None = None,
               on_progress: Callable[[Stats], None] | None = None,
               position: mmap.mmap | None = None, state_from: int | None = None,
               replay: int | None = None) -> Stats:
    """Run inputs ``start`` .. ``start + count - 1`` of ``h`` (SIGALRM bounds each one to ``timeout`` s).

    The state is reset at ``start`` (or at ``state_from``: inputs before ``start`` are then run silently,
    as a replay does), every ``h.reset_every`` inputs, and after a crash or a hang.
    """
    capture = _LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    stats = Stats()
    first = start if state_from is None else state_from
    need_reset = True
    current_from = first
    last_progress = time.monotonic()
    try:
        for i in range(first, start + count):
            quiet = i < start
            if h.reset_every and i % h.reset_every == 0 and i != first:
                need_reset = True
            if need_reset:
                h.reset()
                need_reset = False
                current_from = i
            if position is not None and not quiet:
                struct.pack_into(POSITION.format, position, 0, i, current_from, stats.inputs, stats.accepted,
                                 stats.rejected, stats.crashes, stats.hangs)
            h.index = i
            data = h.generate(input_rng(seed, h.name, i))
            capture.records.clear()
            exc: BaseException | None = None
            outcome = "crash"
            t0 = time.perf_counter()
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    outcome = "accepted" if h.run(data) else "rejected"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _Hang as e:
                outcome, exc = "hang", e
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: B036  (SystemExit from decoded bytes is a crash too)
                exc = e
                outcome = "rejected" if isinstance(e, h.documented) else "crash"
            seconds = time.perf_counter() - t0
            if outcome != "crash" and outcome != "hang" and capture.records:
                outcome = "crash"
            if replay is not None and i == replay:
                _print_replay(h, data, outcome, exc, capture.records, seconds)
            if quiet:
                if outcome in ("crash", "hang"):
                    need_reset = True
                continue
            stats.inputs += 1
            if seconds > stats.max_seconds:
                stats.max_seconds, stats.slowest_index = seconds, i
            if seconds > 0.1:
                stats.slow_inputs += 1
            if outcome == "accepted":
                stats.accepted += 1
            elif outcome == "rejected":
                stats.rejected += 1
            else:
                need_reset = True
                if outcome == "hang":
                    stats.hangs += 1
                    finding = _finding("hang", h, i, current_from, exc, data, seconds)
                else:
                    stats.crashes += 1
                    if exc is not None:
                        finding = _finding("crash", h, i, current_from, exc, data, seconds)
                    else:
                        rec = capture.records[0]
                        finding = _finding("crash", h, i, current_from, None, data, seconds, rec.exc_info)
                        finding.message = f"logged: {rec.getMessage()[:300]} / {finding.message}"
                if on_finding is not None:
                    on_finding(finding)
            if on_progress is not None and time.monotonic() - last_progress > PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                on_progress(stats)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        root.removeHandler(capture)
    return stats


def _print_replay(h: Harness, data: Any, outcome: str, exc: BaseException | None,
                  records: list[logging.LogRecord], seconds: float) -> None:
    print(f"target {h.name}: outcome {outcome} in {seconds:.3f} s")
    print("input:", json.dumps(h.describe(data), indent=1)[:20000])
    if exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stdout)
    for rec in records:
        print("logged with a traceback:", rec.getMessage())
        traceback.print_exception(*rec.exc_info, file=sys.stdout)  # type: ignore[misc]


# ============================================================================ workers and the campaign


def _worker(name: str, seed: int, start: int, count: int, timeout: float, position_path: str,
            memory_mb: int) -> int:
    """Run one target's inputs in this process; JSON lines on the original stdout, stray output to stderr."""
    import faulthandler
    import resource

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the code under test prints goes to stderr, not into the JSON lines
    faulthandler.enable(sys.stderr)
    if memory_mb:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_mb << 20
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    logging.getLogger().setLevel(logging.ERROR)
    patch_for_fuzzing()
    os.chdir(_workdir())
    seen: collections.Counter[str] = collections.Counter()

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, default=repr) + "\n")
        out.flush()

    def on_finding(f: Finding) -> None:
        seen[f.signature] += 1
        d = f.as_dict()
        if seen[f.signature] > MAX_EXAMPLES:
            d["traceback"], d["input"] = "", {}
        emit({"t": "finding", **d})

    t0 = time.monotonic()
    h = TARGETS[name]()
    h.setup()
    emit({"t": "ready", "setup_seconds": round(time.monotonic() - t0, 3)})
    with open(position_path, "r+b") as f:
        position = mmap.mmap(f.fileno(), POSITION.size)
    stats = run_inputs(h, seed, start, count, timeout=timeout, on_finding=on_finding,
                       on_progress=lambda st: emit({"t": "progress", **st.as_dict()}), position=position)
    emit({"t": "end", **stats.as_dict()})
    h.close()
    os.chdir("/")
    import shutil

    shutil.rmtree(_workdir(), ignore_errors=True)
    return 0


@dataclass
class TargetResult:
    name: str
    description: str
    contract: str
    stats: Stats = field(default_factory=Stats)
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)  # signature -> {kind, count, examples}
    setup_seconds: float = 0.0
    seconds: float = 0.0  # wall time of its workers

    def add_finding(self, f: dict[str, Any]) -> None:
        entry = self.findings.setdefault(f["signature"], {"kind": f["kind"], "signature": f["signature"],
                                                          "count": 0, "examples": []})
        entry["count"] += 1
        if f.get("traceback") and len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append({k: f[k] for k in ("index", "state_from", "exc_type", "message", "traceback",
                                                        "input", "seconds")})

    def as_dict(self, seed: int) -> dict[str, Any]:
        findings = sorted(self.findings.values(), key=lambda e: -e["count"])
        for entry in findings:
            for ex in entry["examples"]:
                ex["replay"] = (f"python -m derecho_core.testing.fuzz --seed {seed} --replay "
                                f"{self.name}:{ex['index']}" + (f" --from {ex['state_from']}"
                                                                if ex["state_from"] != ex["index"] else ""))
        return {"name": self.name, "kind": "in-process", "description": self.description,
                "contract": self.contract, **self.stats.as_dict(), "setup_seconds": round(self.setup_seconds, 2),
                "seconds": round(self.seconds, 1), "findings": findings}


class _Running:
    def __init__(self, name: str, start: int, count: int, proc: subprocess.Popen[str], position_path: str,
                 stderr_path: str) -> None:
        self.name = name
        self.start = start
        self.count = count
        self.proc = proc
        self.position_path = position_path
        self.stderr_path = stderr_path
        self.last_line = time.monotonic()
        self.ready = False
        self.done = 0
        self.progress = Stats()
        self.ended = False
        self.started = time.monotonic()


def _remove_workdir(pid: int) -> None:
    import shutil

    shutil.rmtree(Path(tempfile.gettempdir()) / f"derecho-fuzz-{pid}", ignore_errors=True)


def _budgets(names: Sequence[str], inputs: int) -> dict[str, int]:
    weights = {n: TARGETS[n].weight for n in names}
    total = sum(weights.values())
    out = {n: int(inputs * w / total) for n, w in weights.items()}
    for n in list(out)[: inputs - sum(out.values())]:
        out[n] += 1
    return out


def run_fuzz(inputs: int, seed: int = 0, targets: Sequence[str] | None = None, *, jobs: int = 2,
             timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = True,
             watchdog: float | None = None) -> list[TargetResult]:
    """Fuzz ``targets`` (all by default) with ``inputs`` inputs in total, ``jobs`` worker processes at a time."""
    import queue

    from tqdm import tqdm

    names = list(targets or default_targets())
    for n in names:
        if n not in TARGETS:
            raise SystemExit(f"unknown target {n!r}; --list shows them")
    budgets = _budgets(names, inputs)
    results = {n: TargetResult(n, TARGETS[n].description, TARGETS[n].contract) for n in names}
    tasks: collections.deque[tuple[str, int, int]] = collections.deque(
        (n, 0, budgets[n]) for n in names if budgets[n] > 0)
    stuck_after = watchdog if watchdog is not None else max(15.0, 10 * timeout)
    lines: queue.Queue[tuple[_Running, str | None]] = queue.Queue()
    running: list[_Running] = []
    tmp = tempfile.mkdtemp(prefix="derecho-fuzz-")
    bar = tqdm(total=sum(budgets.values()), unit="input", dynamic_ncols=True, disable=not progress,
               smoothing=0.05)

    def launch(name: str, start: int, count: int) -> None:
        pos = os.path.join(tmp, f"{name}-{start}.pos")
        with open(pos, "wb") as f:
            f.write(bytes(POSITION.size))
        err = os.path.join(tmp, f"{name}-{start}.err")
        cmd = [sys.executable, "-m", "derecho_core.testing.fuzz", "--worker", name, "--seed", str(seed),
               "--start", str(start), "--count", str(count), "--timeout", str(timeout), "--position", pos,
               "--memory-mb", str(memory_mb)]
        with open(err, "wb") as errf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf, text=True,
                                    start_new_session=True)
        r = _Running(name, start, count, proc, pos, err)
        running.append(r)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put((r, line))
            lines.put((r, None))

        threading.Thread(target=read, daemon=True).start()

    def describe(name: str, index: int) -> dict[str, Any]:
        """The input that killed a worker, described by a fresh process (harnesses patch the modules they load)."""
        cmd = [sys.executable, "-m", "derecho_core.testing.fuzz", "--describe", f"{name}:{index}", "--seed", str(seed)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            return json.loads(out.stdout.strip().splitlines()[-1])
        except Exception as exc:  # describing must not stop the campaign
            return {"describe_error": repr(exc)}

    def finish(r: _Running, how: str) -> None:
        """A worker that ended without its final line: it died (crash) or the watchdog killed it (hang)."""
        running.remove(r)
        results[r.name].seconds += time.monotonic() - r.started
        with open(r.position_path, "rb") as f:
            cur, state_from, n, acc, rej, cr, hg = POSITION.unpack(f.read(POSITION.size))
        tail = Path(r.stderr_path).read_text(errors="replace")[-6000:]
        if not r.ready:
            raise RuntimeError(f"fuzz worker for {r.name} failed to start ({how}):\n{tail}")
        cur = max(cur, r.start)
        res = results[r.name]
        res.stats.add({"inputs": n + 1, "accepted": acc, "rejected": rej, "crashes": cr + (how != "hang"),
                       "hangs": hg + (how == "hang"), "max_seconds": r.progress.max_seconds,
                       "slow_inputs": r.progress.slow_inputs, "slowest_index": r.progress.slowest_index})
        bar.update(n + 1 - r.done)
        kind = "hang" if how == "hang" else "crash"
        signature = (f"hang: no progress for {stuck_after:.0f} s (killed by the watchdog)" if how == "hang"
                     else f"worker process died ({how})")
        res.add_finding({"kind": kind, "signature": signature, "index": cur, "state_from": state_from,
                         "exc_type": how, "message": "", "traceback": tail or "(no output)",
                         "input": describe(r.name, cur), "seconds": 0.0})
        bar.write(f"{r.name}: input {cur}: {signature}")
        remaining = r.start + r.count - (cur + 1)
        if remaining > 0:
            tasks.appendleft((r.name, cur + 1, remaining))
        _remove_workdir(r.proc.pid)

    try:
        while tasks or running:
            while tasks and len(running) < jobs:
                launch(*tasks.popleft())
            try:
                r, line = lines.get(timeout=0.5)
            except queue.Empty:
                r, line = None, None
            if r is not None and r in running:
                r.last_line = time.monotonic()
                if line is None:
                    code = r.proc.wait()
                    if not r.ended:
                        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                        finish(r, how)
                    else:
                        running.remove(r)
                    continue
                msg = json.loads(line)
                t = msg.pop("t")
                if t == "ready":
                    r.ready = True
                    results[r.name].setup_seconds += msg.get("setup_seconds", 0.0)
                elif t == "progress":
                    bar.update(msg["inputs"] - r.done)
                    r.done = msg["inputs"]
                    r.progress = Stats(**msg)
                elif t == "finding":
                    results[r.name].add_finding(msg)
                    if msg.get("traceback"):
                        bar.write(f"{r.name}: input {msg['index']}: {msg['kind']}: {msg['signature']}")
                elif t == "end":
                    bar.update(msg["inputs"] - r.done)
                    r.done = msg["inputs"]
                    results[r.name].stats.add(msg)
                    results[r.name].seconds += time.monotonic() - r.started
                    r.ended = True
            now = time.monotonic()
            for r in list(running):
                limit = stuck_after if r.ready else max(120.0, stuck_after)
                if not r.ended and now - r.last_line > limit and r.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(r.proc.pid, signal.SIGKILL)
                    r.proc.wait()
                    finish(r, "hang")
    finally:
        bar.close()
        for r in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return [results[n] for n in names]


# ============================================================================ live targets


LIVE_KINDS = {
    # kind: (port key, weight, what it sends)
    "sst.raw": ("sst_port", 0.12, "random or mutated bytes where the transport expects a handshake (a HELLO "
                                  "that still parses never claims a member's id: see _not_a_member)"),
    "sst.frames": ("sst_port", 0.30, "a valid handshake (a non-member node id), then garbage frames on every "
                                     "channel: membership, multicast, blocks, progress, RPC requests and replies, "
                                     "barriers"),
    "gms": ("gms_port", 0.18, "GMS frames holding mutated JOIN, JOIN_REPLY and WELCOME messages, or garbage"),
    "external.raw": ("external_port", 0.06, "random or mutated bytes where a client HELLO is expected"),
    "external.session": ("external_port", 0.20, "a valid client HELLO, then mutated GET_VIEW, GET_STATUS and "
                                                "P2P_REQUEST frames (calls of the member's p2p method included)"),
    "state_transfer": ("state_transfer_port", 0.14, "mutated state-transfer HELLO frames, or garbage"),
}


class _LiveCorpus(Harness):
    """Seeds for the live connections (no decoder of its own: it only generates)."""

    name = "live"
    tokens = MEMBERSHIP_TOKENS + MULTICAST_TOKENS + EXTERNAL_TOKENS + ST_TOKENS

    def setup(self) -> None:
        from .. import external_server as es
        from .. import gms_channel as gc
        from .. import state_transfer as st
        from ..rpc import methods, wire

        self.es, self.st = es, st
        worlds = [sim_world(k) for k in ("ordered", "rdmc")]
        rng = random.Random(5)
        self.member = [_member_seed(d) for w in worlds for _, _, d in _sample(w.member_msgs, 120, rng)]
        ser = wire.Serializer("msgpack")
        read = methods.rpc_name("read")
        self.member += [Seed([0, read, 1, ser.dumps([[]])], lambda o: b"Q" + msgpack.packb(o, use_bin_type=True)),
                        Seed([[wire.P2P, 1, wire.OK, ser.dumps(1)]], lambda o: b"R" + msgpack.packb(o)),
                        Seed([2, 1], lambda o: b"B" + msgpack.packb(o))]
        gms = gc.GmsChannel.detached(None)
        self.gms = [Seed(msgpack.unpackb(d, raw=False), lambda o: gms._frame(msgpack.packb(o, use_bin_type=True)))
                    for w in worlds for _, _, d in w.gms_msgs]
        self.gms.append(Seed(msgpack.unpackb(_join_message(1_000_000, 5), raw=False),
                             lambda o: gms._frame(msgpack.packb(o, use_bin_type=True))))
        self.ext_bodies: list[tuple[int, Any]] = [(es.K_GET_VIEW, [1]), (es.K_GET_STATUS, [2]),
                                                  (es.K_P2P_REQUEST, [0, read, 3, ser.dumps([[]])]),
                                                  (es.K_P2P_REQUEST, [0, read, 4, ser.dumps([[1], {"x": 2}])])]
        hello = {"v": st.PROTOCOL_VERSION, "vid": 7, "sg": 0, "node": 1, "nonce": NONCE_L}
        self.st_seeds = [Seed(hello, lambda o: _st_frames(None, st._LEADER, b"", 0,
                                                          [(st.K_HELLO, msgpack.packb(o, use_bin_type=True))]))]
        pair = _handshake_pair(None)
        self.hs_seeds = [raw_seed(pair["hello"]), raw_seed(pair["hello"] + pair["confirm"]), raw_seed(pair["refuse"])]


def _not_a_member(data: bytes, members: Sequence[int] = (0, 1, 2)) -> bytes:
    """``data`` with the node id of a leading valid HELLO moved off the members' ids.

    Without a cluster key nothing proves a node id: a HELLO that claims a member's id with a new
    incarnation replaces that member's connection, and the member is suspected and removed. That is
    what "no key" means, not a decoder fault, so the open live run stays clear of it; the keyed run
    (``--live-keyed``) does claim ids and must be refused at the door (docs/fuzzing.md).
    """
    from .. import handshake as hs

    try:
        got = hs.decode_record(data)
        if got is not None and got[0].kind in (hs.KIND_HELLO, hs.KIND_WELCOME) and \
                hs.parse_hello(got[0]).node_id in members:
            at = hs.RECORD_HEADER.size
            return data[:at] + struct.pack("<I", 9) + data[at + 4:]
    except Exception:  # not a record: garbage as it is
        pass
    return data


def _recv_some(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(1 << 16)
    except (TimeoutError, OSError):
        return b""


def _live_connection(kind: str, port: int, corpus: _LiveCorpus, rng: random.Random, target_id: int,
                     counts: collections.Counter[str], impersonate: bool = False) -> None:
    """Open one connection to the member, send this kind's garbage, close. Counts what happened."""
    from .. import handshake as hs

    m = corpus.mutator
    m.rng = rng
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=3.0)
    except OSError as exc:
        counts[f"{kind}: connect failed ({type(exc).__name__})"] += 1
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # close with a reset: tens of thousands of connections would otherwise leave as many TIME_WAITs,
        # and loopback runs out of ports (connects then time out: the harness's problem, not the member's)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if kind == "sst.raw":
            data = corpus.fuzz_bytes(rng, corpus.hs_seeds)
            sock.sendall(data if impersonate else _not_a_member(data))
        elif kind == "sst.frames":
            from derecho_transport_sockets.transport import FRAME, K_BYE, K_DATA

            me = rng.choice([0, 1, 2]) if impersonate and rng.random() < 0.3 else rng.randrange(1000, 60_000)
            h = hs.Handshake("initiator", me, rng.getrandbits(63) | 1, expected_peer=target_id)
            sock.sendall(h.start())
            deadline = time.monotonic() + 3.0
            while not h.done and time.monotonic() < deadline:
                data = _recv_some(sock, 3.0)
                if not data:
                    break
                out = h.receive(data)
                if out:
                    sock.sendall(out)
            if not h.done:
                counts["sst.frames: handshake not completed"] += 1
                return
            counts["sst.frames: handshakes completed"] += 1
            frames = bytearray()
            n_frames = rng.choice([1, 2, 4, 8, 16])
            counts["sst.frames: frames"] += n_frames
            for _ in range(n_frames):
                payload = corpus.fuzz_bytes(rng, corpus.member)
                x = rng.random()
                if x < 0.9:
                    frames += FRAME.pack(len(payload), K_DATA) + payload
                elif x < 0.95:
                    frames += FRAME.pack(rng.choice(INTERESTING_INTS) & M32, rng.choice([0, 2, 255])) + payload
                else:
                    frames += FRAME.pack(0, K_BYE)
            sock.sendall(bytes(frames))
        elif kind == "gms":
            sock.sendall(corpus.fuzz_bytes(rng, corpus.gms))
        elif kind == "external.raw":
            es = corpus.es
            sock.sendall(m.mutate_bytes(corpus.es.FrameCodec(None, client_side=True).encode(
                es.K_HELLO, [rng.randrange(1000, 1 << 20), bytes(32)])) if rng.random() < 0.7 else m.random_bytes())
        elif kind == "external.session":
            es = corpus.es
            codec = es.FrameCodec(None, client_side=True)
            codec.nonce_c = rng.randbytes(32)
            sock.sendall(codec.encode(es.K_HELLO, [rng.randrange(1000, 1 << 30), codec.nonce_c]))
            if not _recv_some(sock, 3.0):
                counts["external.session: no WELCOME"] += 1
                return
            out = bytearray()
            n_frames = rng.choice([1, 2, 4, 8])
            counts["external.session: frames"] += n_frames
            for _ in range(n_frames):
                kind_, body = rng.choice(corpus.ext_bodies)
                if rng.random() < 0.7:
                    body = m.mutate_tree(body)
                if rng.random() < 0.05:
                    kind_ = rng.randrange(256)
                try:
                    frame = codec.encode(kind_, body)
                except Exception:
                    frame = codec.encode(es.K_GET_VIEW, [5])
                out += m.mutate_bytes(frame) if rng.random() < 0.15 else frame
            sock.sendall(bytes(out))
            _recv_some(sock, 0.05)
        elif kind == "state_transfer":
            sock.sendall(corpus.fuzz_bytes(rng, corpus.st_seeds))
        counts[f"{kind}: connections"] += 1
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        _recv_some(sock, 0.01)
    except OSError as exc:
        counts[f"{kind}: closed by the member ({type(exc).__name__})"] += 1
    except Exception as exc:  # a handshake the member refused, and the like
        counts[f"{kind}: {type(exc).__name__}"] += 1
    finally:
        sock.close()


def _fatal_lines(lines: list[str]) -> list[int]:
    """Where a member logged that it stops: its engine failed, or it stopped with an error."""
    return [i for i, ln in enumerate(lines) if "engine of node" in ln and "failed" in ln
            or "internal error in the engine" in ln]


def live_group(workdir: Path, settings: dict[str, Any]) -> Any:
    """The live targets' group (not started): 3 ``rpc_member`` processes, every member in the shard."""
    from .processes import LocalGroup

    return LocalGroup(workdir, settings=settings,
                      program=["-m", "derecho_core.testing.rpc_member", "--min-shard", "2"])


def start_live_group(group: Any) -> None:
    """Start the 3 members (node 0 first: it is the contact) and wait until all are in one view."""
    group.start(0)
    time.sleep(0.3)
    group.start(1)
    group.start(2)
    for m in group.members.values():
        m.wait_for_view([0, 1, 2], 120)


def run_live(connections: int, seed: int = 0, *, node: int = 1, progress: bool = True,
             workdir: Path | None = None, cluster_key: bool = False) -> dict[str, Any]:
    """Start a 3-member group, throw ``connections`` connections of garbage at member ``node``, check it.

    Without a cluster key (the default) the garbage reaches every decoder behind the handshakes, and no
    connection claims a member's node id (that is what the key is for). With ``cluster_key`` the group
    has one and the fuzzer does not: everything must be refused at the door, member ids included.
    """
    import shutil

    from tqdm import tqdm

    started = time.monotonic()
    tmp = workdir or Path(tempfile.mkdtemp(prefix="derecho-fuzz-live-"))
    settings: dict[str, Any] = {"PERS/file_path": str(tmp / "plog")}
    if cluster_key:
        (tmp / "cluster.key").write_bytes(os.urandom(32).hex().encode())
        settings["DERECHO/cluster_key_file"] = str(tmp / "cluster.key")
    group = live_group(tmp, settings)
    report: dict[str, Any] = {"kind": "live", "node": node, "cluster_key": cluster_key, "connections": 0,
                              "by_kind": {}, "crashes": 0, "hangs": 0, "checks": {}, "findings": []}
    try:
        start_live_group(group)
        target = group.members[node]
        vid_before = target.last_vid()
        ports = group.ports[node]
        corpus = _LiveCorpus()
        corpus.setup()
        rng = random.Random(f"{seed}/live")
        kinds = list(LIVE_KINDS)
        weights = [LIVE_KINDS[k][1] for k in kinds]
        counts: collections.Counter[str] = collections.Counter()
        per_kind: collections.Counter[str] = collections.Counter()
        bar = tqdm(total=connections, unit="conn", dynamic_ncols=True, disable=not progress, desc="live")
        died = False
        for i in range(connections):
            kind = rng.choices(kinds, weights)[0]
            per_kind[kind] += 1
            _live_connection(kind, ports[LIVE_KINDS[kind][0]], corpus, input_rng(seed, f"live/{kind}", i),
                             node, counts, impersonate=cluster_key)
            bar.update(1)
            if i % 250 == 249 and (target.proc.poll() is not None or _fatal_lines(target.stderr)):
                died = True  # the process, or its engine thread, is gone: no use going on
                report["stopped_after"] = i + 1
                break
        bar.close()
        report["connections"] = sum(per_kind.values())
        report["by_kind"] = {k: {"connections": per_kind[k], "port": LIVE_KINDS[k][0],
                                 "sends": LIVE_KINDS[k][2]} for k in kinds}
        report["events"] = dict(sorted(counts.items()))
        time.sleep(1.0)
        checks = report["checks"]
        alive = {nid: m.proc.poll() is None and not _fatal_lines(m.stderr) for nid, m in group.members.items()}
        checks["alive"] = alive
        if died or not all(alive.values()):
            report["crashes"] += 1
            fatal = _fatal_lines(target.stderr)
            report["findings"].append({"kind": "crash", "signature": "a member process (or its engine) died",
                                       "stderr": "".join(target.stderr[fatal[0]:fatal[0] + 60] if fatal
                                                         else target.stderr[-40:])})
        else:
            views = {nid: m.views()[-1] for nid, m in group.members.items()}
            checks["views"] = {nid: {"vid": v["vid"], "members": v["members"]} for nid, v in views.items()}
            checks["view_changes_during_barrage"] = target.last_vid() - vid_before
            in_view = all(node in v["members"] and sorted(v["members"]) == [0, 1, 2] for v in views.values())
            checks["still_in_view"] = in_view
            if not in_view:
                report["crashes"] += 1
                report["findings"].append({"kind": "crash", "signature": "the member left the view",
                                           "views": checks["views"]})
            bursts = {}
            for sender in sorted({node, 0}):
                m = group.members[sender]
                n = len(m.events)
                try:
                    m.command("burst 10")
                    bursts[sender] = m.event("burst", 60, after=n)["replies"]
                except (TimeoutError, OSError):  # OSError: the member died (its stdin is a broken pipe)
                    bursts[sender] = None
            checks["burst_10"] = bursts
            ok = all(b is not None and all(b.get(str(x), {}).get("ok") == 10 for x in (0, 1, 2))
                     for b in bursts.values())
            checks["burst_ok"] = ok
            digests = {}
            for nid, m in group.members.items():
                n = len(m.events)
                try:
                    m.command("digest")
                    d = m.event("digest", 60, after=n)
                    digests[nid] = {"state": d["state"], "logs": d["logs"], "value": d["value"]}
                except (TimeoutError, OSError):
                    digests[nid] = None
            checks["digests"] = digests
            same = all(d is not None for d in digests.values()) and \
                len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
            checks["digests_equal"] = same
            dead = {nid: m.proc.poll() for nid, m in group.members.items() if m.proc.poll() is not None}
            if dead:
                checks["died_during_checks"] = dead
                report["crashes"] += 1
                report["findings"].append({"kind": "crash", "signature": "a member process died during the checks",
                                           "exit": dead, "stderr": {nid: "".join(group.members[nid].stderr[-60:])
                                                                    for nid in dead}})
            elif not ok or not same:
                report["hangs"] += 1
                report["findings"].append({"kind": "hang", "signature": "the member stopped answering or diverged",
                                           "checks": {k: checks[k] for k in ("burst_10", "digests")},
                                           "stderr": "".join(target.stderr[-40:])})
        lines = [ln for m in group.members.values() for ln in m.stderr]
        tracebacks = [i for i, ln in enumerate(lines) if "Traceback (most recent call last)" in ln]
        suspicious = [ln.strip() for ln in lines if any(w in ln for w in (
            "unexpected error", "internal error", "caught an error", "Segmentation", "engine of node"))]
        checks["stderr_lines"] = len(lines)
        checks["stderr_warnings"] = sum(1 for ln in lines if "WARNING" in ln)
        checks["stderr_tracebacks"] = len(tracebacks)
        kinds: collections.Counter[str] = collections.Counter()
        for ln in lines:
            if "WARNING" in ln or "ERROR" in ln:
                text = ln.split("WARNING", 1)[-1].split("ERROR", 1)[-1]
                text = "".join("#" if c.isdigit() else c for c in text.strip())[:90]
                kinds[text] += 1
        checks["log_messages"] = dict(kinds.most_common(25))
        if tracebacks or suspicious:
            report["crashes"] += len(tracebacks) or 1
            report["findings"].append({"kind": "crash", "signature": "tracebacks or unexpected errors in the "
                                       "members' logs", "samples": ["".join(lines[i:i + 25]) for i in tracebacks[:5]]
                                       + suspicious[:10]})
    finally:
        group.close()
        report["seconds"] = round(time.monotonic() - started, 1)
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# ============================================================================ report and command line


def build_report(seed: int, results: list[TargetResult], live: dict[str, Any] | None, seconds: float,
                 timeout: float, live_keyed: dict[str, Any] | None = None) -> dict[str, Any]:
    targets = [r.as_dict(seed) for r in results]
    totals = {k: sum(t[k] for t in targets) for k in ("inputs", "accepted", "rejected", "crashes", "hangs")}
    for lv in (live, live_keyed):
        if lv is not None:
            totals["inputs"] += lv["connections"]
            totals["crashes"] += lv["crashes"]
            totals["hangs"] += lv["hangs"]
    try:
        import atheris  # noqa: F401

        atheris_state = "installed (python -m derecho_core.testing.fuzz --atheris TARGET)"
    except ImportError:
        atheris_state = "not installed"
    return {"format": 1, "seed": seed, "timeout_s": timeout, "seconds": round(seconds, 1),
            "python": sys.version.split()[0], "msgpack": ".".join(map(str, msgpack.version)),
            "atheris": atheris_state, "totals": totals, "targets": targets, "live": live, "live_keyed": live_keyed}


def format_table(report: dict[str, Any]) -> str:
    rows = [("target", "inputs", "accepted", "rejected", "crashes", "hangs", "max ms")]
    for t in report["targets"]:
        rows.append((t["name"], f"{t['inputs']:,}", f"{t['accepted']:,}", f"{t['rejected']:,}", str(t["crashes"]),
                     str(t["hangs"]), f"{t['max_seconds'] * 1000:.0f}"))
    lives = [lv for lv in (report.get("live"), report.get("live_keyed")) if lv]
    for live in lives:
        rows.append((f"live (member {live['node']}, all ports{', cluster key' if live.get('cluster_key') else ''})",
                     f"{live['connections']:,}", "-", "-", str(live["crashes"]), str(live["hangs"]), "-"))
    tot = report["totals"]
    rows.append(("TOTAL", f"{tot['inputs']:,}", f"{tot['accepted']:,}", f"{tot['rejected']:,}", str(tot["crashes"]),
                 str(tot["hangs"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0 or j == len(rows) - 2:
            out.append("  ".join("-" * w for w in widths))
    findings = [(t["name"], f) for t in report["targets"] for f in t["findings"]]
    if findings:
        out.append("")
        out.append("findings:")
        for name, f in findings:
            ex = f["examples"][0] if f["examples"] else {}
            out.append(f"  {name}: {f['kind']} x{f['count']}: {f['signature']}")
            if ex:
                out.append(f"      replay: {ex.get('replay', '')}")
    for live in lives:
        if live.get("findings"):
            out.append("live findings" + (" (cluster key)" if live.get("cluster_key") else "") + ":")
            for f in live["findings"]:
                out.append(f"  {f['kind']}: {f['signature']}")
    return "\n".join(out)


def run_atheris(name: str, runs: int, seed: int, timeout: float) -> int:
    """Coverage-guided fuzzing of one target with atheris (libFuzzer), in this process.

    A target whose inputs are bytes gets libFuzzer's bytes; any other target gets the input its own
    generator makes from a ``random.Random`` seeded with libFuzzer's bytes, so coverage guides the
    choice of seeds, mutations and event sequences. Prints the counts as JSON at the end. A crash or a
    hang stops libFuzzer with its own report (and a crash-* / timeout-* file holding the input).
    """
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); the default engine needs nothing", file=sys.stderr)
        return 2
    patch_for_fuzzing()
    os.chdir(_workdir())
    logging.getLogger().setLevel(logging.CRITICAL)
    h = TARGETS[name]()
    h.setup()
    h.reset()
    corpus = Path(tempfile.mkdtemp(prefix=f"derecho-atheris-{name}-"))
    raw = isinstance(h.generate(random.Random(0)), (bytes, bytearray))
    for i, s in enumerate(h.seeds if raw else []):
        (corpus / f"seed{i}").write_bytes(s.data)
    counts: collections.Counter[str] = collections.Counter()

    def report() -> None:  # libFuzzer leaves with _exit: no atexit, so say it as we go
        print(json.dumps({"target": name, "engine": "atheris", **counts}), flush=True)

    def one(data: bytes) -> None:
        counts["inputs"] += 1
        if h.reset_every and counts["inputs"] % h.reset_every == 0:
            h.reset()
        h.index = counts["inputs"]
        value = data if raw else h.generate(random.Random(data))
        try:
            counts["accepted" if h.run(value) else "rejected"] += 1
        except h.documented:
            counts["rejected"] += 1
        except Exception:
            counts["crashes"] += 1
            report()
            raise
        if counts["inputs"] % 10_000 == 0 or counts["inputs"] == runs:
            report()

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed or 1}", f"-timeout={max(1, int(timeout))}",
                   "-rss_limit_mb=4096", "-print_final_stats=1", str(corpus)], one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m derecho_core.testing.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=20_000, help="in-process inputs in total, over the targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", help="comma-separated target names (default: all; see --list)")
    p.add_argument("--json", metavar="FILE", help="write the report here")
    p.add_argument("--live", type=int, default=0, metavar="N", help="also N live connections to a real group")
    p.add_argument("--live-node", type=int, default=1, help="the member the live connections go to (default 1)")
    p.add_argument("--live-keyed", type=int, default=0, metavar="N",
                   help="also N live connections to a group with a cluster key (the fuzzer has none, and may "
                        "claim member ids: everything must be refused)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes at a time")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds after which an input is a hang")
    p.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB, help="address space limit of a worker")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--replay", metavar="TARGET:INDEX", help="run one recorded input again, with its traceback")
    p.add_argument("--from", dest="state_from", type=int, help="with --replay: the input its state started at")
    p.add_argument("--atheris", metavar="TARGET", help="coverage-guided fuzzing of one target with atheris")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--describe", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--position", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return _worker(args.worker, args.seed, args.start, args.count, args.timeout, args.position, args.memory_mb)
    if args.list:
        for name in default_targets():
            cls = TARGETS[name]
            print(f"{name:24s} {cls.description}\n{'':24s} documented: {cls.contract}")
        return 0
    if args.describe:
        name, _, index = args.describe.rpartition(":")
        patch_for_fuzzing()
        os.chdir(_workdir())
        logging.getLogger().setLevel(logging.CRITICAL)
        h = TARGETS[name]()
        h.setup()
        h.reset()
        h.index = int(index)
        print(json.dumps(h.describe(h.generate(input_rng(args.seed, name, int(index)))), default=repr))
        return 0
    if args.replay:
        name, _, index = args.replay.rpartition(":")
        patch_for_fuzzing()
        os.chdir(_workdir())
        h = TARGETS[name]()
        h.setup()
        i = int(index)
        first = args.state_from if args.state_from is not None else (
            i - i % h.reset_every if h.reset_every else i)
        run_inputs(h, args.seed, i, 1, timeout=args.timeout, state_from=first, replay=i)
        h.close()
        return 0
    if args.atheris:
        return run_atheris(args.atheris, args.inputs, args.seed, args.timeout)

    started = time.monotonic()
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    results = run_fuzz(args.inputs, args.seed, targets, jobs=args.jobs, timeout=args.timeout,
                       memory_mb=args.memory_mb, progress=not args.no_progress) if args.inputs > 0 else []
    live = run_live(args.live, args.seed, node=args.live_node, progress=not args.no_progress) if args.live else None
    keyed = run_live(args.live_keyed, args.seed, node=args.live_node, progress=not args.no_progress,
                     cluster_key=True) if args.live_keyed else None
    report = build_report(args.seed, results, live, time.monotonic() - started, args.timeout, keyed)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=repr) + "\n")
        print(f"report written to {args.json}")
    return 1 if report["totals"]["crashes"] or report["totals"]["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
