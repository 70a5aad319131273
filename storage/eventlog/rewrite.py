"""Erasure rewrites of the embedded event log, off the writer's lock, coalesced.

Mixed into `storage.eventlog.log.EventLog`. A rewrite copies each segment holding a matching
record to a temp file without it and renames it over the old one. Appends only ever
touch a partition's active (last) segment, so sealed segments are rewritten without
holding off group commits at all; an active segment that holds a match is first sealed
(rolled, under the writer's lock for one fsync and a file creation), then rewritten like
any sealed one. Concurrent calls are coalesced: while one pass runs, later requests
queue and the next pass serves them all with one read of the log, so a loop of erase
requests costs at most one pass at a time and never stalls ingest.
"""

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from storage.eventlog.segments import (
    TMP_SUFFIX,
    EventLogError,
    Layout,
    Quarantine,
    Scan,
    encode,
    sealed_records,
)

Predicate = Callable[[str, bytes], bool]


@dataclass(slots=True)
class _Ticket:
    predicate: Predicate
    removed: int | None = None
    error: BaseException | None = None
    done: bool = False


class Rewrites:
    """State and passes of the rewrites; `EventLog` provides the writer side."""

    partitions: int
    quarantine: Quarantine
    _layout: Layout
    _closed: bool

    def _init_rewrites(self) -> None:
        self._rewrite_cond = threading.Condition(threading.Lock())
        self._rewrite_queue: list[_Ticket] = []
        self._rewrite_running = False
        self._maintenance = threading.Lock()  # one rewrite or trim at a time
        self.rewrite_passes = 0  # how many passes ran (coalescing is observable)

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _maintaining(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def _seal(self, p: int, base: int) -> None:
        raise NotImplementedError

    def _active_base(self, p: int) -> tuple[int, int]:
        raise NotImplementedError

    def _reset_reads(self) -> None:
        raise NotImplementedError

    def _require_writer(self) -> None:
        raise NotImplementedError

    def rewrite_without(self, predicate: Predicate) -> int:
        """Erase records where predicate(key, payload) is true; other offsets stay put.

        Each affected segment is rewritten to a temp file and renamed over the old one, so
        the erased bytes leave the directory; quarantined damaged bytes that match
        (`predicate("", raw)`) are deleted too. `predicate` must be pure. Returns the
        records removed by the pass that served this call (shared with the calls it
        coalesced). Appends go on meanwhile; records appended after the call started
        may or may not be covered.
        """
        self._require_writer()
        ticket = _Ticket(predicate)
        with self._rewrite_cond:
            self._rewrite_queue.append(ticket)
            while not ticket.done:
                if self._rewrite_running:
                    self._rewrite_cond.wait()
                    continue
                self._rewrite_running = True
                batch, self._rewrite_queue = self._rewrite_queue, []
                self._rewrite_cond.release()
                try:
                    self._serve(batch)
                finally:
                    self._rewrite_cond.acquire()
                    self._rewrite_running = False
                    for t in batch:
                        t.done = True
                    self._rewrite_cond.notify_all()
        if ticket.error is not None:
            raise EventLogError(f"rewrite of {self._layout.path} failed") from ticket.error
        return ticket.removed or 0

    def _serve(self, batch: list[_Ticket]) -> None:
        predicates = [t.predicate for t in batch]

        def any_match(key: str, payload: bytes) -> bool:
            return any(p(key, payload) for p in predicates)

        try:
            removed = self._rewrite_pass(any_match)
        except Exception as exc:
            for t in batch:
                t.error = exc
            return
        for t in batch:
            t.removed = removed

    def _rewrite_pass(self, predicate: Predicate) -> int:
        with self._maintaining():
            self.rewrite_passes += 1
            removed = sum(self._rewrite_partition(p, predicate) for p in range(self.partitions))
            for bad in self.quarantine.files():
                if predicate("", bad.read_bytes()):
                    bad.unlink()
            if removed:
                self._reset_reads()
            return removed

    def _rewrite_partition(self, p: int, predicate: Predicate) -> int:
        base, durable = self._active_base(p)
        if self._matches(p, base, predicate, limit=durable):
            # Seal it: a new segment at the next offset means erasing the newest
            # records can never make their offsets reusable, even on a crash.
            self._seal(p, base)
        active = self._active_base(p)[0]
        removed = 0
        for seg in self._layout.bases(p):
            if seg >= active:
                break
            removed += self._rewrite_segment(p, seg, predicate)
        return removed

    def _matches(self, p: int, base: int, predicate: Predicate, *, limit: int) -> bool:
        fd = os.open(self._layout.segment_path(p, base), os.O_RDONLY)
        try:
            for _, k, v in Scan(fd, 0, after=base - 1, limit=limit):
                if predicate(k.decode(), v):
                    return True
            return False
        finally:
            os.close(fd)

    def _rewrite_segment(self, p: int, base: int, predicate: Predicate) -> int:
        """Rewrite one sealed segment without matching (or damaged) records."""
        path = self._layout.segment_path(p, base)
        on_skip = self.quarantine.sink(p, base)
        fd = os.open(path, os.O_RDONLY)
        try:
            scan = Scan(fd, 0, after=base - 1, tail=False, on_skip=on_skip)
            if not any(predicate(k.decode(), v) for _, k, v in scan) and not scan.skipped:
                return 0
            removed = 0
            tmp = path.with_name(path.name + TMP_SUFFIX)
            with open(tmp, "wb") as out:
                for offset, k, v in sealed_records(fd, base, on_skip=on_skip):
                    if predicate(k.decode(), v):
                        removed += 1
                    else:
                        out.write(encode(offset, k, v))
                out.flush()
                self._layout.sync(out.fileno())
            os.replace(tmp, path)
            self._layout.sync_dir(path.parent)
            return removed
        finally:
            os.close(fd)
