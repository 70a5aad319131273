"""Gold: the spec's window features recomputed from the whole history."""

import time

import dagster as dg
import pyarrow as pa

from definitions.assets.bronze import bronze_events
from definitions.batch.history import (
    EVENT_COLUMNS,
    FEATURES_TABLE,
    event_columns,
    item_catalog,
    read_events,
)
from definitions.metadata import delta_definition, delta_metadata
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource
from nextbest.features.columnar import window_values
from nextbest.ingest.events import item_actor

ALL_COLUMNS = [*EVENT_COLUMNS, "context", "properties"]


@dg.asset(
    deps=[bronze_events],
    group_name="gold",
    kinds={"deltalake"},
    metadata=delta_definition(FEATURES_TABLE),
    retry_policy=IO_RETRY,
)
def user_features(nextbest: NextbestResource) -> dg.MaterializeResult:
    """Every window feature of the spec backfilled from Delta (`gold/user_features`) with
    `nextbest.features.columnar.window_values`, which selects each window with numpy and
    aggregates it with the stream's own aggregation, so a batch value equals the online
    value at the same offset. Item-entity features are keyed `item:<item_id>` as online.
    The online store is not touched: the stream owns it."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    store.ensure_tables()
    base = store.pin(FEATURES_TABLE)  # before bronze: an erasure in between fences
    version = store.version("events")
    events = event_columns(spec, read_events(store, columns=ALL_COLUMNS, version=version))
    catalog = item_catalog(store, spec)
    computed_at = int(time.time() * 1000)
    rows: dict[str, list] = {k: [] for k in ("entity_id", "feature", "group_key", "value")}
    per_feature: dict[str, int] = {}
    for name, feature in spec.window_features().items():
        values = window_values(spec, name, events, catalog)
        per_feature[name] = len(values)
        for entity, groups in values.items():
            entity_id = item_actor(entity) if feature.entity == "item" else entity
            for group, value in groups.items():
                rows["entity_id"].append(entity_id)
                rows["feature"].append(name)
                rows["group_key"].append(group)
                rows["value"].append(value)
    n = len(rows["value"])
    table = pa.table(
        {
            "entity_id": pa.array(rows["entity_id"], pa.string()),
            "feature": pa.array(rows["feature"], pa.string()),
            "group_key": pa.array(rows["group_key"], pa.string()),
            "value": pa.array(rows["value"], pa.float64()),
            "events_version": pa.array([version] * n, pa.int64()),
            "computed_at_ms": pa.array([computed_at] * n, pa.int64()),
        }
    )
    written = store.write(
        FEATURES_TABLE, table, mode="overwrite", schema_mode="overwrite", based_on=base
    )
    return dg.MaterializeResult(
        metadata={
            **delta_metadata(store, FEATURES_TABLE, version=written),
            "events_version": version,
            "entities_per_feature": per_feature,
        }
    )
