"""Embedded event log throughput: durable appends/s from concurrent threads, and tail reads.

    .venv/bin/python benchmarks/eventlog.py [--seconds 3] [--threads 8] [--dir PATH]

Every append is fsynced (fsync=True); group commit lets concurrent callers share fsyncs,
which is what this measures. Runs in a temporary directory on the filesystem of --dir
(default: the system temp dir) and takes about 4 x --seconds plus a read pass.
"""

import argparse
import os
import tempfile
import threading
import time

from storage.eventlog.log import EventLog

PAYLOAD = b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","ts":1700000000}' * 3


def bench_appends(path: str, *, batch: int, threads: int, seconds: float) -> tuple[int, int]:
    """Return (records, append calls) completed by `threads` callers in `seconds`."""
    counts = [0] * threads
    stop = time.monotonic() + seconds
    with EventLog.open(path, partitions=4, mode="writer", fsync=True) as log:

        def worker(t: int) -> None:
            n = 0
            while time.monotonic() < stop:
                log.append([(f"user-{t}-{n + i}", PAYLOAD) for i in range(batch)])
                n += batch
                counts[t] += 1

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    calls = sum(counts)
    return calls * batch, calls


def bench_tail_read(path: str) -> tuple[int, float]:
    """Read every record back sequentially, the way a stream consumer tails the log."""
    with EventLog.open(path, partitions=4, mode="reader") as log:
        start, total = time.perf_counter(), 0
        for p in range(4):
            offset = 0
            while batch := log.read(p, offset, max_records=1000):
                total += len(batch)
                offset = batch[-1][0] + 1
        return total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="Embedded event log throughput.")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nextbest-bench-") as tmp:
        print(
            "eventlog append, fsync on, 4 partitions, "
            f"{len(PAYLOAD)} B payload, {args.seconds:.0f} s each (dir {tmp})"
        )
        last = ""
        runs = [(1, 1), (1, args.threads), (10, args.threads), (100, args.threads)]
        for batch, threads in runs:  # (1, 1): one fsync per call, the no-grouping baseline
            last = os.path.join(tmp, f"batch{batch}-threads{threads}")
            records, calls = bench_appends(last, batch=batch, threads=threads, seconds=args.seconds)
            print(
                f"  batch {batch:>3} x {threads:>2} threads: {records / args.seconds:>10,.0f}"
                f" records/s {calls / args.seconds:>8,.0f} appends/s"
            )
        total, elapsed = bench_tail_read(last)
        print(f"tail read: {total:,} records in {elapsed:.2f} s = {total / elapsed:,.0f} records/s")


if __name__ == "__main__":
    main()
