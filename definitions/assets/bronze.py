"""Bronze: the Delta table `events`, written by the stream and `nextbest import`, never
by Dagster. It is an observable source asset: a run (the `retrain` job observes it
first) or the `observe_external_tables` sensor records its Delta version as the data
version, so downstream materializations name the bronze version they were computed
from and the UI marks them stale when the stream has appended since."""

import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pyarrow as pa

from definitions.batch.arrow import pc
from definitions.metadata import (
    DATA_VERSION_TAG,
    add_actions,
    delta_definition,
    delta_metadata,
    delta_snapshot,
)
from storage.delta.schemas import EVENTS_SCHEMA
from storage.delta.store import DeltaStore

DESCRIPTION = (
    "Raw events exactly as accepted: the Delta table `events`, appended to by the stream "
    "(and `nextbest import`), never rewritten by Dagster. Observed, not materialized: "
    "its data version is the Delta version, which downstream assets and the model "
    "registry record as the data they were computed from."
)

BRONZE_SPEC = dg.AssetSpec(
    "bronze_events",
    group_name="bronze",
    kinds={"deltalake"},
    description=DESCRIPTION,
    metadata={**delta_definition("events", EVENTS_SCHEMA), "written_by": "stream, import"},
)


def observe_delta(store: DeltaStore, table: str) -> tuple[int, dict[str, Any]]:
    """(Delta version, metadata) of a table another process writes: the standard table
    metadata, plus the event-time range and the day count from the log's per-file
    statistics (no data file is read)."""
    dt = delta_snapshot(store, table)
    files = add_actions(dt)
    metadata: dict[str, Any] = delta_metadata(store, table, dt=dt, files=files)
    if files.num_rows:
        metadata.update(_stats(files))
    return dt.version(), metadata


def observation(key: dg.AssetKey, version: int, metadata: dict[str, Any]) -> dg.AssetObservation:
    """The observation a sensor reports, carrying the Delta version as data version."""
    return dg.AssetObservation(
        asset_key=key, metadata=metadata, tags={DATA_VERSION_TAG: str(version)}
    )


def _stats(files: pa.Table) -> dict[str, Any]:
    """Event-time range and day count of the snapshot's files (null stats are skipped)."""
    out: dict[str, Any] = {}
    names = set(files.column_names)
    for label, column, agg in (
        ("first_event", "min.ts", pc.min),
        ("last_event", "max.ts", pc.max),
        ("last_ingested", "max.ingested_at", pc.max),
    ):
        if column in names and (value := agg(files.column(column)).as_py()) is not None:
            out[label] = str(value)
    if "partition.event_date" in names:
        out["days"] = len(pc.unique(files.column("partition.event_date")))
    return out


def _observe(context: dg.AssetExecutionContext) -> Iterator[dg.ObserveResult]:
    store: DeltaStore = context.resources.nextbest.delta()
    store.ensure_tables()
    version, metadata = observe_delta(store, "events")
    yield dg.ObserveResult(
        asset_key=BRONZE_SPEC.key, metadata=metadata, data_version=dg.DataVersion(str(version))
    )


with warnings.catch_warnings():
    # multi_observable_source_asset is "beta" in Dagster 1.13; it is the API for an
    # observable asset with a full AssetSpec (kinds, description, definition metadata).
    warnings.simplefilter("ignore", dg.BetaWarning)
    bronze_events = dg.multi_observable_source_asset(
        specs=[BRONZE_SPEC], name="bronze_events", required_resource_keys={"nextbest"}
    )(_observe)
