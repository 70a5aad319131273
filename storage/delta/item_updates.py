"""Delta `item_updates`: the history of item attribute changes made over HTTP.

One row per item per accepted `PUT /v1/items`, appended by the API before it answers.
Attribute values are kept as one JSON object (`attributes`) because their types come
from the spec and differ per attribute; `update_id` groups the rows of one request
and matches the online store's row (`storage.online.items`). Not partitioned: item
updates are few next to events; the maintenance compaction folds the small files.
"""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from storage.delta.store import DeltaStore

TABLE = "item_updates"
SCHEMA = pa.schema(
    [
        pa.field("update_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("attributes", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)


def item_updates_table(
    updates: Mapping[str, Mapping[str, Any]], *, update_id: str, ts: datetime, source: str
) -> pa.Table:
    rows = [
        {
            "update_id": update_id,
            "item_id": item,
            "attributes": json.dumps(dict(attrs), sort_keys=True),
            "ts": ts.astimezone(UTC),
            "source": source,
        }
        for item, attrs in updates.items()
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def append_item_updates(
    delta: DeltaStore,
    updates: Mapping[str, Mapping[str, Any]],
    *,
    update_id: str,
    ts: datetime,
    source: str = "api",
) -> int:
    """Append one request's updates (concurrent appends from several API processes
    are retried by `DeltaStore.write`); returns the table version after it."""
    data = item_updates_table(updates, update_id=update_id, ts=ts, source=source)
    return delta.write(TABLE, data, mode="append")


def read_item_updates(delta: DeltaStore) -> pa.Table:
    return delta.read(TABLE) if delta.exists(TABLE) else SCHEMA.empty_table()
