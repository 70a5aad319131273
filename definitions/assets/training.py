"""Gold: a point-in-time-correct training set for ranking models."""

from collections.abc import Mapping
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from definitions.assets.bronze import bronze_events
from definitions.assets.features import ALL_COLUMNS
from definitions.batch.history import TRAINING_TABLE, event_columns, item_catalog, read_events
from definitions.metadata import delta_definition, delta_metadata
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource
from nextbest.features.columnar import EventColumns, values_before
from nextbest.spec.models import Spec

LABEL_DAYS = 7
"""Label events are the item events of the last week of history."""


def point_in_time_rows(
    spec: Spec,
    events: EventColumns,
    items: Mapping[str, Mapping[str, Any]],
    *,
    label_from_ms: int,
) -> dict[str, list]:
    """One row per labelled item event at or after `label_from_ms`, with the user's
    features computed from strictly earlier events only (no leakage from the label or
    the future): `nextbest.features.columnar.values_before`."""
    weights = {n: e.weight for n, e in spec.events.items() if e.entity == "item"}
    weight = np.array([weights.get(t, 0.0) for t in events.type.tolist()], float)
    has_item = events.item_id != None  # noqa: E711 (elementwise on an object array)
    at = np.flatnonzero(has_item & (weight > 0) & (events.ts_ms >= label_from_ms))
    out: dict[str, list] = {
        "user_id": events.actor[at].tolist(),
        "item_id": events.item_id[at].tolist(),
        "event_type": events.type[at].tolist(),
        "ts_ms": events.ts_ms[at].tolist(),
        "label": weight[at].tolist(),
    }
    for name, feature in spec.window_features().items():
        if feature.entity == "user":
            out[name] = values_before(spec, name, events, items, at)
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
    events = event_columns(spec, read_events(store, columns=ALL_COLUMNS, version=version))
    newest = int(events.ts_ms.max()) if len(events) else 0
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
