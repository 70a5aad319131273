"""Gold: a point-in-time-correct training set for ranking models."""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from definitions.assets.bronze import bronze_events
from definitions.assets.features import ALL_COLUMNS
from definitions.batch.history import TRAINING_TABLE, item_catalog, read_events, rows_to_events
from definitions.metadata import delta_definition, delta_metadata
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource
from nextbest.features.semantics import (
    WindowState,
    actor_of,
    aggregate,
    applies,
    field_value,
    group_key,
    identity_links,
    new_window_state,
)
from nextbest.ingest.events import Event
from nextbest.spec.models import Spec, WindowFeature

LABEL_DAYS = 7
"""Label events are the item events of the last week of history."""


def value_at(state: WindowState | None, feature: WindowFeature, ts_ms: int, group: str) -> float:
    """A window feature as it was just before an event at `ts_ms`: only events already
    folded (strictly earlier in event order) and inside (ts_ms - window, ts_ms]."""
    if state is None:
        return 0.0
    since = ts_ms - state.window_ms
    values = [v for t, _, g, v in state.entries if t > since and g == group]
    return aggregate(feature.agg, values) if values else 0.0


def point_in_time_rows(
    spec: Spec,
    events: Sequence[Event],
    items: Mapping[str, Mapping[str, Any]],
    *,
    label_from_ms: int,
) -> dict[str, list]:
    """One row per labelled item event at or after `label_from_ms`, with the user's
    features computed from strictly earlier events only (no leakage from the label or
    the future). `events` must be sorted by (ts, event_id)."""
    features = {n: f for n, f in spec.window_features().items() if f.entity == "user"}
    aliases = identity_links(spec, events)
    weights = {n: e.weight for n, e in spec.events.items() if e.entity == "item"}
    states: dict[tuple[str, str], WindowState] = {}
    out: dict[str, list] = {c: [] for c in ("user_id", "item_id", "event_type", "ts_ms", "label")}
    out.update({n: [] for n in features})
    for event in events:
        user = actor_of(event, aliases)
        item = items.get(event.item_id) if event.item_id else None
        ts = event.ts_ms
        if event.item_id and weights.get(event.type, 0.0) > 0 and ts >= label_from_ms:
            out["user_id"].append(user)
            out["item_id"].append(event.item_id)
            out["event_type"].append(event.type)
            out["ts_ms"].append(ts)
            out["label"].append(weights[event.type])
            for name, feature in features.items():
                group = group_key(feature, item)
                state = states.get((user, name))
                out[name].append(None if group is None else value_at(state, feature, ts, group))
        for name, feature in features.items():
            if not applies(feature, event):
                continue
            group = group_key(feature, item)
            if group is None:
                continue
            state = states.get((user, name))
            if state is None:
                state = states[(user, name)] = new_window_state(feature)
            state.add(ts, event.event_id, group, field_value(spec, feature, event, item))
    return out


@dg.asset(
    deps=[bronze_events],
    group_name="gold",
    kinds={"deltalake"},
    metadata=delta_definition(TRAINING_TABLE),
    retry_policy=IO_RETRY,
)
def training_set(nextbest: NextbestResource) -> dg.MaterializeResult:
    """Labelled examples for ranking models (Delta `gold/training_set`): every item event
    of the last week is a row (label = its type's weight) with the user's window
    features as they were just before it, computed with the stream's window semantics
    from strictly earlier events. Grouped features take the label item's group
    (e.g. the affinity to that item's category)."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    store.ensure_tables()
    base = store.pin(TRAINING_TABLE)  # before bronze: an erasure in between fences
    version = store.version("events")
    events = rows_to_events(read_events(store, columns=ALL_COLUMNS, version=version))
    newest = max((e.ts_ms for e in events), default=0)
    rows = point_in_time_rows(
        spec, events, item_catalog(store, spec), label_from_ms=newest - LABEL_DAYS * 86_400_000
    )
    n = len(rows["label"])
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(rows.pop("user_id"), pa.string()),
        "item_id": pa.array(rows.pop("item_id"), pa.string()),
        "event_type": pa.array(rows.pop("event_type"), pa.string()),
        "ts": pa.array(rows.pop("ts_ms"), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "label": pa.array(rows.pop("label"), pa.float64()),
    }
    columns.update({name: pa.array(values, pa.float64()) for name, values in rows.items()})
    columns["events_version"] = pa.array(np.full(n, version), pa.int64())
    table = pa.table(columns)
    written = store.write(
        TRAINING_TABLE, table, mode="overwrite", schema_mode="overwrite", based_on=base
    )
    return dg.MaterializeResult(
        metadata={
            **delta_metadata(store, TRAINING_TABLE, version=written),
            "features": list(rows),
            "label_days": LABEL_DAYS,
            "events_version": version,
        }
    )
