"""Embedded durable event log: the transport when no Kafka is configured.

Layout under the log directory (partition count fixed at creation)::

    eventlog.json                      {"format": 1, "partitions": N}
    writer.lock                        flock'ed by the one writer process (holds its pid),
                                       or shared by several (`shared=True`, see .shared)
    maintenance.lock, p0000/append.lock  shared writers only
    p0000/00000000000000000000.log     segments named by base offset, rolled by size

Durability: `append` returns only after write + fdatasync of every touched segment (and
a directory fsync when a segment is created). Concurrent callers share one fsync per
group (leader/follower group commit). A segment is fsynced before its successor is
created, so only the last segment of a partition can have a torn tail; the writer cuts
it on open and readers stop before it.

Readers in other processes see bytes as soon as the writer has written them, possibly
just before the fsync completes; after an OS crash (not a process crash) such unacked
records can vanish. The writer's own `read` returns durable records only.
"""

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from nextbest.settings import Settings
from storage.eventlog.rewrite import Rewrites
from storage.eventlog.segments import (
    MAX_KEY_BYTES,
    MAX_PAYLOAD_BYTES,
    QUARANTINE_DIR,
    TMP_SUFFIX,
    CorruptLogError,
    EventLogError,
    Layout,
    Quarantine,
    Scan,
    SegmentReader,
    WriterLockedError,
    encode,
    partition_for,
    write_all,
)
from storage.eventlog.shared import (
    MIN_FREE_BYTES,
    SharedWriters,
    disk_problem,
    take_writer_lock,
)

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "CorruptLogError",
    "EventLog",
    "EventLogError",
    "Mode",
    "WriterLockedError",
    "partition_for",
]

Mode = Literal["writer", "reader"]
DEFAULT_SEGMENT_BYTES = 64 << 20
_LOCK = "writer.lock"


@dataclass(slots=True)
class _Active:
    """Writer state of one partition: its last segment and offsets."""

    base: int
    fd: int
    size: int
    next: int  # next offset to assign
    durable: int  # every offset below this is fsynced


@dataclass(slots=True)
class _Request:
    records: list[tuple[int, bytes, bytes]]
    result: list[tuple[int, int]] | None = None
    error: BaseException | None = None
    done: bool = False


class EventLog(SharedWriters, Rewrites):
    """Partitioned append-only log on local disk; one writer process (or several with
    `shared=True`, `storage.eventlog.shared`), any number of readers.

    Readers may open (and create) the log before the writer exists.
    """

    def __init__(
        self,
        path: Path,
        *,
        partitions: int,
        mode: Mode,
        segment_bytes: int,
        fsync: bool,
        shared: bool = False,
    ) -> None:
        if partitions < 1 or segment_bytes < 1:
            raise ValueError("partitions and segment_bytes must be >= 1")
        if mode not in ("writer", "reader"):
            raise ValueError(f"mode must be 'writer' or 'reader', not {mode!r}")
        self.path, self.partitions, self.mode = path, partitions, mode
        self._segment_bytes = segment_bytes
        self._layout = Layout(path, partitions, fsync)
        self.quarantine = Quarantine(path / QUARANTINE_DIR)
        self._reader = SegmentReader(self._layout, quarantine=self.quarantine)
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Request] = []
        self._leader = False
        self._closed = False
        self._failed: BaseException | None = None
        self._active: dict[int, _Active] = {}
        self._lock_fd: int | None = None
        self.shared = shared and mode == "writer"
        self._plocks, self._mlock = {}, None
        self._init_rewrites()
        path.mkdir(parents=True, exist_ok=True)
        if mode == "writer":
            self._lock_fd = take_writer_lock(path / _LOCK, shared=self.shared)
        try:
            self._layout.ensure(writer=mode == "writer")
            self._open_locks(partitions)
            if mode == "writer":
                for p in range(partitions):
                    with self._appending([p]):
                        self._active[p] = self._recover(p)
        except BaseException:
            self._release_fds()
            raise

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        partitions: int,
        mode: Mode,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        shared: bool = False,
    ) -> Self:
        """Open (creating if absent) the log at `path`; writer mode takes the writer lock
        (shared with the other writer processes with `shared=True`)."""
        return cls(
            Path(path),
            partitions=partitions,
            mode=mode,
            segment_bytes=segment_bytes,
            fsync=fsync,
            shared=shared,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, mode: Mode, shared: bool = False) -> Self:
        return cls.open(
            settings.eventlog_dir, partitions=settings.partitions, mode=mode, shared=shared
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------

    def append(self, records: Sequence[tuple[str, bytes]]) -> list[tuple[int, int]]:
        """Append (key, payload) records; return (partition, offset) each, once durable."""
        self._require_writer()
        items = [self._prepare(key, payload) for key, payload in records]
        if not items:
            return []
        req = _Request(items)
        with self._cond:
            self._queue.append(req)
            while not req.done:
                if self._leader:
                    self._cond.wait()
                    continue
                self._leader = True  # lead one group: everything queued so far
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._run_group(batch)
                finally:
                    self._cond.acquire()
                    self._leader = False
                    for r in batch:
                        r.done = True
                    self._cond.notify_all()
        if req.error is not None or req.result is None:
            raise EventLogError(f"append to {self.path} failed: {req.error}") from req.error
        return req.result

    def trim(self, partition: int, below_offset: int) -> int:
        """Delete whole segments whose records are all below `below_offset`; never the last.

        Returns the number of segments deleted.
        """
        self._require_writer()
        self._check_partition(partition)
        with self._maintaining(), self._exclusive():
            deleted = 0
            for base, following in itertools.pairwise(self._layout.bases(partition)):
                if following > below_offset:
                    break
                self._layout.segment_path(partition, base).unlink()
                deleted += 1
            if deleted:
                self._reset_reads()
                self._layout.sync_dir(self._layout.partition_dir(partition))
            return deleted

    # ---- health --------------------------------------------------------------------

    def unwritable(self, *, min_free_bytes: int = MIN_FREE_BYTES) -> str | None:
        """Why an append would fail now, or None when the log takes writes: a closed or
        read-only handle, an earlier failed write or fsync (the writer fail-stops until
        reopened), less than `min_free_bytes` free on its disk, or a probe write +
        fsync of a marker file failing (a read-only or broken filesystem). For
        readiness checks: `eventlog: not writable: <reason>`."""
        if self.mode != "writer":
            return "opened read-only"
        if self._closed:
            return "closed"
        if self._failed is not None:
            return f"an earlier write failed ({self._failed}); restart to reopen the log"
        return disk_problem(self.path, min_free_bytes)

    def writable(self) -> bool:
        return self.unwritable() is None

    # ---- reading -------------------------------------------------------------------

    def read(
        self, partition: int, offset: int, *, max_records: int = 1000
    ) -> list[tuple[int, str, bytes]]:
        """Up to `max_records` records (offset, key, payload) with offset >= `offset`.

        Offsets may have gaps where records were erased; an offset below the start of the
        log reads from its start. Sequential reads resume from a cached file position.
        """
        self._check_partition(partition)
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if self._closed:
            raise EventLogError("event log is closed")
        own = self.mode == "writer" and not self.shared  # shared: others append too
        limit = self._active[partition].durable if own else None
        with self._reader.lock:
            for _ in range(5):
                try:
                    return self._reader.read(partition, offset, max_records, limit)
                except FileNotFoundError:  # a segment was trimmed while we looked at it
                    self._reader.reset()
        raise EventLogError(f"segments of partition {partition} keep disappearing")

    def end_offsets(self) -> dict[int, int]:
        """Next offset per partition (a lone writer reports durable records only)."""
        if self.mode == "writer" and not self.shared:
            return {p: st.durable for p, st in self._active.items()}
        with self._reader.lock:
            for _ in range(5):
                try:
                    return {p: self._reader.end(p) for p in range(self.partitions)}
                except FileNotFoundError:
                    self._reader.reset()
        raise EventLogError("segments keep disappearing")

    def start_offsets(self) -> dict[int, int]:
        """Base offset of the oldest segment per partition (moves forward on `trim`)."""
        return {p: (self._layout.bases(p) or [0])[0] for p in range(self.partitions)}

    def close(self) -> None:
        """Wait for an in-flight group commit, close files, release the writer lock."""
        if self._closed:
            return
        with self._exclusive():
            self._closed = True
            self._release_fds()

    # ---- internals -----------------------------------------------------------------

    def _prepare(self, key: str, payload: bytes) -> tuple[int, bytes, bytes]:
        if not isinstance(key, str):
            raise TypeError(f"record key must be str, got {type(key).__name__}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"record payload must be bytes, got {type(payload).__name__}")
        kb, data = key.encode(), bytes(payload)
        if len(kb) > MAX_KEY_BYTES or len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError("record key over 65535 bytes or payload over 1 GiB")
        return partition_for(key, self.partitions), kb, data

    def _run_group(self, batch: list[_Request]) -> None:
        try:
            if self._closed:
                raise EventLogError("event log is closed")
            if self._failed is not None:
                raise EventLogError(f"an earlier write failed ({self._failed}); reopen the log")
            self._commit(batch)
        except Exception as exc:
            if not isinstance(exc, EventLogError):
                self._failed = exc  # state after a failed write/fsync is unknown: fail stop
            for r in batch:
                r.error = exc

    def _commit(self, batch: list[_Request]) -> None:
        """Assign offsets in queue order, write each partition once, fsync each once."""
        with self._caught_up({p for req in batch for p, _, _ in req.records}):
            pending: dict[int, list[bytes]] = {}
            results: list[list[tuple[int, int]]] = []
            for req in batch:
                out = []
                for p, key, payload in req.records:
                    st = self._active[p]
                    rec = encode(st.next, key, payload)
                    if st.size > 0 and st.size + len(rec) > self._segment_bytes:
                        self._roll(p, pending.pop(p, []))
                    pending.setdefault(p, []).append(rec)
                    st.size += len(rec)
                    out.append((p, st.next))
                    st.next += 1
                results.append(out)
            for p, chunks in pending.items():
                write_all(self._active[p].fd, b"".join(chunks))
            for p in pending:
                self._layout.sync(self._active[p].fd)
            for p in pending:
                self._active[p].durable = self._active[p].next
            for req, out in zip(batch, results, strict=True):
                req.result = out

    def _roll(self, p: int, chunks: list[bytes]) -> None:
        """Seal the active segment (written + fsynced) and start one at the next offset."""
        st = self._active[p]
        if chunks:
            write_all(st.fd, b"".join(chunks))
        self._layout.sync(st.fd)
        st.durable = st.next
        os.close(st.fd)
        st.fd, st.base, st.size = self._layout.create_segment(p, st.next), st.next, 0

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold off group commits (trim, rewrite, close)."""
        with self._cond:
            while self._leader:
                self._cond.wait()
            self._leader = True
        try:
            yield
        finally:
            with self._cond:
                self._leader = False
                self._cond.notify_all()

    def _recover(self, p: int) -> _Active:
        """Open the last segment for appending, truncating a torn tail left by a crash."""
        with self._maintenance_flock(blocking=False) as idle:
            if idle:  # else a shared writer's rewrite is running: its temp files are live
                for leftover in self._layout.partition_dir(p).glob(f"*{TMP_SUFFIX}"):
                    leftover.unlink()  # an interrupted rewrite; the segment is intact
        bases = self._layout.bases(p)
        if not bases:
            return _Active(0, self._layout.create_segment(p, 0), 0, 0, 0)
        base = bases[-1]
        fd = os.open(self._layout.segment_path(p, base), os.O_RDWR | os.O_APPEND)
        # Damaged records followed by good ones are skipped (quarantined), not cut:
        # only bytes after the last good record are a crash's torn tail.
        scan = Scan(fd, 0, after=base - 1, on_skip=self.quarantine.sink(p, base))
        for _ in scan:
            pass
        if not scan.clean:
            os.ftruncate(fd, scan.pos)
            self._layout.sync(fd)
        return _Active(base, fd, scan.pos, scan.last + 1, scan.last + 1)

    def _active_base(self, p: int) -> tuple[int, int]:
        """(base, durable end) of the partition's active segment, read consistently
        (shared: after catching up with the other writers)."""
        with self._exclusive(), self._caught_up([p]):
            return self._active[p].base, self._active[p].durable

    def _seal(self, p: int, base: int) -> None:
        """Roll the partition if `base` is still its active segment."""
        with self._exclusive(), self._caught_up([p]):
            if self._closed:
                raise EventLogError("event log is closed")
            if self._active[p].base == base:
                self._roll(p, [])

    def _reset_reads(self) -> None:
        with self._reader.lock:
            self._reader.reset()

    def _release_fds(self) -> None:
        self._reset_reads()
        for st in self._active.values():
            os.close(st.fd)
        self._active.clear()
        self._close_locks()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _check_partition(self, p: int) -> None:
        if not 0 <= p < self.partitions:
            raise ValueError(f"partition {p} out of range 0..{self.partitions - 1}")

    def _require_writer(self) -> None:
        if self.mode != "writer":
            raise EventLogError("this operation needs the log opened with mode='writer'")
        if self._closed:
            raise EventLogError("event log is closed")
