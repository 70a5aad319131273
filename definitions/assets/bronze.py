"""Bronze: the Delta `events` table, observed rather than written."""

from typing import Any

import dagster as dg

from definitions.batch.arrow import pc
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource


@dg.asset(group_name="bronze", kinds={"deltalake"}, retry_policy=IO_RETRY)
def bronze_events(nextbest: NextbestResource) -> dg.MaterializeResult:
    """Raw events exactly as accepted: the Delta table `events`, appended to by the
    stream (and `nextbest import`), never rewritten here. Materializing it records the
    Delta version and row count, which downstream assets and the model registry use as
    the data version of what they were computed from."""
    store = nextbest.delta()
    store.ensure_tables()
    version = store.version("events")
    table = store.read("events", version=version, columns=["ts", "ingested_at", "event_date"])
    metadata: dict[str, Any] = {
        "delta_version": version,
        "rows": table.num_rows,
        "days": len(pc.unique(table.column("event_date"))) if table.num_rows else 0,
        "path": dg.MetadataValue.path(store.uri("events")),
    }
    if table.num_rows:
        metadata["first_event"] = str(pc.min(table.column("ts")).as_py())
        metadata["last_event"] = str(pc.max(table.column("ts")).as_py())
        metadata["last_ingested"] = str(pc.max(table.column("ingested_at")).as_py())
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(f"v{version}"))
