"""`build_definitions`: the whole code location from (optional) settings and spec."""

import dagster as dg

from definitions.assets import ALL_ASSETS
from definitions.checks import ALL_CHECKS
from definitions.jobs import maintenance, retrain_job, sessions_job
from definitions.resources import cached_spec, resource_for
from definitions.schedules import build_schedules
from definitions.sensors import retrain_after_events
from nextbest.settings import Settings
from nextbest.spec import Spec


def build_definitions(
    settings: Settings | None = None, spec: Spec | None = None, **options: object
) -> dg.Definitions:
    """Assets, checks, jobs, schedules and sensors of nextbest.

    Without `settings` the resource resolves the data home from `NEXTBEST_*` when a run
    starts; the spec is read here because schedules take their cron from it.
    `options` set `NextbestResource` fields (e.g. `promotion_tolerance`).
    """
    if spec is None:
        spec = cached_spec((settings or Settings()).spec)
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[retrain_job, sessions_job, maintenance],
        schedules=build_schedules(spec),
        sensors=[retrain_after_events],
        resources={"nextbest": resource_for(settings, **options)},
        executor=dg.in_process_executor,
    )
