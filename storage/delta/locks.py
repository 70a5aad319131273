"""One compaction of a Delta table at a time, across threads, processes and machines.

delta-rs (1.6.6 here) commits two concurrent OPTIMIZE compactions of the same files
both, instead of failing the second with a delete-delete conflict: their removes carry
`dataChange=false`, which its conflict checker lets pass since delta-io/delta-rs#3982.
Every compacted row then lives in two or more files (tests/storage/test_concurrency.py: without
this lock, three overlapping maintenances of a 320-row table left 640 to 1,152 rows).
Nor can a compaction carry an app transaction to make it conflict: `optimize.compact`
drops `app_transactions`.

So `DeltaStore.compact` takes this lock, an object beside the table's `_delta_log`
(leading underscore: Delta readers and vacuum skip it):
- local tables: an exclusive `flock` on a file (released by the OS if the holder dies);
- object-store tables: a lease object created with a conditional put (`If-None-Match: *`,
  the same primitive delta-rs commits with), renewed with `If-Match` on its ETag while
  held and deleted on release. A holder that dies leaves a lease that expires after
  `LEASE_S`; the next taker replaces it with `If-Match`, so of two takers one wins.
  Expiry is judged by the taker's clock: clocks must agree to well under `LEASE_S`.
"""

import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import ObjectStore

from storage.objectstore import open_store

LOCK_FILE = "_nextbest_compact.lock"
LEASE_S = 60.0
"""How long a lease outlives its last renewal (a dead holder blocks compaction this long)."""


@contextmanager
def compaction_lock(
    table_uri: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """Hold the table's compaction lock (blocks while another compaction runs)."""
    folder = _local_folder(table_uri)
    if folder is None:
        lease = ObjectLease(open_store(table_uri, storage_options or {}), LOCK_FILE)
        lease.acquire()
        try:
            yield
        finally:
            lease.release()
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one open file each: threads exclude each other too
        yield
    finally:
        os.close(fd)  # releases the lock


class ObjectLease:
    """A mutual-exclusion lease held in one object, by conditional puts only."""

    def __init__(self, store: ObjectStore, key: str, *, lease_s: float = LEASE_S) -> None:
        self.store = store
        self.key = key
        self.lease_s = lease_s
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lost = False  # a renewal found the lease taken (held past its expiry)
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        # A fresh nonce per write: ETags are content hashes, so equal bodies would let
        # an If-Match on an old ETag succeed (ABA).
        expires = time.time() + self.lease_s
        return json.dumps({"owner": self.owner, "expires": expires, "n": uuid.uuid4().hex}).encode()

    def acquire(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 0.02
        while True:
            if self._try_acquire():
                self._renewer = threading.Thread(target=self._renew, daemon=True)
                self._renewer.start()
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"lease {self.key} still held after {timeout}s")
            time.sleep(wait)  # another process holds it: nothing to wait on but the object
            wait = min(wait * 2, 0.5)

    def _try_acquire(self) -> bool:
        try:
            self._etag = obstore.put(self.store, self.key, self._body(), mode="create")["e_tag"]
            return True
        except AlreadyExistsError:
            pass
        try:
            held = obstore.get(self.store, self.key)
            etag, body = held.meta["e_tag"], json.loads(bytes(held.bytes()))
        except FileNotFoundError:
            return False  # released just now: try to create it again
        except ValueError:  # a torn or foreign object: treat as expired
            etag, body = None, {"expires": 0}
        if float(body.get("expires", 0)) > time.time() or etag is None:
            return False
        try:  # expired: replace exactly the lease we read; of two takers one wins
            self._etag = obstore.put(self.store, self.key, self._body(), mode={"e_tag": etag})[
                "e_tag"
            ]
            return True
        except (PreconditionError, FileNotFoundError):
            return False

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                etag = self._etag
                assert etag is not None
                self._etag = obstore.put(self.store, self.key, self._body(), mode={"e_tag": etag})[
                    "e_tag"
                ]
            except PreconditionError:
                self.lost = True
                return
            except Exception:  # a transient store error: try again at the next beat
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost:
            return  # someone else holds it now: not ours to delete
        try:
            held = obstore.head(self.store, self.key)
            if held["e_tag"] == self._etag:
                obstore.delete(self.store, self.key)
        except FileNotFoundError:
            pass


def _local_folder(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)
