"""Schedules from the spec's `schedules` section, plus the daily silver partition.

They start RUNNING when automation is on (`NEXTBEST_AUTOMATION`, default on), so the
README's promise holds from the first `nextbest up`; off, they start STOPPED."""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (  # not re-exported
    UnresolvedAssetJobDefinition,
)

from definitions.jobs import maintenance, retrain_job
from nextbest.spec.models import Spec


def build_schedules(
    spec: Spec, sessions_job: UnresolvedAssetJobDefinition, *, running: bool = True
) -> list[dg.ScheduleDefinition]:
    status = dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
    schedules: list[dg.ScheduleDefinition] = [
        dg.build_schedule_from_partitioned_job(
            sessions_job, name="sessions_daily", default_status=status
        )  # type: ignore[list-item]
    ]
    declared = spec.schedules
    if declared.retrain is not None:
        schedules.append(
            dg.ScheduleDefinition(
                name="retrain_schedule",
                job=retrain_job,
                cron_schedule=declared.retrain.cron,
                execution_timezone=declared.retrain.timezone,
                description="Full retrain on the spec's `schedules.retrain` cron.",
                default_status=status,
            )
        )
    if declared.maintenance is not None:
        schedules.append(
            dg.ScheduleDefinition(
                name="maintenance_schedule",
                job=maintenance,
                cron_schedule=declared.maintenance.cron,
                execution_timezone=declared.maintenance.timezone,
                description="Store maintenance on the spec's `schedules.maintenance` cron.",
                default_status=status,
            )
        )
    return schedules
