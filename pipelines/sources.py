"""Sources of the stream: the embedded event log and Kafka, with one item shape.

Both emit `(partition, offset, key, payload)` and keep the next offset of each
partition as Bytewax resume state, so after a crash the flow re-reads from the last
snapshot and the idempotent sinks absorb the overlap.
"""

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING

from nextbest.settings import Settings
from pipelines.metrics import STREAM_METRICS
from pipelines.records import SourceItem
from pipelines.status import BOARD
from storage.eventlog.log import EventLog

DEFAULT_BATCH = 2000
IDLE_MIN = timedelta(milliseconds=2)
IDLE_MAX = timedelta(milliseconds=20)


class _LogPartition(StatefulSourcePartition[SourceItem, int]):
    """One partition of the embedded log; backs off (via `next_awake`) when idle."""

    def __init__(
        self,
        log: EventLog,
        partition: int,
        offset: int,
        *,
        stop_at: int | None,
        batch_size: int,
    ) -> None:
        self._log = log
        self._partition = partition
        self._offset = offset
        self._stop_at = stop_at
        self._batch_size = batch_size
        self._idle = timedelta(0)
        self._awake: datetime | None = None

    def next_batch(self) -> list[SourceItem]:
        BOARD.touch(self._partition, self._offset)  # the heartbeat (pipelines.status)
        limit = self._batch_size
        if self._stop_at is not None:
            if self._offset >= self._stop_at:
                raise StopIteration()
            limit = min(limit, self._stop_at - self._offset)
        records = self._log.read(self._partition, self._offset, max_records=limit)
        if self._stop_at is not None:
            records = [r for r in records if r[0] < self._stop_at]
        if not records:
            # Nothing new: sleep a little longer each time, up to IDLE_MAX, so an idle
            # flow costs almost no CPU while a busy one never waits.
            self._idle = min(max(self._idle * 2, IDLE_MIN), IDLE_MAX)
            self._awake = datetime.now(UTC) + self._idle
            # Erased records can leave a gap right below the stop offset: skip it.
            stop = self._stop_at
            if stop is not None and self._log.end_offsets()[self._partition] >= stop:
                self._offset = stop
            return []
        self._idle = timedelta(0)
        self._awake = None
        self._offset = records[-1][0] + 1
        p = self._partition
        BOARD.touch(p, self._offset)
        return [(p, offset, key, payload) for offset, key, payload in records]

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        STREAM_METRICS.epoch_closed(self)  # called every epoch, idle or not
        return self._offset

    def close(self) -> None:
        self._log.close()


class EventLogSource(FixedPartitionedSource[SourceItem, int]):
    """The embedded durable log (`storage.eventlog.log`), one Bytewax partition per log
    partition. `tail=False` stops at the end offsets seen when a partition starts,
    which makes a bounded run (tests, backfills) return."""

    def __init__(
        self,
        path: str | Path,
        *,
        partitions: int,
        tail: bool = True,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self.path = Path(path)
        self.partitions = partitions
        self.tail = tail
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: Settings, *, tail: bool = True) -> "EventLogSource":
        return cls(settings.eventlog_dir, partitions=settings.partitions, tail=tail)

    def list_parts(self) -> list[str]:
        # Every worker can read every partition; Bytewax picks one primary per part.
        return [f"p{p}" for p in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LogPartition:
        partition = int(for_part.removeprefix("p"))
        log = EventLog.open(self.path, partitions=self.partitions, mode="reader")
        stop_at = None if self.tail else log.end_offsets()[partition]
        return _LogPartition(
            log,
            partition,
            resume_state or 0,
            stop_at=stop_at,
            batch_size=self.batch_size,
        )


def _to_item(msg: Any) -> SourceItem:
    key = msg.key.decode("utf-8", errors="replace") if msg.key is not None else ""
    return (int(msg.partition), int(msg.offset), key, bytes(msg.value or b""))


class _KafkaPartition(StatefulSourcePartition[SourceItem, Any]):
    """Adapts Bytewax's Kafka partition to the stream's item shape."""

    def __init__(self, inner: StatefulSourcePartition[Any, Any], partition: int) -> None:
        self._inner = inner
        self._partition = partition

    def next_batch(self) -> Iterable[SourceItem]:
        # A null value is a tombstone (erasure on a compacted topic): nothing to process.
        items = [
            _to_item(m)
            for m in self._inner.next_batch()
            if isinstance(m, KafkaSourceMessage) and m.value is not None
        ]
        # The heartbeat (pipelines.status); the broker's end offsets are not known here.
        BOARD.touch(self._partition, items[-1][1] + 1 if items else None)
        return items

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        STREAM_METRICS.epoch_closed(self)  # called every epoch, idle or not
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class KafkaEventSource(FixedPartitionedSource[SourceItem, Any]):
    """`bytewax.connectors.kafka.KafkaSource` on one topic, emitting SourceItem tuples.

    Bytewax assigns topic partitions itself (no consumer group) and keeps offsets in
    its recovery store; `tail=False` stops at the end of each partition.
    """

    def __init__(
        self,
        brokers: Sequence[str],
        topic: str,
        *,
        tail: bool = True,
        add_config: dict[str, str] | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self._inner = KafkaSource(
            list(brokers),
            [topic],
            tail=tail,
            starting_offset=OFFSET_BEGINNING,
            add_config=add_config,
            batch_size=batch_size,
            raise_on_errors=True,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, tail: bool = True, add_config: dict[str, str] | None = None
    ) -> "KafkaEventSource":
        if not settings.kafka_bootstrap:
            raise ValueError("settings.kafka_bootstrap is not set")
        brokers = [b.strip() for b in settings.kafka_bootstrap.split(",") if b.strip()]
        return cls(brokers, settings.kafka_topic, tail=tail, add_config=add_config)

    def list_parts(self) -> list[str]:
        return self._inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _KafkaPartition:
        inner = self._inner.build_part(step_id, for_part, resume_state)
        return _KafkaPartition(inner, int(for_part.split("-", 1)[0]))  # "<index>-<topic>"


def source_from_settings(
    settings: Settings, *, tail: bool = True
) -> EventLogSource | KafkaEventSource:
    """Kafka if `kafka_bootstrap` is set, else the embedded log (docs/architecture.md#data-home)."""
    if settings.kafka_bootstrap:
        return KafkaEventSource.from_settings(settings, tail=tail)
    return EventLogSource.from_settings(settings, tail=tail)
