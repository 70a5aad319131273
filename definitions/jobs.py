"""Jobs: the full retrain, the day-partitioned history backfill, store maintenance.

Every run (UI, schedules, the sensor, `nextbest materialize` and so `nextbest up`'s
first training) goes through one of these named jobs, so run lists read `retrain` or
`sessions_backfill` rather than Dagster's `__ephemeral_asset_job__`."""

from datetime import timedelta

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (  # not re-exported
    UnresolvedAssetJobDefinition,
)

from definitions.assets import PARTITIONED_ASSETS, RETRAIN_ASSETS
from definitions.batch.history import (
    FEATURES_TABLE,
    INTERACTIONS_TABLE,
    ITEMS_TABLE,
    SESSIONS_TABLE,
    TRAINING_TABLE,
)
from definitions.partitions import DAILY, IO_RETRY
from definitions.resources import NextbestResource

DELTA_TABLES = (
    "events",
    "dead_letters",
    "decisions",
    "feedback",
    "item_updates",  # PUT /v1/items history: one small file per request (serving.catalog)
    ITEMS_TABLE,
    SESSIONS_TABLE,
    INTERACTIONS_TABLE,
    FEATURES_TABLE,
    TRAINING_TABLE,
)
SESSIONS_JOB = "sessions_backfill"
RUN_RETRIES = {"dagster/max_retries": "2", "dagster/retry_strategy": "FROM_FAILURE"}
"""Run-level retries (the daemon relaunches a run that died, e.g. OOM-killed)."""

retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    description="Full retrain: observe bronze, then gold tables, model, evaluation, registry, "
    "vectors, cache.",
    run_tags={**RUN_RETRIES, "nextbest/writer": "retrain"},
    executor_def=dg.in_process_executor,
)


def sessions_job_for(partitions: dg.PartitionsDefinition) -> UnresolvedAssetJobDefinition:
    """The day-partitioned job over `partitions` (the history's days, see partitions.py)."""
    return dg.define_asset_job(
        SESSIONS_JOB,
        selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
        partitions_def=partitions,
        description="Day-partitioned silver tables; backfill any range of days in one run.",
        run_tags=RUN_RETRIES,
    )


sessions_job = sessions_job_for(DAILY)


@dg.op(retry_policy=IO_RETRY)
def delta_maintenance(context: dg.OpExecutionContext, nextbest: NextbestResource) -> None:
    """Compact small files, vacuum files removed longer than `retention_hours` ago and
    checkpoint, on every Delta table that exists."""
    store = nextbest.delta()
    summary: dict[str, object] = {}
    for table in DELTA_TABLES:
        if not store.exists(table):
            continue
        result = store.maintain(table, retention_hours=nextbest.retention_hours)
        summary[table] = {k: v for k, v in result.items() if k != "compact"}
        context.log.info(f"{table}: {summary[table]}")
    context.add_output_metadata({"tables": dg.MetadataValue.json(summary)})


@dg.op(retry_policy=IO_RETRY)
def lance_optimize(context: dg.OpExecutionContext, nextbest: NextbestResource) -> None:
    """Compact the LanceDB `items` table (Dagster's own; `users` belongs to the stream),
    fold new rows into its indices and clean up versions older than the retention."""
    lance = nextbest.vectors(nextbest.load_spec())
    before = len(lance.list_versions("items"))
    lance.optimize("items", cleanup_older_than=timedelta(hours=nextbest.retention_hours))
    after = len(lance.list_versions("items"))
    context.add_output_metadata({"versions_before": before, "versions_after": after})


@dg.job(
    description="Delta compact/vacuum/checkpoint and LanceDB optimize/cleanup.",
    tags={**RUN_RETRIES, "nextbest/writer": "maintenance"},
    executor_def=dg.in_process_executor,
)
def maintenance() -> None:
    delta_maintenance()
    lance_optimize()
