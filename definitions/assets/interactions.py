"""Gold: how strongly each user interacted with each item."""

import time

import dagster as dg
import numpy as np
import pyarrow as pa

from definitions.assets.bronze import bronze_events
from definitions.batch.history import (
    INTERACTIONS_TABLE,
    aggregate_pairs,
    decayed,
    interactions_of,
    read_events,
)
from definitions.metadata import delta_definition, delta_metadata
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource


@dg.asset(
    deps=[bronze_events],
    group_name="gold",
    kinds={"deltalake"},
    metadata=delta_definition(INTERACTIONS_TABLE),
    retry_policy=IO_RETRY,
)
def gold_interactions(nextbest: NextbestResource) -> dg.MaterializeResult:
    """User x item interaction strength (Delta `gold/interactions`): each event weighted
    by its type's `weight` in the spec, anonymous events attributed to the user they
    were later identified as, and decayed with `model.half_life` measured back from the
    newest event (not the wall clock, so a rerun on the same data is identical)."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    store.ensure_tables()
    base = store.pin(INTERACTIONS_TABLE)  # before bronze: an erasure in between fences
    version = store.version("events")
    inter = interactions_of(spec, read_events(store, version=version))
    reference = int(inter.ts_ms.max()) if len(inter) else int(time.time() * 1000)
    half_life_ms = spec.model.half_life_ms
    weights = decayed(inter.weights, inter.ts_ms, now_ms=reference, half_life_ms=half_life_ms)
    pairs = aggregate_pairs(inter.actors, inter.items, weights, inter.ts_ms)
    n = pairs.num_rows
    pairs = pairs.append_column("events_version", pa.array(np.full(n, version), pa.int64()))
    pairs = pairs.append_column("reference_ts_ms", pa.array(np.full(n, reference), pa.int64()))
    written = store.write(
        INTERACTIONS_TABLE, pairs, mode="overwrite", schema_mode="overwrite", based_on=base
    )
    users = len(pairs.column("user_id").unique()) if n else 0
    items = len(pairs.column("item_id").unique()) if n else 0
    return dg.MaterializeResult(
        metadata={
            **delta_metadata(store, INTERACTIONS_TABLE, version=written),
            "events": len(inter),
            "users": users,
            "items": items,
            "events_version": version,
            "half_life": str(spec.model.half_life or "none"),
            "reference_ts_ms": reference,
        },
        data_version=dg.DataVersion(f"events-v{version}"),
    )
