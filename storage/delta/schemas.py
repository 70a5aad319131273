"""Arrow schemas and row builders for the Delta tables nextbest owns.

Kept apart from `storage.delta.store` so the stream and the batch can build tables
without opening a store. Every table's `delta.dataSkippingStatsColumns` lists only
non-personal columns: min/max statistics live in the `_delta_log` JSON, which
`vacuum` never deletes, so a user id kept there would survive an erasure.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import pyarrow as pa

from nextbest.ingest.events import Event

TableName = Literal["events", "dead_letters", "decisions", "feedback"]
"""Tables with a fixed schema; derived (silver/gold) tables may use other names."""

TS = pa.timestamp("us", tz="UTC")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("anonymous_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("ts", TS, nullable=False),
        pa.field("value", pa.float64()),
        pa.field("session_id", pa.string()),
        pa.field("context", pa.string()),
        pa.field("properties", pa.string()),
        pa.field("event_date", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32()),
        pa.field("source_offset", pa.int64()),
        pa.field("ingested_at", TS, nullable=False),
    ]
)

DEAD_LETTERS_SCHEMA = pa.schema(
    [
        pa.field("raw", pa.binary()),
        pa.field("error", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_partition", pa.int32()),
        pa.field("source_offset", pa.int64()),
        pa.field("received_at", TS, nullable=False),
    ]
)

DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),
        pa.field("served_from", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("actions", pa.string()),
        pa.field("candidates", pa.string()),
        pa.field("features", pa.string()),
        pa.field("event_date", pa.string(), nullable=False),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("action_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("ts", TS, nullable=False),
        pa.field("value", pa.float64()),
        pa.field("event_date", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    """Schema, partitioning and table properties of one Delta table."""

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...] = ()
    stats_columns: tuple[str, ...] = ()
    extra_configuration: Mapping[str, str] = field(default_factory=dict)

    @property
    def configuration(self) -> dict[str, str | None]:
        conf: dict[str, str | None] = dict(self.extra_configuration)
        if self.stats_columns:
            conf["delta.dataSkippingStatsColumns"] = ",".join(self.stats_columns)
        return conf


TABLES: dict[str, TableSpec] = {
    "events": TableSpec(
        "events",
        EVENTS_SCHEMA,
        partition_by=("event_date",),
        stats_columns=(
            "event_id",
            "type",
            "item_id",
            "ts",
            "value",
            "source_partition",
            "source_offset",
            "ingested_at",
        ),
    ),
    "dead_letters": TableSpec(
        "dead_letters",
        DEAD_LETTERS_SCHEMA,
        stats_columns=("source", "source_partition", "source_offset", "received_at"),
    ),
    "decisions": TableSpec(
        "decisions",
        DECISIONS_SCHEMA,
        partition_by=("event_date",),
        stats_columns=("decision_id", "ts", "served_from", "model_version"),
    ),
    "feedback": TableSpec(
        "feedback",
        FEEDBACK_SCHEMA,
        partition_by=("event_date",),
        stats_columns=("decision_id", "outcome", "ts"),
    ),
}


def utc_date(ts: datetime) -> str:
    """The partition value (YYYY-MM-DD, UTC) of a timestamp."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).date().isoformat()


def conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder and cast `data` to `schema`, filling absent nullable columns with nulls.

    Writers hand us tables built from dicts (large strings, int64 partitions, missing
    optional columns); casting here keeps the Delta schema fixed instead of evolving it.
    """
    extra = set(data.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the table schema: {sorted(extra)}")
    columns: list[pa.Array | pa.ChunkedArray] = []
    for f in schema:
        if f.name in data.column_names:
            columns.append(data.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(data.num_rows, f.type))
        else:
            raise ValueError(f"required column {f.name!r} is missing")
    return pa.Table.from_arrays(columns, schema=schema)


def events_to_table(
    events: Sequence[Event],
    *,
    partition: int | None,
    offsets: Sequence[int] | None,
    ingested_at: datetime | None = None,
) -> pa.Table:
    """Bronze rows for `events`; `offsets[i]` is the source offset of `events[i]`."""
    if offsets is not None and len(offsets) != len(events):
        raise ValueError(f"{len(offsets)} offsets for {len(events)} events")
    now = ingested_at or datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        row = event.to_row()
        row["event_date"] = utc_date(event.ts)
        row["source_partition"] = partition
        row["source_offset"] = offsets[i] if offsets is not None else None
        row["ingested_at"] = now
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA)


@dataclass(frozen=True)
class DeadLetter:
    """A record the stream could not decode, kept verbatim for inspection and replay."""

    raw: bytes | str | None
    error: str
    source: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    received_at: datetime | None = None


def dead_letters_to_table(records: Sequence[DeadLetter]) -> pa.Table:
    now = datetime.now(UTC)
    rows = [
        {
            "raw": r.raw.encode() if isinstance(r.raw, str) else r.raw,
            "error": r.error,
            "source": r.source,
            "source_partition": r.source_partition,
            "source_offset": r.source_offset,
            "received_at": r.received_at or now,
        }
        for r in records
    ]
    return pa.Table.from_pylist(rows, schema=DEAD_LETTERS_SCHEMA)


def _json(value: Any) -> str | None:
    """JSON text with sorted keys. msgspec, not `json.dumps`: the stream converts every
    logged decision (its feature values and scored candidate pool) with this, and
    `json.dumps` made it the stream's largest cost per decision (~0.5 ms for a 60-item
    pool, ~8x msgspec's; benchmarks/stack.py profile)."""
    if value is None or isinstance(value, str):
        return value
    return msgspec.json.encode(value, enc_hook=_plain, order="sorted").decode()


def _plain(value: Any) -> Any:
    """What msgspec cannot encode itself: numpy scalars as their Python number (as
    `json.dumps` wrote a float64), anything else as its str (its `default=str`)."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    return str(value)


def decisions_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Decision-log rows; `actions`/`candidates`/`features` may be JSON text or objects."""
    out: list[dict[str, Any]] = []
    for row in rows:
        ts = row["ts"]
        if not isinstance(ts, datetime):
            raise TypeError(f"decision ts must be a datetime, got {type(ts).__name__}")
        out.append(
            {
                "decision_id": row["decision_id"],
                "user_id": row["user_id"],
                "ts": ts,
                "served_from": row["served_from"],
                "model_version": row.get("model_version"),
                "actions": _json(row.get("actions")),
                "candidates": _json(row.get("candidates")),
                "features": _json(row.get("features")),
                "event_date": row.get("event_date") or utc_date(ts),
            }
        )
    return pa.Table.from_pylist(out, schema=DECISIONS_SCHEMA)


def feedback_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Feedback rows (outcome of a served decision: impression, click, conversion)."""
    out: list[dict[str, Any]] = []
    for row in rows:
        ts = row["ts"]
        if not isinstance(ts, datetime):
            raise TypeError(f"feedback ts must be a datetime, got {type(ts).__name__}")
        out.append(
            {
                "decision_id": row["decision_id"],
                "user_id": row.get("user_id"),
                "outcome": row["outcome"],
                "action_id": row.get("action_id"),
                "item_id": row.get("item_id"),
                "ts": ts,
                "value": row.get("value"),
                "event_date": row.get("event_date") or utc_date(ts),
            }
        )
    return pa.Table.from_pylist(out, schema=FEEDBACK_SCHEMA)
