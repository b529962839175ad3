"""Child of the SIGKILL crash test: appends and persists in a loop until killed.

Prints ``p <version>`` after every ``persist`` returns: the parent may count on
every entry up to that version being in the log after the kill.
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


def main() -> None:
    directory, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    log = FileLogStore(directory, "crash", index_sync_interval=rng.choice([0, 0.005, 1.0]))
    v = log.latest_version
    os.write(1, f"open {v}\n".encode())
    while True:
        for _ in range(rng.randint(1, 24)):
            v += 1
            log.append(v, v, payload(v))
        persisted = log.persist()
        os.write(1, f"p {persisted}\n".encode())
        if len(log) > 300 and rng.random() < 0.2:
            log.trim(log.latest_version - 100)


if __name__ == "__main__":
    main()
