"""Several writer processes on one embedded log (`EventLog.open(..., shared=True)`).

Why: `nextbest api --workers N` runs N processes that all accept events, and keyed
routing must stay what it is with one process (partition = hash of the actor), so a
person's events keep one partition, in order, whichever process took them. So rather
than splitting partitions between processes, every shared writer may append to any
partition, one at a time: an append holds the partition's `flock`
(`p0000/append.lock`) from the moment it learns the tail until its fsync is done.
On taking the lock a writer catches up with what the others appended since it last
held it (a new segment, or bytes after its last known position) and cuts a torn tail
a killed writer left (the kernel drops a dead holder's lock, so that is the only trace
of it). Offsets therefore stay dense and in append order per partition, exactly as with
one writer; group commit still batches the appends of one process.

`writer.lock` is taken shared by shared writers and exclusively by a lone writer, so
the two kinds never mix. Erasure rewrites and trims take `maintenance.lock`
(exclusive) so two processes never rewrite the same segment.
"""

import contextlib
import fcntl
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from storage.eventlog.segments import Layout, Quarantine, Scan, WriterLockedError, write_all

APPEND_LOCK = "append.lock"
MAINTENANCE_LOCK = "maintenance.lock"
_PROBE = "writable.probe"
MIN_FREE_BYTES = 16 << 20
"""Below this much free disk the log reports itself not writable (a segment roll, a
rewrite's temp copy and the fsyncs need room before an append fails outright)."""


def disk_problem(path: Path, min_free_bytes: int) -> str | None:
    """Less than `min_free_bytes` free under `path`, or a probe write + fsync failing
    (a read-only or broken filesystem); None when fine. Any writer may probe."""
    try:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            return f"disk full: {free} bytes free under {path}"
        fd = os.open(path / _PROBE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, b"1")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"probe write failed: {exc}"
    return None


class Tail(Protocol):
    """The writer state of one partition (`storage.eventlog.log._Active`)."""

    base: int
    fd: int
    size: int
    next: int
    durable: int


def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def flocked(fds: Iterable[int]) -> Iterator[None]:
    """Exclusive flock on each fd, in the order given (callers sort: no deadlock)."""
    taken: list[int] = []
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)
            taken.append(fd)
        yield
    finally:
        for fd in reversed(taken):
            fcntl.flock(fd, fcntl.LOCK_UN)


def try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take_writer_lock(path: Path, *, shared: bool = False) -> int:
    """Non-blocking flock, exclusive for a lone writer, shared for shared writers;
    released by the kernel when the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"a lone writer (pid {holder})" if holder else "shared writers"
        raise WriterLockedError(
            f"{path.parent} already has {who}; one writer process per log, or only shared writers"
        ) from None
    if not shared:  # shared holders are several: no pid to name
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class SharedWriters:
    """The file locks of a shared writer, mixed into `EventLog`."""

    shared: bool
    quarantine: Quarantine
    _active: dict[int, Any]  # partition -> `Tail`
    _layout: Layout
    _maintenance: threading.Lock
    _plocks: dict[int, int]
    _mlock: int | None

    def _open_locks(self, partitions: int) -> None:
        self._plocks, self._mlock = {}, None
        if self.shared:
            self._mlock = open_lock(self._layout.path / MAINTENANCE_LOCK)
            for p in range(partitions):
                self._plocks[p] = open_lock(self._layout.partition_dir(p) / APPEND_LOCK)

    def _close_locks(self) -> None:
        for fd in [*self._plocks.values(), *([self._mlock] if self._mlock is not None else [])]:
            os.close(fd)
        self._plocks.clear()
        self._mlock = None

    def _appending(self, partitions: Iterable[int]) -> contextlib.AbstractContextManager[None]:
        """Shared: the append locks of these partitions (sorted); a lone writer: nothing."""
        if not self.shared:
            return contextlib.nullcontext()
        return flocked(self._plocks[p] for p in sorted(partitions))

    @contextlib.contextmanager
    def _caught_up(self, partitions: Iterable[int]) -> Iterator[None]:
        """Shared: hold these partitions' append locks, each caught up with the other
        writers; a lone writer is always caught up."""
        touched = sorted(set(partitions)) if self.shared else []
        with self._appending(touched):
            for p in touched:
                catch_up(self._layout, self.quarantine, p, self._active[p], self._plocks[p])
            yield
            for p in touched:  # only after a clean commit: the next holder may trust it
                publish(self._plocks[p], self._active[p])

    @contextlib.contextmanager
    def _maintenance_flock(self, *, blocking: bool = True) -> Iterator[bool]:
        """Shared: hold `maintenance.lock` (False when `blocking=False` and another
        process holds it); a lone writer needs no file lock (True)."""
        fd = self._mlock
        if fd is None:
            yield True
            return
        got = True
        if blocking:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            got = try_flock(fd)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _maintaining(self) -> Iterator[None]:
        """One rewrite or trim at a time, in this process and across shared writers."""
        with self._maintenance, self._maintenance_flock():
            yield


_HINT = struct.Struct("<QQQ")  # base, size, next offset of the active segment


def publish(lock_fd: int, st: Tail) -> None:
    """Leave the tail in the partition's lock file for the next holder (no fsync: a
    hint, checked against the segment before it is trusted)."""
    os.pwrite(lock_fd, _HINT.pack(st.base, st.size, st.next), 0)


def catch_up(layout: Layout, quarantine: Quarantine, p: int, st: Tail, lock_fd: int) -> None:
    """Bring `st` to the partition's real tail; the caller holds its append lock.

    Another writer may have appended records (the file grew), sealed the segment and
    started the next one (a roll, or an erasure's seal), or died mid-write (a torn
    tail, cut here as `_recover` does on open). The last holder's published tail saves
    reading what it wrote when it matches the segment (same base, same size: segments
    only grow, and only a writer that died before publishing leaves more bytes)."""
    last = layout.bases(p)[-1]
    if last != st.base:
        os.close(st.fd)
        st.fd = os.open(layout.segment_path(p, last), os.O_RDWR | os.O_APPEND)
        st.base, st.size, st.next = last, 0, last
    size = os.fstat(st.fd).st_size
    if size == st.size:
        return
    hint = os.pread(lock_fd, _HINT.size, 0)
    if len(hint) == _HINT.size:
        base, hinted_size, hinted_next = _HINT.unpack(hint)
        if base == st.base and hinted_size == size:
            st.size, st.next = size, hinted_next
            st.durable = st.next
            return
    if size < st.size:  # never expected (only torn tails are cut): read it all again
        st.size, st.next = 0, st.base
    scan = Scan(st.fd, st.size, after=st.next - 1, on_skip=quarantine.sink(p, st.base))
    for _ in scan:
        pass
    if not scan.clean:
        os.ftruncate(st.fd, scan.pos)
        layout.sync(st.fd)
    st.size, st.next = scan.pos, scan.last + 1
    st.durable = st.next
