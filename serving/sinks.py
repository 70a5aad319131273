"""Where the API writes: the durable event log (embedded or Kafka) and the decision log.

`EventSink.append` returns only once the records are durable (fsynced by the embedded
log, or acknowledged by every in-sync Kafka replica with an idempotent producer), which
is what lets `/v1/events` answer 202 honestly.

Decisions are logged off the request path: `DecisionLog.submit` only enqueues; a
thread drains the queue once per `interval_s` (20 ms), encodes the records and appends
them in one batch (one fsync per partition), then counts offer caps. A crash can lose
the last few tens of milliseconds of decision records, never an accepted event.

Why a fixed cadence rather than writing as soon as something is queued: at a few
hundred decisions per second that wrote nearly every record alone, and one fdatasync
per decision cost more CPU than the decision (measured with benchmarks/decide_cpu.py).
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from nextbest.settings import Settings
from storage.eventlog.log import EventLog

log = logging.getLogger(__name__)
Record = tuple[str, bytes]
CapHit = tuple[str, str, int]


class EventSink(Protocol):
    def append(self, records: Sequence[Record]) -> None: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


class EventLogSink:
    """The embedded log; this process is its only writer, or one of the API's worker
    processes (`settings.api_workers` > 1), which write it as shared writers."""

    def __init__(self, settings: Settings) -> None:
        shared = settings.api_workers > 1
        self.log = EventLog.from_settings(settings, mode="writer", shared=shared)

    def append(self, records: Sequence[Record]) -> None:
        self.log.append(list(records))

    def ping(self) -> bool:
        """Ready only when an append could succeed now (`EventLog.unwritable`)."""
        return self.problem() is None

    def problem(self) -> str | None:
        """`not writable: <reason>` (disk full, a failed write, ...) or None, for /ready."""
        reason = self.log.unwritable()
        return None if reason is None else f"not writable: {reason}"

    def close(self) -> None:
        self.log.close()


class KafkaSink:
    """Idempotent producer (acks=all); `append` waits for every delivery report."""

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        assert settings.kafka_bootstrap
        self.topic = settings.kafka_topic
        self.timeout_s = timeout_s
        self.producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "client.id": "nextbest-api",
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        done = threading.Event()
        pending = [len(records)]
        errors: list[str] = []
        lock = threading.Lock()

        def delivered(err: Any, _msg: Any) -> None:
            with lock:
                if err is not None:
                    errors.append(str(err))
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        for key, payload in records:
            while True:
                try:
                    self.producer.produce(self.topic, payload, key.encode(), on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.01)
        if not done.wait(self.timeout_s):
            raise TimeoutError(f"Kafka did not acknowledge within {self.timeout_s}s")
        if errors:
            raise RuntimeError(f"Kafka delivery failed: {errors[0]}")

    def ping(self) -> bool:
        try:
            self.producer.list_topics(self.topic, timeout=2.0)
        except Exception:
            return False
        return True

    def close(self) -> None:
        self.producer.flush(10.0)
        self._stop.set()
        self._poller.join(timeout=2.0)
        self.producer.close()  # stop librdkafka's threads now, not at garbage collection


def open_sink(settings: Settings) -> EventSink:
    return KafkaSink(settings) if settings.kafka_bootstrap else EventLogSink(settings)


class DecisionLog:
    """Batched, asynchronous decision and cap logging (one writer thread)."""

    def __init__(
        self,
        sink: EventSink,
        *,
        count_caps: Callable[[Sequence[CapHit]], Any] | None = None,
        interval_s: float = 0.02,
        max_batch: int = 2000,
        max_pending: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.sink = sink
        self.count_caps = count_caps
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.on_drop = on_drop
        self._queue: deque[tuple[str, dict[str, Any], list[CapHit]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._urgent = 0  # flush() callers waiting: write without waiting out the interval
        self._inflight = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def submit(self, key: str, record: dict[str, Any], caps: list[CapHit] | None = None) -> None:
        """Enqueue; never blocks the caller (drops, and counts, when far behind).
        Callable values in `record` are evaluated on the writer thread."""
        if len(self._queue) >= self.max_pending:
            if self.on_drop is not None:
                self.on_drop(1)
            return
        self._queue.append((key, record, caps or []))

    def forget(self, user_id: str) -> int:
        """Erasure: drop this user's records that are still queued."""
        with self._cond:
            kept = [e for e in self._queue if e[0] != user_id]
            dropped = len(self._queue) - len(kept)
            self._queue.clear()
            self._queue.extend(kept)
        return dropped

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        with self._cond:
            self._urgent += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(
                    lambda: not self._queue and self._inflight == 0, timeout=timeout_s
                )
            finally:
                self._urgent -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30.0)

    def _take(self) -> list[tuple[str, dict[str, Any], list[CapHit]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch:
            batch.append(self._queue.popleft())
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                # One write per interval (group commit), sooner only for close/flush
                # or a full batch.
                if not self._closed and (
                    not self._queue or (not self._urgent and len(self._queue) < self.max_batch)
                ):
                    self._cond.wait(self.interval_s)
                if self._closed and not self._queue:
                    return
                batch = self._take()
                self._inflight = len(batch)
            try:
                self._write(batch)
            except Exception:
                log.exception("decision log write failed; %d records lost", len(batch))
                if self.on_drop is not None:
                    self.on_drop(len(batch))
            finally:
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()

    def _write(self, batch: list[tuple[str, dict[str, Any], list[CapHit]]]) -> None:
        if not batch:
            return
        records = [(key, _encode(rec)) for key, rec, _ in batch]
        self.sink.append(records)
        self.written += len(records)
        hits = [h for _, _, caps in batch for h in caps]
        if hits and self.count_caps is not None:
            self.count_caps(hits)


def _resolve(value: Any) -> Any:
    if callable(value):
        return value()
    if isinstance(value, dict):
        return {k: (v() if callable(v) else v) for k, v in value.items()}
    return value


def _encode(record: dict[str, Any]) -> bytes:
    """JSON of a record whose callable values (top level, or one level down in a dict)
    are deferred work, evaluated here (msgspec: several times faster than json.dumps,
    and this runs per decision)."""
    resolved = {k: _resolve(v) for k, v in record.items()}
    return msgspec.json.encode(resolved, enc_hook=str)
