"""Prometheus metrics of the stream worker, served by `serve_metrics` (one endpoint per
stream process; a Bytewax cluster has one per process).

What is counted, and where (hooks of one line each, once per batch, never per event):

- `nextbest_stream_records_total{kind}`, `nextbest_stream_events_total{type}`: records
  the lake sink received (`count`, from `write_batch`); replays after a crash count again.
- `nextbest_stream_dead_letters_written_total`: dead letters this process committed to
  Delta (`dead`); the API's `nextbest_stream_dead_letters_total` is the stored total.
- `nextbest_stream_epoch_duration_seconds`: wall time between two epoch closes (a
  source partition's snapshots): the epoch interval when the worker keeps up, more when not.
- `nextbest_stream_event_to_online_seconds` and `..._last_event_timestamp_seconds`:
  per online-store write, how long after its newest event the write landed (freshness,
  without anyone calling decide).
- Collected at scrape time: `nextbest_stream_end_offset`, `..._read_offset`,
  `..._applied_offset` and `..._lag_records` per partition (log end minus the next
  offset the lake sink committed, else the next the source reads), `..._state_keys`
  per keyed state (live `FoldLogic`s), `..._events_per_second` (last ~10 s).
"""

import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nextbest.settings import Settings

log = logging.getLogger(__name__)

_EPOCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)
MAX_FRESHNESS_S = 3600.0
"""Back-dated events (imports, replays) are not freshness: left out above this."""
RATE_WINDOW_S = 10.0
RUN_DIR = "run"
STATE_KINDS = {"UserProfile": "user", "ItemProfile": "item", "StitchState": "stitch"}


class StreamMetrics:
    """The stream process's registry and the hooks the flow's sinks call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._records = Counter(
            "nextbest_stream_records",
            "Records the stream's lake sink received, by kind"
            " (event, decision, feedback, dead, erase).",
            ["kind"],
            registry=r,
        )
        self._events = Counter(
            "nextbest_stream_events", "Events the stream received, by type.", ["type"], registry=r
        )
        self._dead = Counter(
            "nextbest_stream_dead_letters_written",
            "Dead letters this process committed to Delta (the API's"
            " nextbest_stream_dead_letters_total is the stored total of every process).",
            registry=r,
        )
        self._epoch = Histogram(
            "nextbest_stream_epoch_duration_seconds",
            "Wall time between two epoch closes (snapshots) of the stream.",
            buckets=_EPOCH_BUCKETS,
            registry=r,
        )
        self._fresh = Histogram(
            "nextbest_stream_event_to_online_seconds",
            "Per online-store write: write time minus its newest event's time.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self._last_event = Gauge(
            "nextbest_stream_last_event_timestamp_seconds",
            "Event time of the newest event written to the online store.",
            registry=r,
        )
        self._fresh_last = Gauge(
            "nextbest_stream_event_to_online_last_seconds",
            "The last online-store write's time minus its newest event's time.",
            registry=r,
        )
        self._last_write = Gauge(
            "nextbest_stream_last_write_timestamp_seconds",
            "When the stream last wrote to the online store.",
            registry=r,
        )
        self._children: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._applied: dict[int, int] = {}  # partition -> next offset after the committed
        self._epoch_at: tuple[object, float] | None = None
        self._states: dict[str, weakref.WeakSet[Any]] = {}
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque(maxlen=120)
        self._sources: Callable[[], dict[int, int]] = dict
        self._ends: Callable[[], dict[int, int]] | None = None
        r.register(_Collected(self))

    # -- hooks (called by the flow's steps) ---------------------------------------------

    def count(self, records: Iterable[Any]) -> None:
        """A batch of `pipelines.records.Record`s reached the lake sink."""
        kinds: dict[str, int] = {}
        types: dict[str, int] = {}
        for record in records:
            kind = record.kind
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "event":
                name = record.body.type
                types[name] = types.get(name, 0) + 1
        for kind, n in kinds.items():
            self._child("kind", kind).inc(n)
        for name, n in types.items():
            self._child("type", name).inc(n)
        n = sum(types.values())
        if n:
            now = time.monotonic()
            with self._lock:  # a sample is the total just before a batch
                if not self._samples or now - self._samples[-1][0] >= 1.0:
                    self._samples.append((now, self._total))
                self._total += n

    def dead(self, n: int) -> None:
        self._dead.inc(n)

    def applied(self, partition: int, offset: int) -> None:
        """The lake sink committed (or skipped as already written) up to `offset`."""
        with self._lock:
            if offset + 1 > self._applied.get(partition, -1):
                self._applied[partition] = offset + 1

    def epoch_closed(self, part: object) -> None:
        """A source partition snapshotted (Bytewax does so at every epoch's end, for every
        partition, idle or not); the first one this process saw times the epochs."""
        now = time.monotonic()
        last = self._epoch_at
        if last is not None and last[0] is part:
            self._epoch.observe(now - last[1])
        if last is None or last[0] is part or now - last[1] > 60.0:  # its owner closed
            self._epoch_at = (part, now)

    def online_written(self, event_ts_ms: Sequence[int]) -> None:
        """An online-store write landed holding states whose newest events are these."""
        if not event_ts_ms:
            return
        now = time.time()
        newest = max(event_ts_ms) / 1000
        self._last_write.set(now)
        self._last_event.set(newest)
        if 0 <= now - newest <= MAX_FRESHNESS_S:
            self._fresh.observe(now - newest)
            self._fresh_last.set(now - newest)

    def track_state(self, logic: Any, state: Any) -> None:
        """A keyed state's logic was built (new or resumed); Bytewax drops it on discard."""
        kind = STATE_KINDS.get(type(state).__name__, type(state).__name__.lower())
        states = self._states.get(kind)
        if states is None:
            states = self._states.setdefault(kind, weakref.WeakSet())
        states.add(logic)

    # -- wiring ---------------------------------------------------------------------------

    def watch(
        self, sources: Callable[[], dict[int, int]], ends: Callable[[], dict[int, int]] | None
    ) -> None:
        """Where read positions (source partitions of this process) and log ends come from."""
        self._sources = sources
        self._ends = ends

    def _child(self, label: str, value: str) -> Any:
        child = self._children.get((label, value))
        if child is None:
            metric = self._records if label == "kind" else self._events
            child = self._children.setdefault((label, value), metric.labels(value))
        return child

    def rate(self, now: float | None = None) -> float:
        """Events a second over the last ~RATE_WINDOW_S (0 when idle)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            total = self._total
            older = [s for s in self._samples if s[0] <= now - RATE_WINDOW_S]
            base = older[-1] if older else (self._samples[0] if self._samples else None)
        if base is None or now - base[0] < 0.5:
            return 0.0
        return (total - base[1]) / (now - base[0])

    def collect_live(self) -> Iterator[GaugeMetricFamily]:
        reads = self._sources()
        with self._lock:
            applied = dict(self._applied)
        try:
            ends = self._ends() if self._ends is not None else {}
        except Exception as exc:  # a scrape must never fail on a store hiccup
            log.warning("stream metrics: cannot read the log's end offsets: %r", exc)
            ends = {}
        mine = sorted(set(reads) | set(applied))
        end = GaugeMetricFamily(
            "nextbest_stream_end_offset", "Next offset of the event log.", labels=["partition"]
        )
        read = GaugeMetricFamily(
            "nextbest_stream_read_offset", "Next offset the source reads.", labels=["partition"]
        )
        done = GaugeMetricFamily(
            "nextbest_stream_applied_offset",
            "Next offset after the last record committed by the lake sink.",
            labels=["partition"],
        )
        lag = GaugeMetricFamily(
            "nextbest_stream_lag_records",
            "Log end minus the applied offset (the read offset before the first commit).",
            labels=["partition"],
        )
        for p in mine:
            label = [str(p)]
            if p in reads:
                read.add_metric(label, reads[p])
            if p in applied:
                done.add_metric(label, applied[p])
            if p in ends:
                end.add_metric(label, ends[p])
                position = applied.get(p, reads.get(p, 0))
                lag.add_metric(label, max(0, ends[p] - position))
        keys = GaugeMetricFamily(
            "nextbest_stream_state_keys", "Keys held by a keyed state step.", labels=["state"]
        )
        for kind, states in sorted(self._states.items()):
            keys.add_metric([kind], len(states))
        rate = GaugeMetricFamily(
            "nextbest_stream_events_per_second",
            f"Events the stream received a second, over the last {RATE_WINDOW_S:.0f} s.",
        )
        rate.add_metric([], self.rate())
        yield from (end, read, done, lag, keys, rate)


class _Collected(Collector):
    def __init__(self, metrics: StreamMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._metrics.collect_live()

    def describe(self) -> list[Any]:
        return []  # collected live: nothing to check at registration


STREAM_METRICS = StreamMetrics()


def log_ends(settings: Settings) -> Callable[[], dict[int, int]]:
    """End offsets of the event log (embedded: a reader kept open; Kafka: the brokers'
    high watermarks through a consumer that joins no group)."""
    holder: list[Any] = []
    lock = threading.Lock()

    def ends() -> dict[int, int]:
        with lock:
            if not holder:
                holder.append(_open_ends(settings))
            return holder[0]()

    return ends


def _open_ends(settings: Settings) -> Callable[[], dict[int, int]]:
    if settings.kafka_bootstrap:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": "nextbest-stream-metrics",
                "enable.auto.commit": False,
            }
        )
        topic = settings.kafka_topic

        def kafka_ends() -> dict[int, int]:
            meta = consumer.list_topics(topic, timeout=2.0).topics.get(topic)
            parts = sorted(meta.partitions) if meta is not None else []
            return {
                p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=2.0)[1])
                for p in parts
            }

        return kafka_ends
    from storage.eventlog.log import EventLog

    reader = EventLog.from_settings(settings, mode="reader")
    return reader.end_offsets


class MetricsServer:
    """The HTTP endpoint of one stream process, and its address file under the home."""

    def __init__(self, settings: Settings, process_id: int | None) -> None:
        port = settings.stream_metrics_port
        if port:
            port += process_id or 0  # a cluster on one machine: one port each
        self.server, self.thread = start_http_server(
            port, addr=settings.stream_metrics_host, registry=STREAM_METRICS.registry
        )
        host = settings.stream_metrics_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.url = f"http://{host}:{self.server.server_port}/metrics"
        self.path = metrics_file(settings, process_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        record = {"url": self.url, "pid": os.getpid(), "process_id": process_id or 0}
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            record = json.loads(self.path.read_text())
            if record.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def metrics_file(settings: Settings, process_id: int | None) -> Path:
    return settings.home_dir / RUN_DIR / f"stream-metrics-p{process_id or 0}.json"


def serve_metrics(
    settings: Settings, process_id: int | None, sources: Callable[[], dict[int, int]]
) -> MetricsServer | None:
    """Start this process's endpoint; None (and a warning) when the port is taken."""
    STREAM_METRICS.watch(sources, log_ends(settings))
    try:
        server = MetricsServer(settings, process_id)
    except OSError as exc:  # metrics are not worth stopping the stream for
        log.warning("stream metrics: cannot listen: %r", exc)
        return None
    log.info("stream metrics on %s", server.url)
    return server


def stream_endpoints(settings: Settings) -> list[dict[str, Any]]:
    """Address records of the home's live stream processes (dead ones are skipped)."""
    out = []
    for path in sorted((settings.home_dir / RUN_DIR).glob("stream-metrics-p*.json")):
        try:
            record = json.loads(path.read_text())
            os.kill(int(record["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(record)
    return out
