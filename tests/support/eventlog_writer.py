"""Crash-test writer: appends from several threads and acks on stdout until killed.

    python tests/support/eventlog_writer.py LOG_DIR PARTITIONS THREADS SEGMENT_BYTES TAG [shared]

Each acknowledged record is printed as ``partition offset payload_id`` only after
`append` returned (durable), one os.write per batch so a SIGKILL never splits a line
that was reported. `payload_for(payload_id)` rebuilds the exact payload to check it.
"""

import hashlib
import os
import random
import sys
import threading
import zlib

from storage.eventlog.log import EventLog


def payload_for(payload_id: str) -> bytes:
    """Deterministic, variable-length payload (some records span several pages)."""
    digest = hashlib.sha256(payload_id.encode()).hexdigest().encode()
    return payload_id.encode() + b"|" + digest * (1 + zlib.crc32(payload_id.encode()) % 80)


def _worker(log: EventLog, tag: str, thread: int, out_lock: threading.Lock) -> None:
    rng = random.Random(f"{tag}-{thread}")
    seq = 0
    while True:
        ids = [f"{tag}-{thread}-{seq + i}" for i in range(rng.randint(1, 12))]
        seq += len(ids)
        acks = log.append([(f"user-{rng.randrange(500)}", payload_for(i)) for i in ids])
        lines = "".join(f"{p} {o} {i}\n" for (p, o), i in zip(acks, ids, strict=True))
        with out_lock:
            data = lines.encode()
            while data:
                data = data[os.write(1, data) :]


def main() -> None:
    path, partitions, threads, segment_bytes, tag = sys.argv[1:6]
    shared = sys.argv[6:7] == ["shared"]  # one of several writer processes
    log = EventLog.open(
        path,
        partitions=int(partitions),
        mode="writer",
        segment_bytes=int(segment_bytes),
        shared=shared,
    )
    out_lock = threading.Lock()
    workers = [
        threading.Thread(target=_worker, args=(log, tag, t, out_lock), daemon=True)
        for t in range(int(threads))
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()  # runs until SIGKILL


if __name__ == "__main__":
    main()
