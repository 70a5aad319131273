"""`build_definitions`: the whole code location from (optional) settings and spec."""

import dagster as dg

from definitions.assets import ALL_ASSETS, LOG_ASSETS, PARTITIONED_ASSETS
from definitions.checks import ALL_CHECKS
from definitions.jobs import maintenance, retrain_job, sessions_job_for
from definitions.partitions import history_partitions, with_partitions
from definitions.resources import cached_spec, resource_for
from definitions.schedules import build_schedules
from definitions.sensors import build_sensors
from nextbest.settings import Settings
from nextbest.spec.models import Spec


def build_definitions(
    settings: Settings | None = None, spec: Spec | None = None, **options: object
) -> dg.Definitions:
    """Assets, checks, jobs, schedules and sensors of nextbest.

    Without `settings` the resource resolves the data home from `NEXTBEST_*` when a run
    starts; the spec is read here because schedules take their cron from it, and the
    bronze Delta log because the day partitions start at the data's first day.
    Schedules and the sensors start RUNNING unless `settings.automation` is off.
    `options` set `NextbestResource` fields (e.g. `promotion_tolerance`).
    """
    env = settings or Settings()
    if spec is None:
        spec = cached_spec(env.spec)
    days = history_partitions(env)
    parted = {a.key for a in PARTITIONED_ASSETS}
    assets = [with_partitions(a, days) if a.key in parted else a for a in ALL_ASSETS]
    sessions_job = sessions_job_for(days)
    sensor_on = env.automation and spec.schedules.retrain_after_events is not None
    return dg.Definitions(
        assets=[*assets, *LOG_ASSETS],
        asset_checks=ALL_CHECKS,
        jobs=[retrain_job, sessions_job, maintenance],
        schedules=build_schedules(spec, sessions_job, running=env.automation),
        sensors=build_sensors(running=sensor_on, observing=env.automation),
        resources={"nextbest": resource_for(settings, **options)},
        executor=dg.in_process_executor,
    )
