"""Retrain when enough new events arrived since the newest model was trained."""

import dagster as dg

from definitions.jobs import retrain_job
from definitions.resources import NextbestResource

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def events_since_model(nextbest: NextbestResource) -> tuple[int, int, str | None]:
    """(events now, events the newest registered model was trained on, its version)."""
    store = nextbest.delta()
    if not store.exists("events"):
        return 0, 0, None
    now = store.count("events")
    with nextbest.online() as online:
        models = online.list_models()
    if not models:
        return now, 0, None
    newest = models[0]
    trained = newest.params.get("events_rows")
    if trained is None and newest.data_version is not None:
        try:  # older registrations: count at the Delta version it was trained on
            trained = store.count("events", version=int(newest.data_version))
        except (FileNotFoundError, ValueError, OSError):
            trained = 0
    return now, int(trained or 0), newest.version


def _retrain_after_events(
    context: dg.SensorEvaluationContext, nextbest: NextbestResource
) -> dg.SensorResult | dg.SkipReason:
    """Requests a `retrain` run once `schedules.retrain_after_events` events arrived in
    bronze since the newest registered model's training data, unless a retrain is
    already queued or running."""
    threshold = nextbest.load_spec().schedules.retrain_after_events
    if threshold is None:
        return dg.SkipReason("the spec sets no schedules.retrain_after_events")
    now, trained, version = events_since_model(nextbest)
    new = now - trained
    if new < threshold:
        return dg.SkipReason(f"{new} new events since model {version}; waiting for {threshold}")
    running = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=retrain_job.name, statuses=IN_FLIGHT), limit=1
    )
    if running:
        return dg.SkipReason(f"retrain run {running[0].run_id} is already in flight")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"events-{now}-after-{version}",
                tags={"nextbest/new_events": str(new)},
            )
        ],
        cursor=str(now),
    )


def build_sensors(*, running: bool) -> list[dg.SensorDefinition]:
    """The sensor, RUNNING from the first start when automation is on (`running`); a
    toggle in the UI still overrides it (Dagster keeps that state in its instance)."""
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
    sensor = dg.sensor(
        job=retrain_job,
        minimum_interval_seconds=60,
        name="retrain_after_events",
        default_status=status,
    )(_retrain_after_events)
    return [sensor]


retrain_after_events = build_sensors(running=False)[0]
"""The sensor as a value (tests evaluate it directly)."""
