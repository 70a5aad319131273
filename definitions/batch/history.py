"""Reading the Delta history into the shapes the assets need.

Bronze rows become numpy columns (for the model path, which must scale to millions of
events) or `Event` objects (for the feature backfill, which must run the stream's own
feature code). Identity stitching uses `nextbest.features.semantics.identity_links`, the
function the stream uses, so both sides attribute anonymous events the same way.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from definitions.batch.arrow import pc
from nextbest.features.columnar import EventColumns, ts_ms_of_us
from nextbest.features.semantics import identity_links
from nextbest.ingest.events import Event, EventContext, anon_actor
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore

ITEMS_TABLE = "items"
INTERACTIONS_TABLE = "gold/interactions"
SESSIONS_TABLE = "silver/sessions"
FEATURES_TABLE = "gold/user_features"
TRAINING_TABLE = "gold/training_set"

EVENT_COLUMNS = ("event_id", "type", "user_id", "anonymous_id", "item_id", "ts", "value")


def read_events(
    store: DeltaStore,
    *,
    columns: Sequence[str] = EVENT_COLUMNS,
    version: int | None = None,
    filters: Any = None,
) -> pa.Table:
    """Bronze rows sorted by (ts, event_id): the order every fold below relies on."""
    if not store.exists("events"):
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    cols = list(dict.fromkeys([*columns, "ts", "event_id"]))
    table = store.read("events", columns=cols, version=version, filters=filters)
    return table.sort_by([("ts", "ascending"), ("event_id", "ascending")]).select(list(columns))


def ts_ms(table: pa.Table) -> np.ndarray:
    if table.num_rows == 0:
        return np.zeros(0, np.int64)
    col = table.column("ts").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return col.to_numpy() // 1000


def stitched_actors(spec: Spec, table: pa.Table) -> np.ndarray:
    """Per row: user_id, else the linked user of its anonymous_id, else 'anon:<id>'."""
    n = table.num_rows
    if n == 0:
        return np.zeros(0, dtype=object)
    kinds = spec.identify_events()
    links: dict[str, str] = {}
    if kinds:
        ident = table.filter(pc.is_in(table.column("type"), pa.array(kinds)))
        links = identity_links(spec, rows_to_events(ident))
    users = np.asarray(table.column("user_id").to_pylist(), dtype=object)
    anons = table.column("anonymous_id").to_pylist()
    missing = np.flatnonzero(pc.is_null(table.column("user_id")).to_numpy(zero_copy_only=False))
    for i in missing.tolist():
        anon = anons[i]
        users[i] = links.get(anon) or anon_actor(anon)
    return users


def event_columns(spec: Spec, table: pa.Table) -> EventColumns:
    """Bronze rows (sorted as `read_events` sorts them) as the columns the window
    backfill reads, actors stitched; `properties` kept raw when read."""
    n = table.num_rows
    us = (
        table.column("ts").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
        if n
        else np.zeros(0, np.int64)
    )

    def objects(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_pylist(), dtype=object)

    return EventColumns(
        event_id=objects("event_id"),
        type=objects("type"),
        actor=stitched_actors(spec, table),
        item_id=objects("item_id"),
        ts_ms=ts_ms_of_us(us),
        value=objects("value"),
        properties=(
            table.column("properties").to_pylist() if "properties" in table.column_names else None
        ),
    )


def rows_to_events(table: pa.Table) -> list[Event]:
    """Delta rows back to `Event`s without re-validating (they were validated on ingest)."""
    n = table.num_rows
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    for name in EVENT_COLUMNS:
        cols.setdefault(name, [None] * n)
    out: list[Event] = []
    for i in range(n):
        ctx = cols["context"][i] if "context" in cols else None
        props = cols["properties"][i] if "properties" in cols else None
        ts = cols["ts"][i]
        out.append(
            Event.model_construct(
                event_id=cols["event_id"][i],
                type=cols["type"][i],
                user_id=cols["user_id"][i],
                anonymous_id=cols["anonymous_id"][i],
                item_id=cols["item_id"][i],
                ts=ts if ts.tzinfo else ts.replace(tzinfo=UTC),
                value=cols["value"][i],
                context=EventContext.model_construct(**json.loads(ctx)) if ctx else EventContext(),
                properties=json.loads(props) if props else {},
            )
        )
    return out


@dataclass(frozen=True)
class Interactions:
    """Weighted item events as columns: one row per event with a positive weight."""

    actors: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    ts_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def select(self, mask: np.ndarray) -> "Interactions":
        return Interactions(
            self.actors[mask], self.items[mask], self.weights[mask], self.ts_ms[mask]
        )


def interactions_of(spec: Spec, table: pa.Table) -> Interactions:
    """Bronze rows -> item interactions weighted by the spec's event weights."""
    weights_by_type = {n: e.weight for n, e in spec.events.items() if e.entity == "item"}
    types = np.asarray(table.column("type").to_pylist(), dtype=object)
    weights = np.asarray([weights_by_type.get(t, 0.0) for t in types], dtype=np.float64)
    has_item = ~pc.is_null(table.column("item_id")).to_numpy(zero_copy_only=False)
    keep = (weights > 0) & has_item
    actors = stitched_actors(spec, table)
    items = np.asarray(table.column("item_id").to_pylist(), dtype=object)
    return Interactions(actors[keep], items[keep], weights[keep], ts_ms(table)[keep])


def decayed(
    weights: np.ndarray, ts: np.ndarray, *, now_ms: int, half_life_ms: float | None
) -> np.ndarray:
    """w * 0.5 ** (age / half_life); events after `now_ms` count as age 0; None: no decay."""
    if half_life_ms is None:
        return weights
    age = np.maximum(0, now_ms - ts).astype(np.float64)
    return weights * np.power(0.5, age / half_life_ms)


def aggregate_pairs(
    actors: np.ndarray, items: np.ndarray, weights: np.ndarray, ts: np.ndarray
) -> pa.Table:
    """One row per (user_id, item_id): summed weight, event count, last ts (epoch ms)."""
    table = pa.table(
        {
            "user_id": pa.array(actors.tolist(), pa.string()),
            "item_id": pa.array(items.tolist(), pa.string()),
            "weight": pa.array(weights, pa.float64()),
            "ts_ms": pa.array(ts, pa.int64()),
        }
    )
    grouped = table.group_by(["user_id", "item_id"], use_threads=False).aggregate(
        [("weight", "sum"), ("weight", "count"), ("ts_ms", "max")]
    )
    return pa.table(
        {
            "user_id": grouped.column("user_id"),
            "item_id": grouped.column("item_id"),
            "weight": grouped.column("weight_sum"),
            "events": grouped.column("weight_count").cast(pa.int64()),
            "last_ts_ms": grouped.column("ts_ms_max"),
        }
    )


def item_catalog(store: DeltaStore, spec: Spec) -> dict[str, dict[str, Any]]:
    """item_id -> declared attributes, from the Delta `items` table (empty if none)."""
    if not store.exists(ITEMS_TABLE):
        return {}
    names = [n for n in spec.entities.item.attributes]
    table = store.read(ITEMS_TABLE)
    present = [n for n in names if n in table.column_names]
    rows = table.select(["item_id", *present]).to_pylist()
    return {row.pop("item_id"): row for row in rows}


def group_attribute(spec: Spec) -> str | None:
    """The item attribute used for cold-start vectors and diversity: the default
    policy's `group_by`, else the first non-text string attribute."""
    for policy in spec.policies.values():
        if policy.group_by and policy.group_by in spec.entities.item.attributes:
            return policy.group_by
    for name, attr in spec.entities.item.attributes.items():
        if attr.type == "string" and not attr.text:
            return name
    return None


def item_universe(catalog: Mapping[str, Any], interacted: Sequence[str]) -> list[str]:
    """Catalog items plus any interacted item missing from it, in a stable order."""
    return sorted(set(catalog) | set(interacted))


def utc_now() -> datetime:
    return datetime.now(UTC)
