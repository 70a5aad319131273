"""Sinks of the stream: Delta (bronze, dead letters, decisions, feedback), the online
store and the LanceDB `users` table.

Idempotency, because Bytewax recovery is at-least-once for outputs (after a crash the
flow replays from the last snapshot):

- Delta: one `DeltaStore.append` per (table, source partition) with
  `app_id=f"{prefix}-p{partition}"` and `batch_version` = the highest source offset in
  the batch; rows at or below the table's recorded version are dropped first, so a
  replay that regroups offsets never duplicates a row (docs/architecture.md#replays).
- Online store: absolute values keyed by (user, feature, group); a replay rewrites the
  same values.
- LanceDB users: merge_insert by user_id from a single sink partition, so exactly one
  worker in the whole cluster writes the table (lance-format/lance#4585).

Delta and LanceDB buffer rows and seal a batch when the buffer is full, older than
`max_delay_s`, at every Bytewax snapshot (epoch end) and on close, so a micro-batch
spans at most about one epoch (1 s by default). Sealed batches are written by a
background thread (`pipelines.background`) so slow commits never stall the worker;
batches not yet written at a snapshot are part of that epoch's recovery state.
"""

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    Sink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)

from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.background import BackgroundWriter
from pipelines.dedupe import RecentIds
from pipelines.erasure import StreamEraser, erase_marker
from pipelines.metrics import STREAM_METRICS
from pipelines.records import Erase, Record, Update, dead_record
from pipelines.stateful import Expired
from pipelines.status import BOARD
from pipelines.vector_sink import VECTORS_PART, UserVectorSink
from storage.delta.store import (
    DeltaStore,
    dead_letters_to_table,
    decisions_to_table,
    events_to_table,
    feedback_to_table,
)
from storage.online.models import Alias, FeatureRow, UserState
from storage.online.store import OnlineStore

log = logging.getLogger(__name__)

# kind -> (Delta table, app id prefix)
LAKE_TABLES: dict[str, tuple[str, str]] = {
    "event": ("events", "bronze"),
    "dead": ("dead_letters", "dead_letters"),
    "decision": ("decisions", "decisions"),
    "feedback": ("feedback", "feedback"),
}
__all__ = ["VECTORS_PART", "LakeSink", "StreamSinks", "UserVectorSink", "erase_marker"]


def _lake_table(kind: str, partition: int, records: Sequence[Record]) -> pa.Table:
    if kind == "event":
        return events_to_table(
            [r.body for r in records], partition=partition, offsets=[r.offset for r in records]
        )
    if kind == "dead":
        return dead_letters_to_table([r.body for r in records])
    if kind == "decision":
        return decisions_to_table([r.body for r in records])
    return feedback_to_table([r.body for r in records])


@dataclass(frozen=True)
class LakeBatch:
    """One sealed Delta append: rows of one table from one source partition.

    Holds the records, not the Arrow table: the conversion (tens of microseconds a
    row) runs on the background writer thread, not on the Bytewax worker, where a
    whole second's worth of rows at once stalled every other step (and freshness).
    """

    table: str
    app_id: str
    kind: str
    partition: int
    records: tuple[Record, ...]  # unique by offset, ascending


LakeWork = LakeBatch | Erase


class _LakePartition(StatefulSinkPartition[Record, list[LakeWork]]):
    def __init__(
        self,
        store: DeltaStore,
        *,
        max_rows: int,
        max_delay_s: float,
        resume: list[LakeWork] | None,
        name: str,
        eraser: StreamEraser | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._store = store
        self._eraser = eraser
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._buffer: dict[tuple[str, int, str], list[Record]] = {}
        self._rows = 0
        self._first_at: float | None = None
        self._recorded: dict[str, int] = {}  # app id -> committed batch version
        self._recent = RecentIds(store)  # event ids already in bronze, per partition
        self._writer: BackgroundWriter[LakeWork] = BackgroundWriter(self._counted, name=name)
        for batch in resume or []:
            self._writer.submit(batch)
        self._settings = settings
        if settings is not None:
            BOARD.attach(settings)

    def write_batch(self, values: list[Record]) -> None:
        self._writer.check()
        STREAM_METRICS.count(values)
        for record in values:
            if record.kind == "erase":
                # After every row this partition saw before the request (erase is ordered).
                self._seal()
                self._writer.submit(record.body)
                continue
            key = (record.kind, record.partition, _app_prefix(record))
            self._buffer.setdefault(key, []).append(record)
        self._rows += len(values)
        if self._first_at is None and values:
            self._first_at = time.monotonic()
        if self._rows >= self._max_rows or (
            self._first_at is not None and time.monotonic() - self._first_at >= self._max_delay_s
        ):
            self._seal()

    def _seal(self) -> None:
        for (kind, partition, prefix), records in sorted(self._buffer.items()):
            table = LAKE_TABLES[kind][0]
            unique = sorted({r.offset: r for r in records}.values(), key=lambda r: r.offset)
            self._writer.submit(
                LakeBatch(
                    table=table,
                    app_id=f"{prefix}-p{partition}",
                    kind=kind,
                    partition=partition,
                    records=tuple(unique),
                )
            )
        self._buffer.clear()
        self._rows = 0
        self._first_at = None

    def _counted(self, batch: LakeWork) -> None:
        self._apply(batch)
        if isinstance(batch, LakeBatch):  # pipelines.metrics: lag = log end - this
            STREAM_METRICS.applied(batch.partition, batch.records[-1].offset)

    def _apply(self, batch: LakeWork) -> None:
        """Background thread: drop rows at or below the recorded version, append the rest."""
        if isinstance(batch, Erase):
            if self._eraser is not None:
                self._eraser.erase(batch)
            return
        recorded = self._recorded.get(batch.app_id)
        if recorded is None:
            version = self._store.transaction_version(batch.table, batch.app_id)
            recorded = -1 if version is None else version
        keep = [r for r in batch.records if r.offset > recorded]
        if keep and batch.kind == "event":  # a client's retry of an acknowledged event
            fresh = self._recent.fresh(batch.partition, [r.body.event_id for r in keep])
            keep = [r for r, new in zip(keep, fresh, strict=True) if new]
        if not keep:
            self._recorded[batch.app_id] = recorded
            return
        top = keep[-1].offset
        try:
            data = _lake_table(batch.kind, batch.partition, keep)
        except Exception:  # one row Arrow cannot take: keep the others, dead-letter it
            keep, dead = _convertible(batch.kind, batch.partition, keep)
            if dead:
                self._append_dead(batch, dead)
            data = _lake_table(batch.kind, batch.partition, keep)
        self._store.append(batch.table, data, app_id=batch.app_id, batch_version=top)
        self._recorded[batch.app_id] = top
        if batch.kind == "dead":
            BOARD.dead(batch.partition, len(keep))

    def _append_dead(self, batch: LakeBatch, dead: list[Record]) -> None:
        """Dead letters of rows the sink could not convert (their own app id, so they
        are written once however often the batch is replayed)."""
        app_id = f"dead_letters-sink_{batch.kind}-p{batch.partition}"
        version = self._store.transaction_version("dead_letters", app_id)
        dead = [r for r in dead if version is None or r.offset > version]
        if not dead:
            return
        data = dead_letters_to_table([r.body for r in dead])
        self._store.append("dead_letters", data, app_id=app_id, batch_version=dead[-1].offset)
        BOARD.dead(batch.partition, len(dead))

    def snapshot(self) -> list[LakeWork]:
        # Seal, don't wait: batches not yet committed ride along in the epoch's recovery
        # state and are re-submitted on resume (appends are idempotent per app id).
        self._seal()
        return self._writer.pending()

    def close(self) -> None:
        self._seal()
        self._writer.drain()
        if self._settings is not None:
            BOARD.detach()


class LakeSink(FixedPartitionedSink[Record, list[LakeWork]]):
    """Delta tables of the stream; items are keyed by their source partition (str)."""

    def __init__(
        self,
        settings: Settings,
        *,
        parts: int,
        max_rows: int = 100_000,
        max_delay_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._parts = max(1, parts)
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s

    def list_parts(self) -> list[str]:
        return [f"lake{i:03d}" for i in range(self._parts)]

    def part_fn(self, item_key: str) -> int:
        # A source partition always lands on the same sink partition (one writer per
        # app id), whatever the worker count.
        return int(item_key)

    def build_part(
        self, step_id: str, for_part: str, resume_state: list[LakeWork] | None
    ) -> _LakePartition:
        store = DeltaStore.from_settings(self._settings)
        store.ensure_tables()
        return _LakePartition(
            store,
            max_rows=self._max_rows,
            max_delay_s=self._max_delay_s,
            resume=resume_state,
            name=f"{step_id}-{for_part}",
            eraser=StreamEraser(self._settings, store),
            settings=self._settings,
        )


def _app_prefix(record: Record) -> str:
    """The Delta app id prefix of a record: its table's, and for dead letters from a
    step after parsing (`source` "stream:<step>") one per step, since those arrive out
    of offset order with the parse step's and the app version drops anything below it."""
    prefix = LAKE_TABLES[record.kind][1]
    source = getattr(record.body, "source", None) if record.kind == "dead" else None
    if source and source.startswith("stream:"):
        return f"{prefix}-{source.removeprefix('stream:')}"
    return prefix


def _convertible(
    kind: str, partition: int, records: list[Record]
) -> tuple[list[Record], list[Record]]:
    """Split records into those that convert to Arrow rows and dead letters for the rest."""
    good: list[Record] = []
    dead: list[Record] = []
    for record in records:
        try:
            _lake_table(kind, partition, [record])
            good.append(record)
        except Exception as exc:
            raw = (
                record.body.model_dump_json()
                if hasattr(record.body, "model_dump_json")
                else repr(record.body)
            )
            error = f"sink_lake: {type(exc).__name__}: {exc}"
            dead.append(
                dead_record(partition, record.offset, raw, error, source="stream:sink_lake")
            )
    return good, dead


def merge_updates(
    updates: Sequence[Update],
) -> tuple[list[FeatureRow], list[UserState], list[Alias]]:
    """Collapse a batch of updates to the last row per key (absolute values)."""
    features: dict[tuple[str, str, str], FeatureRow] = {}
    states: dict[str, UserState] = {}
    aliases: dict[str, Alias] = {}
    for update in updates:
        for row in update.features:
            features[(row.user_id, row.feature, row.group_key)] = row
        if update.state is not None:
            states[update.state.user_id] = update.state
        for alias in update.aliases:
            aliases[alias.anonymous_id] = alias
    return list(features.values()), list(states.values()), list(aliases.values())


class _OnlinePartition(StatelessSinkPartition[Update | Expired]):
    def __init__(self, store: OnlineStore) -> None:
        self._store = store

    def write_batch(self, items: list[Update | Expired]) -> None:
        # In order: an actor's expiry (spec `state.ttl`) deletes what came before it.
        for expired, run in itertools.groupby(items, key=lambda i: isinstance(i, Expired)):
            if expired:
                self._store.forget_actors([e.actor for e in run if isinstance(e, Expired)])
            else:
                self._write([u for u in run if isinstance(u, Update)])

    def _write(self, items: list[Update]) -> None:
        features, states, aliases = merge_updates(items)
        if not (features or states or aliases):
            return
        try:
            self._store.write_stream_rows(features, states, aliases)
        except Exception:
            if not self._store.ping():
                raise  # the store is down: stop, and resume from the last snapshot
            self._write_each(items)
        STREAM_METRICS.online_written([s.event_ts_ms for s in states])

    def _write_each(self, items: list[Update]) -> None:
        """A row the store refuses (an id too long for its column, a NUL byte) must not
        stop the stream: write update by update and skip (log) the ones refused."""
        for update in items:
            try:
                self._store.write_stream_rows(
                    update.features, [update.state] if update.state else [], update.aliases
                )
            except Exception as exc:
                who = update.state.user_id if update.state else "?"
                log.warning("online sink: rows of %r refused, skipped: %r", who[:80], exc)

    def close(self) -> None:
        self._store.dispose()


class OnlineSink(DynamicSink[Update]):
    """Batched upserts into the online store, one writer connection per worker.

    Writes happen as soon as a batch reaches the sink (no extra buffering), which is
    what keeps event-to-online freshness low; Bytewax already hands over everything
    that accumulated since the last activation as one batch, written in one
    transaction (`OnlineStore.write_stream_rows`), last row per key.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OnlinePartition:
        return _OnlinePartition(OnlineStore.from_settings(self._settings, pool_size=1))


@dataclass(frozen=True)
class StreamSinks:
    """Where the flow writes; tests swap in `bytewax.testing.TestingSink`s.

    `lake` receives (source partition, Record), `online` receives Update, `vectors`
    receives (VECTORS_PART, LanceDB users row).
    """

    lake: Sink[Any]
    online: Sink[Any]
    vectors: Sink[Any]

    @classmethod
    def from_settings(cls, settings: Settings, spec: Spec) -> "StreamSinks":
        return cls(
            lake=LakeSink(settings, parts=settings.partitions),
            online=OnlineSink(settings),
            vectors=UserVectorSink(settings, spec),
        )
