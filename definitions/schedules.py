"""Schedules from the spec's `schedules` section, plus the daily silver partition."""

import dagster as dg

from definitions.jobs import maintenance, retrain_job, sessions_job
from nextbest.spec import Spec


def build_schedules(spec: Spec) -> list[dg.ScheduleDefinition]:
    schedules: list[dg.ScheduleDefinition] = [
        dg.build_schedule_from_partitioned_job(sessions_job, name="sessions_daily")  # type: ignore[list-item]
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
            )
        )
    return schedules
