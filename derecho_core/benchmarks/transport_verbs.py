"""``derecho bench transport_verbs``: the libfabric transport (derecho-transport-verbs) against its baselines.

Measured between two processes on 127.0.0.1, all in the same run:

* **ping-pong**: 64-byte messages bounced; one-way latency = round trip / 2,
  p50 and p99 in µs;
* **streaming**: 1 MiB and 64 MiB messages sent back to back, then one
  acknowledgement; GB/s (10^9 bytes/s) of payload;
* for each libfabric provider (``--providers``, default ``tcp``): the
  transport contract's messages (small ones eager, large ones by the
  provider's rendezvous), and its RMA capability (one-sided ``fi_write`` of
  each message into a registered region at the peer, the last one with
  delivery completion);
* baselines: plain blocking Python sockets (``sendall``/``recv_into``,
  length prefix, TCP_NODELAY) and libfabric's own ``fi_pingpong -p tcp -e
  rdm`` (``libfabric-bin``; a mean one-way latency).

Each figure is the median of ``--runs`` runs (interleaved, so a noisy
neighbour hurts every row alike); ratios are to the plain-socket median.
Targets (issue 4): ping-pong p50 <= 0.5x plain, streaming >= 1.2x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

HOST = "127.0.0.1"
MiB = 1 << 20
HDR = struct.Struct("<IB")  # plain baseline frame: length, kind
K_ECHO, K_SINK, K_ACK, K_REGION = 0, 1, 2, 3
STREAMS = ((MiB, 256), (64 * MiB, 8))
QUICK_STREAMS = ((MiB, 32), (64 * MiB, 2))


# ----------------------------------------------------------------------------- servers (subprocess side)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise EOFError
        got += r


def _serve_plain(port_out: Any) -> None:
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(1)
    port_out(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 * MiB)
    mv = memoryview(buf)
    hdr = bytearray(HDR.size)
    try:
        while True:
            _recv_exact(conn, memoryview(hdr))
            length, kind = HDR.unpack(hdr)
            _recv_exact(conn, mv[:length])
            if kind == K_ECHO:
                conn.sendall(bytes(hdr) + bytes(mv[:length]))
            elif kind == K_ACK:
                conn.sendall(HDR.pack(1, K_ACK) + b"A")
    except (EOFError, OSError):
        pass


def _conf(provider: str, busy_wait_ms: int | None) -> Any:
    from ..conf import Conf

    o: dict[str, Any] = {"RDMA/provider": provider, "RDMA/domain": "lo" if provider != "shm" else ""}
    if busy_wait_ms is not None:
        o["DERECHO/p2p_loop_busy_wait_before_sleep_ms"] = busy_wait_ms
    return Conf.load(overrides=o, environ={})


_SERVED: list[Any] = []


def _serve_verbs(provider: str, port_out: Any, busy_wait_ms: int | None) -> None:
    from ..transport import MessageReceived, TransportClosedError, open_transport

    t = open_transport(_conf(provider, busy_wait_ms), 2, (HOST, 0), provider)
    _SERVED.append(t)
    port_out(t.listen()[1])
    region = None
    while True:
        try:
            evs = t.poll(1.0)
        except TransportClosedError:
            return
        for ev in evs:
            if not isinstance(ev, MessageReceived):
                continue
            data = ev.data
            kind = data[0] if len(data) else K_SINK
            if kind == K_ECHO:
                t.send(ev.node_id, [data])
            elif kind == K_ACK:
                t.send(ev.node_id, [b"\x02A"])
            elif kind == K_REGION and t.rma is not None:
                (size,) = struct.unpack_from("<Q", data, 1)
                if region is not None:
                    t.rma.deregister(region)
                region = t.rma.register(bytearray(size))
                t.send(ev.node_id, [b"\x03", region.descriptor])


def _server_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", required=True)
    ap.add_argument("--busy-wait-ms", type=int, default=None)
    a = ap.parse_args(argv)

    def port_out(p: int) -> None:
        print(p, flush=True)

    import threading

    def watch_stdin() -> None:
        sys.stdin.read()
        for t in _SERVED:  # close the endpoint: shm would leave its file in /dev/shm otherwise
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    if a.serve == "plain":
        _serve_plain(port_out)
    else:
        _serve_verbs(a.serve, port_out, a.busy_wait_ms)
    return 0


class _Server:
    def __init__(self, kind: str, busy_wait_ms: int | None):
        cmd = [sys.executable, "-m", "derecho_core.benchmarks.transport_verbs", "--serve", kind]
        if busy_wait_ms is not None:
            cmd += ["--busy-wait-ms", str(busy_wait_ms)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip():
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"{kind} server did not start: {err.strip()[-500:]}")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin:
            try:
                self.proc.stdin.close()  # the server closes its transport and exits
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


# ----------------------------------------------------------------------------- clients


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _plain_run(iters: int, streams: tuple[tuple[int, int], ...]) -> dict[str, float]:
    srv = _Server("plain", None)
    try:
        s = socket.create_connection((HOST, srv.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out: dict[str, float] = {}
        msg = HDR.pack(64, K_ECHO) + bytes(64)
        bv = memoryview(bytearray(len(msg)))
        lat = []
        for i in range(iters + iters // 10):
            t0 = time.perf_counter()
            s.sendall(msg)
            _recv_exact(s, bv)
            if i >= iters // 10:
                lat.append((time.perf_counter() - t0) / 2)
        out["p50_us"] = _pct(lat, 0.5) * 1e6
        out["p99_us"] = _pct(lat, 0.99) * 1e6
        ack = memoryview(bytearray(HDR.size + 1))
        for size, count in streams:
            data = bytes(size)
            hdr = HDR.pack(size, K_SINK)
            t0 = time.perf_counter()
            for _ in range(count):
                s.sendall(hdr)
                s.sendall(data)
            s.sendall(HDR.pack(0, K_ACK))
            _recv_exact(s, ack)
            out[f"stream_{size // MiB}MiB_GBps"] = size * count / (time.perf_counter() - t0) / 1e9
        s.close()
        return out
    finally:
        srv.stop()


def _verbs_run(provider: str, iters: int, streams: tuple[tuple[int, int], ...],
               busy_wait_ms: int | None) -> tuple[dict[str, float], dict[str, float]]:
    """(message figures, RMA figures) for one run against a fresh server process."""
    from ..transport import MessageReceived, PeerConnected, PeerFailed, RMAWriteCompleted, open_transport

    srv = _Server(provider, busy_wait_ms)
    t = None
    try:
        t = open_transport(_conf(provider, busy_wait_ms), 1, (HOST, 0), provider)
        t.listen()
        t.connect(2, (HOST, srv.port))
        deadline = time.monotonic() + 20
        while True:
            evs = t.poll(0.5)
            if any(isinstance(e, PeerConnected) for e in evs):
                break
            failed = [e for e in evs if isinstance(e, PeerFailed)]
            if failed:
                raise RuntimeError(f"could not connect: {failed[0].reason}")
            if time.monotonic() > deadline:
                raise RuntimeError("could not connect within 20 s")

        def wait_for(kind: type) -> Any:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                for e in t.poll(5.0):
                    if isinstance(e, kind):
                        return e
                    if isinstance(e, PeerFailed):
                        raise RuntimeError(f"server failed: {e.reason}")
            raise RuntimeError(f"no {kind.__name__} within 60 s")

        out: dict[str, float] = {}
        head, body = b"\x00", bytes(63)
        for _ in range(50):  # warm up: the first sends set up libfabric's connection (-FI_EAGAIN storm)
            t.send(2, [head, body])
            wait_for(MessageReceived)
        lat = []
        for i in range(iters + iters // 10):
            t0 = time.perf_counter()
            t.send(2, [head, body])
            wait_for(MessageReceived)
            if i >= iters // 10:
                lat.append((time.perf_counter() - t0) / 2)
        out["p50_us"] = _pct(lat, 0.5) * 1e6
        out["p99_us"] = _pct(lat, 0.99) * 1e6
        for size, count in streams:
            data = bytes(size)
            t.send(2, [b"\x01", data])  # warm-up message of this size
            t.send(2, [b"\x02"])
            wait_for(MessageReceived)
            t0 = time.perf_counter()
            for _ in range(count):
                t.send(2, [b"\x01", data])
            t.send(2, [b"\x02"])
            wait_for(MessageReceived)
            out[f"stream_{size // MiB}MiB_GBps"] = size * count / (time.perf_counter() - t0) / 1e9
        rma: dict[str, float] = {}
        if t.rma is not None:
            for size, count in streams:
                t.send(2, [b"\x03", struct.pack("<Q", size)])
                reply = wait_for(MessageReceived).data
                remote = t.rma.remote_region(2, bytes(reply[1:]))
                data = bytearray(size)
                local = t.rma.register(data)  # a registered source, as the SST and RDMC would use
                t0 = time.perf_counter()
                for i in range(count):
                    token = "last" if i == count - 1 else None  # the last one with delivery completion
                    while not t.rma.write(remote, 0, data, token=token):
                        t.poll(0)
                wait_for(RMAWriteCompleted)
                rma[f"stream_{size // MiB}MiB_GBps"] = size * count / (time.perf_counter() - t0) / 1e9
                t.rma.deregister(local)
        return out, rma
    finally:
        if t is not None:
            t.close()
        srv.stop()


def _fi_pingpong(size: int, iters: int, timeout: float = 30.0) -> dict[str, float] | None:
    exe = shutil.which("fi_pingpong")
    if exe is None:
        return None
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FI_TCP_IFACE="lo")
    common = [exe, "-p", "tcp", "-e", "rdm", "-I", str(iters), "-S", str(size)]
    server = subprocess.Popen(common + ["-B", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        time.sleep(0.3)
        client = subprocess.run(common + ["-P", str(port), HOST], capture_output=True, text=True,
                                timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()
    for line in client.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0] == str(size):
            return {"MBps": float(parts[5]), "usec_per_xfer": float(parts[6])}
    return None


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--providers", default="tcp",
                        help="comma list of libfabric providers registered by derecho-transport-verbs "
                             "(default tcp; e.g. tcp,shm)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--iters", type=int, default=2000, help="ping-pong round trips per run (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smaller volumes (for tests)")
    parser.add_argument("--busy-wait-ms", type=int, default=None,
                        help="override [DERECHO] p2p_loop_busy_wait_before_sleep_ms (default: the config default)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON record to FILE")


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run(args: argparse.Namespace) -> int:
    try:
        from derecho_transport_verbs import fabric
    except ImportError:
        print("derecho bench transport_verbs: derecho-transport-verbs is not installed "
              "(pip install derecho-transport-verbs)", file=sys.stderr)
        return 1
    ok, why = fabric.available()
    if not ok:
        print(f"derecho bench transport_verbs: {why}", file=sys.stderr)
        return 1
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    iters = 300 if args.quick else args.iters
    streams = QUICK_STREAMS if args.quick else STREAMS
    runs = max(1, args.runs)
    raw: dict[str, list[dict[str, float]]] = {"plain": []}
    errors: dict[str, str] = {}
    for p in providers:
        raw[p] = []
        raw[p + " RMA"] = []
    for _ in range(runs):  # interleaved
        raw["plain"].append(_plain_run(iters, streams))
        for p in providers:
            if p in errors:
                continue
            try:
                msg, rma = _verbs_run(p, iters, streams, args.busy_wait_ms)
            except Exception as exc:  # noqa: BLE001 - report, go on with the others
                errors[p] = f"{type(exc).__name__}: {exc}"
                continue
            raw[p].append(msg)
            if rma:
                raw[p + " RMA"].append(rma)
    lat_runs = [r for r in (_fi_pingpong(64, max(iters, 1000)) for _ in range(runs)) if r]
    base = _median_of(raw["plain"])
    results: dict[str, Any] = {"plain-python-sockets": base}
    keys = [f"stream_{size // MiB}MiB_GBps" for size, _ in streams]
    for name, rs in raw.items():
        if name == "plain" or not rs:
            continue
        m = _median_of(rs)
        if "p50_us" in m:
            m["ratio_p50_vs_plain"] = m["p50_us"] / base["p50_us"]
        for k in keys:
            m[k.replace("_GBps", "_ratio_vs_plain")] = m[k] / base[k]
        results[f"verbs:{name}"] = m
    if lat_runs:
        fi = {"p50_us": statistics.median(r["usec_per_xfer"] for r in lat_runs)}
        fi["ratio_p50_vs_plain"] = fi["p50_us"] / base["p50_us"]
        results["fi_pingpong-tcp"] = fi

    print(f"derecho bench transport_verbs: median of {runs} runs, {iters} round trips, streams "
          + ", ".join(f"{c} x {s // MiB} MiB" for s, c in streams) + "; one-way latency = RTT/2")
    print(f"{'transport':<24}{'p50 us':>9}{'p99 us':>9}{'x plain':>9}"
          + "".join(f"{k.split('_')[1] + ' GB/s':>12}{'x plain':>9}" for k in keys))
    for name, m in results.items():
        if "p50_us" in m:
            row = f"{name:<24}{m['p50_us']:9.1f}{m.get('p99_us', float('nan')):9.1f}" \
                  f"{m.get('ratio_p50_vs_plain', 1.0):9.2f}"
        else:
            row = f"{name:<24}{'-':>9}{'-':>9}{'-':>9}"
        for k in keys:
            if k in m:
                row += f"{m[k]:12.2f}{m.get(k.replace('_GBps', '_ratio_vs_plain'), 1.0):9.2f}"
        print(row)
    if not lat_runs:
        print("fi_pingpong: not on PATH or failed (apt-get install libfabric-bin); libfabric baseline skipped")
    for p, e in errors.items():
        print(f"verbs:{p}: not measured: {e}")
    for name, m in results.items():
        if "p50_us" in m and "p99_us" in m:
            print(f"data_transport_latency {name} 64 {m['p50_us']:.2f} {m['p99_us']:.2f}")
        for k in keys:
            if k in m:
                print(f"data_transport_bw {name} {int(k.split('_')[1][:-3]) * MiB} {m[k]:.3f}")
    record = {"benchmark": "transport_verbs", "runs": runs, "iters": iters, "providers": providers,
              "streams": [{"size": s, "count": c} for s, c in streams], "results": results, "errors": errors,
              "raw": raw, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0 if not errors else 1


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(_server_main(sys.argv[1:]))
    _ap = argparse.ArgumentParser(prog="python -m derecho_core.benchmarks.transport_verbs")
    add_arguments(_ap)
    sys.exit(run(_ap.parse_args()))
