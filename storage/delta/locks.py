"""One compaction of a Delta table at a time, across threads and processes.

delta-rs (1.6.6 here) commits two concurrent OPTIMIZE compactions of the same files
both, instead of failing the second with a delete-delete conflict: their removes carry
`dataChange=false`, which its conflict checker lets pass since delta-io/delta-rs#3982.
Every compacted row then lives in two or more files (tests/storage/test_concurrency.py: without
this lock, three overlapping maintenances of a 320-row table left 640 to 1,152 rows).
Nor can a compaction carry an app transaction to make it conflict: `optimize.compact`
drops `app_transactions`.

So `DeltaStore.compact` takes this lock: an exclusive `flock` on a file in the table's
folder for local tables (released by the OS if the holder dies), a process-local lock
for object-store tables, where overlapping maintenance runs are kept apart by the
Dagster `nextbest/writer` run tag instead (dagster.yaml).
"""

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "_nextbest_compact.lock"  # leading underscore: Delta readers skip it
_local_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


@contextmanager
def compaction_lock(table_uri: str) -> Iterator[None]:
    """Hold the table's compaction lock (blocks while another compaction runs)."""
    folder = _local_folder(table_uri)
    if folder is None:
        with _guard:
            lock = _local_locks.setdefault(table_uri, threading.Lock())
        with lock:
            yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one open file each: threads exclude each other too
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_folder(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)
