"""``derecho bench transport``: ping-pong latency and streaming bandwidth of each transport plugin.

For every selected provider, and in the same run for the baselines:

* **ping-pong**: 64-byte messages bounced between two processes; one-way
  latency = round trip / 2, p50 and p99 in µs;
* **streaming**: 1 MiB and 64 MiB messages sent back to back, then one
  acknowledgement; GB/s (10^9 bytes per second) of payload.

Baselines: plain blocking Python sockets (``sendall``/``recv_into`` with a
length prefix, TCP_NODELAY) for both figures, and libfabric's own
``fi_pingpong -p tcp -e rdm`` (from ``libfabric-bin``, when on PATH) as the
limit of the hardware and kernel (it reports a mean one-way latency, and a
ping-pong, not streaming, bandwidth). Every figure is the median of
``--runs`` runs; ratios are to the plain-socket baseline of the same run.
All traffic stays on 127.0.0.1.
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
HDR = struct.Struct("<IB")  # plain baseline frame: length, kind
K_ECHO, K_SINK, K_ACK = 0, 1, 2
MiB = 1 << 20
#: default volumes per run: (message size, count)
STREAMS = ((1 * MiB, 256), (64 * MiB, 8))
WARMUP = 3  # messages of each size sent (and acknowledged) before the clock starts
REPLY_TIMEOUT = 60.0  # no step of a run may take longer: a hung transport is reported, not waited for


# ----------------------------------------------------------------------------- servers (subprocess side)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
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
    buf = bytearray(64 * MiB + 16)
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


def _serve_transport(provider: str, port_out: Any, overrides: dict[str, Any]) -> None:
    from ..conf import Conf
    from ..transport import MessageReceived, open_transport

    conf = Conf.load(overrides=overrides, environ={})
    t = open_transport(conf, 2, (HOST, 0), provider)
    port_out(t.listen()[1])
    while True:
        for ev in t.poll(1.0):
            if isinstance(ev, MessageReceived):
                data = ev.data
                kind = data[0] if len(data) else K_SINK
                if kind == K_ECHO:
                    t.send(ev.node_id, [data])
                elif kind == K_ACK:
                    t.send(ev.node_id, [b"\x02A"])


def _server_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", required=True)
    ap.add_argument("--conf", default="{}")
    a = ap.parse_args(argv)

    def port_out(p: int) -> None:
        print(p, flush=True)

    import threading

    def watch_stdin() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    if a.serve == "plain":
        _serve_plain(port_out)
    else:
        _serve_transport(a.serve, port_out, json.loads(a.conf))
    return 0


class _Server:
    def __init__(self, kind: str, overrides: dict[str, Any]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "derecho_core.benchmarks.transport", "--serve", kind,
             "--conf", json.dumps(overrides)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        import select as _select

        ready = _select.select([self.proc.stdout], [], [], 60.0)[0] if self.proc.stdout else []
        line = self.proc.stdout.readline() if ready and self.proc.stdout else ""
        if not line.strip():
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"{kind} server did not start: {err.strip()[-500:]}")
        self.port = int(line)

    def stop(self) -> None:
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
    srv = _Server("plain", {})
    try:
        s = socket.create_connection((HOST, srv.port), timeout=REPLY_TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out: dict[str, float] = {}
        msg = HDR.pack(64, K_ECHO) + bytes(64)
        back = bytearray(len(msg))
        bv = memoryview(back)
        lat = []
        for i in range(iters + iters // 10):
            t0 = time.perf_counter()
            s.sendall(msg)
            _recv_exact(s, bv)
            if i >= iters // 10:
                lat.append((time.perf_counter() - t0) / 2)
        out["p50_us"] = _pct(lat, 0.5) * 1e6
        out["p99_us"] = _pct(lat, 0.99) * 1e6
        ack = bytearray(HDR.size + 1)
        for size, count in streams:
            data = bytes(size)
            hdr = HDR.pack(size, K_SINK)
            for _ in range(WARMUP):
                s.sendall(hdr)
                s.sendall(data)
            s.sendall(HDR.pack(0, K_ACK))
            _recv_exact(s, memoryview(ack))
            t0 = time.perf_counter()
            for _ in range(count):
                s.sendall(hdr)
                s.sendall(data)
            s.sendall(HDR.pack(0, K_ACK))
            _recv_exact(s, memoryview(ack))
            out[f"stream_{size // MiB}MiB_GBps"] = size * count / (time.perf_counter() - t0) / 1e9
        s.close()
        return out
    finally:
        srv.stop()


def _transport_run(provider: str, iters: int, streams: tuple[tuple[int, int], ...],
                   overrides: dict[str, Any]) -> dict[str, float]:
    from ..conf import Conf
    from ..transport import MessageReceived, PeerConnected, PeerFailed, open_transport

    srv = _Server(provider, overrides)
    t = None
    try:
        conf = Conf.load(overrides=overrides, environ={})
        t = open_transport(conf, 1, (HOST, 0), provider)
        t.listen()
        t.connect(2, (HOST, srv.port))
        deadline = time.monotonic() + 20
        while True:
            evs = t.poll(0.5)
            if any(isinstance(e, PeerConnected) and e.node_id == 2 for e in evs):
                break
            failed = [e for e in evs if isinstance(e, PeerFailed)]
            if failed:
                raise RuntimeError(f"could not connect: {failed[0].reason}")
            if time.monotonic() > deadline:
                raise RuntimeError("could not connect within 20 s")

        def wait_message() -> Any:
            limit = time.monotonic() + REPLY_TIMEOUT
            while time.monotonic() < limit:
                for e in t.poll(1.0):
                    if isinstance(e, MessageReceived):
                        return e.data
                    if isinstance(e, PeerFailed):
                        raise RuntimeError(f"server failed: {e.reason}")
            raise RuntimeError(f"no reply within {REPLY_TIMEOUT} s")

        out: dict[str, float] = {}
        head, body = b"\x00", bytes(63)
        lat = []
        for i in range(iters + iters // 10):
            t0 = time.perf_counter()
            t.send(2, [head, body], timeout=REPLY_TIMEOUT)
            wait_message()
            if i >= iters // 10:
                lat.append((time.perf_counter() - t0) / 2)
        out["p50_us"] = _pct(lat, 0.5) * 1e6
        out["p99_us"] = _pct(lat, 0.99) * 1e6
        for size, count in streams:
            data = bytes(size)
            sink = b"\x01"
            for _ in range(WARMUP):
                t.send(2, [sink, data], timeout=REPLY_TIMEOUT)
            t.send(2, [b"\x02"], timeout=REPLY_TIMEOUT)
            wait_message()
            t0 = time.perf_counter()
            for _ in range(count):
                t.send(2, [sink, data], timeout=REPLY_TIMEOUT)
            t.send(2, [b"\x02"], timeout=REPLY_TIMEOUT)
            wait_message()
            out[f"stream_{size // MiB}MiB_GBps"] = size * count / (time.perf_counter() - t0) / 1e9
        return out
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
    env = dict(os.environ, FI_TCP_IFACE="lo", FI_PROVIDER="tcp")
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
    parser.add_argument("--providers", default="",
                        help="comma list of transport providers (default: sockets and tcp when installed; "
                             "'all' for every registered name)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    parser.add_argument("--iters", type=int, default=2000, help="ping-pong round trips per run (default 2000)")
    parser.add_argument("--quick", action="store_true", help="smaller volumes (for tests)")
    parser.add_argument("--busy-wait-ms", type=int, default=None,
                        help="override [DERECHO] p2p_loop_busy_wait_before_sleep_ms for the transports")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON record to FILE ('-': stdout only)")


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def run(args: argparse.Namespace) -> int:
    from .. import plugins

    installed = plugins.names("transport")
    if args.providers == "all":
        providers = installed
    elif args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    else:
        providers = [p for p in ("sockets", "tcp") if p in installed]
    iters = 300 if args.quick else args.iters
    streams = ((MiB, 32), (64 * MiB, 2)) if args.quick else STREAMS
    overrides: dict[str, Any] = {}
    if args.busy_wait_ms is not None:
        overrides["DERECHO/p2p_loop_busy_wait_before_sleep_ms"] = args.busy_wait_ms
    runs = max(1, args.runs)

    results: dict[str, Any] = {}
    raw: dict[str, list[dict[str, float]]] = {"plain": []}
    for p in providers:
        raw[p] = []
    errors: dict[str, str] = {}
    # interleave the runs, so a noisy neighbour hurts every row alike
    for run_no in range(runs):
        print(f"run {run_no + 1}/{runs}: plain sockets", file=sys.stderr, flush=True)
        raw["plain"].append(_plain_run(iters, streams))
        for p in providers:
            if p in errors:
                continue
            print(f"run {run_no + 1}/{runs}: {p}", file=sys.stderr, flush=True)
            try:
                raw[p].append(_transport_run(p, iters, streams, overrides))
            except Exception as exc:  # noqa: BLE001 - report, go on with the others
                errors[p] = f"{type(exc).__name__}: {exc}"
    fi: dict[str, Any] = {}
    lat_runs = [r for r in (_fi_pingpong(64, max(iters, 1000)) for _ in range(runs)) if r]
    if lat_runs:
        fi["p50_us"] = statistics.median(r["usec_per_xfer"] for r in lat_runs)
        bw_runs = [r for r in (_fi_pingpong(MiB, 200) for _ in range(runs)) if r]
        if bw_runs:
            fi["pingpong_1MiB_GBps"] = statistics.median(r["MBps"] for r in bw_runs) * 1e6 / 1e9
    base = _median_of(raw["plain"])
    results["plain-python-sockets"] = base
    for p in providers:
        if raw[p]:
            m = _median_of(raw[p])
            m["ratio_p50_vs_plain"] = m["p50_us"] / base["p50_us"]
            for size, _ in streams:
                k = f"stream_{size // MiB}MiB_GBps"
                m[f"ratio_{size // MiB}MiB_vs_plain"] = m[k] / base[k]
            results[p] = m
    keys = [f"stream_{size // MiB}MiB_GBps" for size, _ in streams]
    print(f"derecho bench transport: median of {runs} runs, {iters} round trips, streams "
          + ", ".join(f"{c} x {s // MiB} MiB" for s, c in streams) + "; one-way latency = RTT/2")
    print(f"{'transport':<22}{'p50 us':>9}{'p99 us':>9}{'x plain':>9}" +
          "".join(f"{k.split('_')[1] + ' GB/s':>12}{'x plain':>9}" for k in keys))
    for name, m in results.items():
        row = f"{name:<22}{m['p50_us']:9.1f}{m['p99_us']:9.1f}{m.get('ratio_p50_vs_plain', 1.0):9.2f}"
        for size, _ in streams:
            k = f"stream_{size // MiB}MiB_GBps"
            row += f"{m[k]:12.2f}{m.get(f'ratio_{size // MiB}MiB_vs_plain', 1.0):9.2f}"
        print(row)
    if fi:
        ratio = fi["p50_us"] / base["p50_us"]
        line = f"{'fi_pingpong -p tcp':<22}{fi['p50_us']:9.1f}{'(mean)':>9}{ratio:9.2f}"
        if "pingpong_1MiB_GBps" in fi:
            line += f"   1 MiB ping-pong {fi['pingpong_1MiB_GBps']:.2f} GB/s (not streaming)"
        print(line)
        results["fi_pingpong-tcp"] = fi
    else:
        print("fi_pingpong: not on PATH (apt-get install libfabric-bin); libfabric baseline skipped")
    for p, e in errors.items():
        print(f"{p}: not measured: {e}")
    # Derecho-style result lines
    for name, m in results.items():
        if "stream_1MiB_GBps" in m:
            print(f"data_transport_latency {name} 64 {m['p50_us']:.2f} {m['p99_us']:.2f}")
            for k in keys:
                print(f"data_transport_bw {name} {int(k.split('_')[1][:-3]) * MiB} {m[k]:.3f}")
    record = {"benchmark": "transport", "runs": runs, "iters": iters,
              "streams": [{"size": s, "count": c} for s, c in streams],
              "results": results, "errors": errors, "raw": raw,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(record, indent=2)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(_server_main(sys.argv[1:]))
    _ap = argparse.ArgumentParser(prog="python -m derecho_core.benchmarks.transport")
    add_arguments(_ap)
    sys.exit(run(_ap.parse_args()))
