"""Snapshot reads for /v1/decide, coalesced onto a few dedicated threads.

Why not `anyio.to_thread.run_sync` per request: a thread round trip costs more CPU
than the read itself (~0.1 ms bare on the 2-core machine, ~0.5 ms measured inside the
app once GIL hand-offs between the loop, the pool thread and the decision-log thread
are counted), and the process is bound by one core's worth of GIL. Here each reader
thread takes every request queued while it was busy, reads them one after the other
(~50 us each on SQLite) and hands all results back with a single
`call_soon_threadsafe`: under load one wake-up serves a batch; when idle a request
still gets its own thread immediately. The event loop never runs a store call.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from storage.online.models import CachedDecision
from storage.online.serving import ServingStore, Snapshot

log = logging.getLogger(__name__)
_STOP = object()


class SnapshotReader:
    def __init__(self, store: ServingStore, *, threads: int = 2, max_batch: int = 64) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"snapshot-reader-{n}", daemon=True)
            for n in range(threads)
        ]
        for t in self._threads:
            t.start()

    async def read(self, actor: str, *, surface: str, caps: Mapping[str, int]) -> Snapshot:
        """The user's snapshot; cancel the await to abandon it (the read is discarded)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Snapshot] = loop.create_future()
        self._queue.put((loop, future, actor, surface, caps))
        return await future

    async def read_within(
        self, actor: str, *, surface: str, caps: Mapping[str, int], timeout_s: float
    ) -> Snapshot | None:
        """`read`, or None when it takes longer than `timeout_s` (the read is then
        discarded). One loop timer rather than `anyio.move_on_after`: a cancel scope
        per request (task lookups, a scope stack, a deferred cancel) cost more on the
        event loop than the snapshot read itself."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Snapshot | None] = loop.create_future()
        timer = loop.call_later(timeout_s, _expire, future)
        self._queue.put((loop, future, actor, surface, caps))
        try:
            return await future
        finally:
            timer.cancel()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # let this thread finish the batch first
                    break
                batch.append(item)
            done: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
            for loop, future, actor, surface, caps in batch:
                if future.done():  # abandoned: cancelled or timed out
                    continue
                try:
                    result, ok = self.store.snapshot(actor, surface=surface, caps=caps), True
                except Exception as exc:  # handed to the awaiting request
                    result, ok = exc, False
                done.setdefault(loop, []).append((future, result, ok))
            for loop, results in done.items():
                try:
                    loop.call_soon_threadsafe(_resolve, results)
                except RuntimeError:  # loop closed during shutdown
                    log.debug("event loop closed; %d reads dropped", len(results))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve(results: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, result, ok in results:
        if future.done():
            continue
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)


class AnswerCache:
    """The users' cached decisions (the batch side's answers) as the last successful
    snapshot read returned them, keyed by (user, surface), in memory.

    Why: a decision whose snapshot read overran the budget falls back to the user's
    cached decision, and reading it then meant a second store read in the few
    milliseconds left, which under the very load that made the first read overrun
    almost never fit (benchmarks/stack.py: every fallback was `popular`). From memory
    it costs a dict lookup. Entries expire after `ttl_s` (batch answers change a few
    times a day) and are dropped on erasure (`forget`).
    """

    def __init__(self, *, max_users: int = 100_000, ttl_s: float = 900.0) -> None:
        self.max_users = max_users
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, dict[str, tuple[float, CachedDecision]]] = OrderedDict()

    def put(self, actor: str, surface: str, cached: CachedDecision | None) -> None:
        entry = self._entries.get(actor)
        if cached is None:
            if entry is not None:
                entry.pop(surface, None)
            return
        if entry is None:
            entry = self._entries[actor] = {}
            if len(self._entries) > self.max_users:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(actor)
        entry[surface] = (time.monotonic(), cached)

    def get(self, actor: str, surface: str) -> CachedDecision | None:
        found = self._entries.get(actor, {}).get(surface)
        if found is None or time.monotonic() - found[0] > self.ttl_s:
            return None
        return found[1]

    def forget(self, actor: str) -> None:
        self._entries.pop(actor, None)
