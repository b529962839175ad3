"""Children of the SIGKILL crash test.

``python persist_crash_child.py DIR`` is a zygote: it imports everything once,
then for each line ``run SEED OUTFILE`` on stdin forks a child that appends
and persists in a loop until killed, prints the child's pid, and prints
``done STATUS`` once it has reaped it. Forking keeps a round to milliseconds
whatever the machine's load, so the parent can kill at random moments many
times in a bounded time.

The child writes ``open V`` once the log is open and ``p V`` after every
``persist`` returns: the parent may count on every entry up to V being in the
log after the kill.
"""

from __future__ import annotations

import os
import random
import sys

from derecho_storage_file import FileLogStore

SIZES = [0, 10, 100, 1000, 5000, 70000]
WEIGHTS = [2, 4, 4, 3, 2, 1]


def payload(version: int) -> bytes:
    rnd = random.Random(version)
    return rnd.randbytes(rnd.choices(SIZES, WEIGHTS)[0])


def child(directory: str, seed: int, out: int) -> None:
    rng = random.Random(seed)
    log = FileLogStore(directory, "crash", index_sync_interval=rng.choice([0, 0.005, 1.0]))
    v = log.latest_version
    os.write(out, f"open {v}\n".encode())
    while True:
        for _ in range(rng.randint(1, 24)):
            v += 1
            log.append(v, v, payload(v))
        persisted = log.persist()
        os.write(out, f"p {persisted}\n".encode())
        if len(log) > 300 and rng.random() < 0.2:
            log.trim(log.latest_version - 100)


def zygote(directory: str) -> None:
    for line in sys.stdin:
        _, seed, outfile = line.split()
        out = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pid = os.fork()
        if pid == 0:
            try:
                child(directory, int(seed), out)
            except BaseException as exc:  # tell the parent why (it only expects SIGKILL)
                os.write(out, f"error {exc!r}\n".encode())
            finally:
                os._exit(1)
        os.close(out)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"done {status}", flush=True)


if __name__ == "__main__":
    zygote(sys.argv[1])
