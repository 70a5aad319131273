"""A single background writer thread per sink partition, with recoverable pending work.

Delta commits and LanceDB merge_inserts take tens to hundreds of milliseconds. Done on
the Bytewax worker thread they stall every other step (and event-to-online freshness)
for that long. So sinks seal their buffer into a batch and submit it here; the thread
applies batches in order.

Recovery stays exact without waiting: `pending()` is what the sink returns from
`snapshot()`, i.e. every batch sealed but not yet applied becomes part of the epoch's
recovery state, and a resumed partition re-submits it. Batches must therefore be
idempotent (Delta txn versions, upserts of absolute values) and cheap to pickle
(Arrow tables, plain dicts).
"""

import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B")


class BackgroundWriter(Generic[B]):
    """Applies submitted batches in order on one daemon thread; fails loudly."""

    def __init__(self, apply: Callable[[B], None], *, name: str) -> None:
        self._apply = apply
        self._queue: queue.Queue[tuple[int, B]] = queue.Queue()
        self._pending: dict[int, B] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: B) -> None:
        self.check()
        with self._lock:
            self._seq += 1
            self._pending[self._seq] = batch
            self._queue.put((self._seq, batch))

    def pending(self) -> list[B]:
        """Batches submitted and not yet applied, oldest first (recovery state)."""
        self.check()
        with self._lock:
            return [self._pending[k] for k in sorted(self._pending)]

    def drain(self) -> None:
        """Block until everything submitted so far is applied (or raise its error)."""
        while True:
            with self._lock:
                idle = not self._pending
            if idle or self._error is not None or not self._thread.is_alive():
                break
            time.sleep(0.005)
        self.check()

    def check(self) -> None:
        """Re-raise a failure of the writer thread on the worker thread (crash -> recover)."""
        if self._error is not None:
            raise RuntimeError(f"background writer {self._thread.name} failed") from self._error

    def _run(self) -> None:
        while True:
            seq, batch = self._queue.get()
            try:
                self._apply(batch)
            except BaseException as exc:  # surfaced by check() on the worker thread
                self._error = exc
                return
            with self._lock:
                self._pending.pop(seq, None)
