"""The stream's heartbeat: what `/ready` reads to tell whether the stream is alive and
caught up (`storage.online.status`).

One board per process. Sources `touch` it from `next_batch` (called by the worker even
when idle, so a fresh heartbeat means the worker loop is turning), the lake sink counts
the dead letters it committed, and a daemon thread writes one row per partition every
`settings.stream_heartbeat_s`. A crashed or hung worker stops touching the board, so
its heartbeat goes stale; the dead-letter count starts from the stored row on attach
(it can under-count the letters of a crash between a Delta commit and the next beat).
"""

import logging
import threading
import time

from nextbest.settings import Settings
from pipelines.metrics import STREAM_METRICS
from storage.online.status import PartitionStatus, read_status, write_status
from storage.online.store import OnlineStore

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StatusBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, list[int]] = {}  # partition -> [next, dead, progress_ms]
        self._read: set[int] = set()  # partitions this process reads (owns the offsets)
        self._counted: set[int] = set()  # partitions whose dead letters it commits
        self._beat_ms = 0
        self._users = 0
        self._settings: Settings | None = None
        self._store: OnlineStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self, partition: int, next_offset: int | None = None) -> None:
        """The worker reading `partition` is alive and has read up to `next_offset`
        (None: unknown here, e.g. an idle Kafka partition)."""
        now = _now_ms()
        self._beat_ms = now
        row = self._rows.get(partition)
        if row is None or partition not in self._read:
            with self._lock:
                self._read.add(partition)
                row = self._rows.setdefault(partition, [next_offset or 0, 0, now])
        if next_offset is not None and next_offset != row[0]:
            row[0] = next_offset
            row[2] = now

    def dead(self, partition: int, n: int) -> None:
        """`n` dead letters of `partition` were committed to Delta."""
        with self._lock:
            self._counted.add(partition)
            row = self._rows.setdefault(partition, [0, 0, _now_ms()])
            row[1] += n
        STREAM_METRICS.dead(n)

    def positions(self) -> dict[int, int]:
        """Next offset to read of each partition this process reads (pipelines.metrics)."""
        with self._lock:
            return {p: self._rows[p][0] for p in self._read if p in self._rows}

    def attach(self, settings: Settings) -> None:
        """A lake sink partition opened: start beating (once per process)."""
        with self._lock:
            self._users += 1
            if self._thread is not None and self._settings == settings:
                return
        self._stop_thread()  # a flow on other stores (tests) left it running
        with self._lock:
            self._users = 1
            self._settings = settings
            try:
                self._store = OnlineStore.from_settings(settings, pool_size=1)
                for p, row in read_status(self._store.engine).items():
                    mine = self._rows.get(p)  # touched by a source built before the sink
                    if mine is None:
                        self._rows[p] = [row.next_offset, row.dead_letters, row.progress_ms]
                    else:
                        mine[1] += row.dead_letters
            except Exception as exc:  # the heartbeat must never stop the stream
                log.warning("stream status: cannot open the online store: %r", exc)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="stream-status", daemon=True)
            self._thread.start()

    def detach(self) -> None:
        """A lake sink partition closed: the last one writes a final beat and stops."""
        with self._lock:
            self._users = max(0, self._users - 1)
            last = self._users == 0
        if last:
            self._stop_thread()

    def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=10)
        self._thread = None
        self.flush()
        if self._store is not None:
            self._store.dispose()
            self._store = None
        with self._lock:
            self._rows, self._read, self._counted = {}, set(), set()
            self._settings = None

    def flush(self) -> None:
        store = self._store
        if store is None or not self._beat_ms:
            return
        with self._lock:
            rows = {
                p: PartitionStatus(p, row[0], row[1], self._beat_ms, row[2])
                for p, row in sorted(self._rows.items())
            }
            read, counted = sorted(self._read), sorted(self._counted)
        try:
            if read:
                offsets = ("next_offset", "heartbeat_ms", "progress_ms")
                write_status(store.engine, [rows[p] for p in read], update=offsets)
            if counted:
                write_status(store.engine, [rows[p] for p in counted], update=("dead_letters",))
        except Exception as exc:
            log.warning("stream status: cannot write the heartbeat: %r", exc)

    def _run(self) -> None:
        settings = self._settings
        interval = settings.stream_heartbeat_s if settings is not None else 2.0
        while not self._stop.wait(interval):
            self.flush()


BOARD = StatusBoard()
