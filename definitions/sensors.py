"""Sensors: retrain when enough new events arrived since the newest model was trained,
and observe the Delta tables other processes write."""

import json

import dagster as dg

from definitions.assets.bronze import BRONZE_SPEC, observation, observe_delta
from definitions.assets.logs import decision_log, feedback_log
from definitions.jobs import retrain_job
from definitions.resources import NextbestResource

EXTERNAL_TABLES = {
    "events": BRONZE_SPEC.key,
    "decisions": decision_log.key,
    "feedback": feedback_log.key,
}
"""Delta table -> the asset that stands for it (written by the stream and the API)."""

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


def _observe_external_tables(
    context: dg.SensorEvaluationContext, nextbest: NextbestResource
) -> dg.SensorResult | dg.SkipReason:
    """Reports an observation of each Delta table written outside Dagster (bronze by the
    stream, the decision and feedback logs by the API) whose version moved since the
    last report: the Delta version as data version, row count, schema, URI. No run is
    launched; the cursor holds the versions last reported."""
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    store = nextbest.delta()
    events: list[dg.AssetObservation] = []
    for table, key in EXTERNAL_TABLES.items():
        if not store.exists(table):
            continue
        version, metadata = observe_delta(store, table)
        if seen.get(table) != version:
            events.append(observation(key, version, metadata))
            seen[table] = version
    if not events:
        said = f"no change since Delta versions {seen}" if seen else "no external table yet"
        return dg.SkipReason(said)
    return dg.SensorResult(asset_events=events, cursor=json.dumps(seen, sort_keys=True))


def build_sensors(*, running: bool, observing: bool = True) -> list[dg.SensorDefinition]:
    """The retrain sensor, RUNNING from the first start when `running`, and the observer
    of the external tables, RUNNING when `observing` (automation on); a toggle in the UI
    still overrides either (Dagster keeps that state in its instance)."""

    def status(on: bool) -> dg.DefaultSensorStatus:
        return dg.DefaultSensorStatus.RUNNING if on else dg.DefaultSensorStatus.STOPPED

    retrain = dg.sensor(
        job=retrain_job,
        minimum_interval_seconds=60,
        name="retrain_after_events",
        default_status=status(running),
    )(_retrain_after_events)
    observe = dg.sensor(
        name="observe_external_tables",
        minimum_interval_seconds=60,
        default_status=status(observing),
        description="Observes bronze_events, decision_log and feedback_log (Delta tables "
        "the stream and the API write) when their Delta version changes.",
    )(_observe_external_tables)
    return [retrain, observe]


retrain_after_events, observe_external_tables = build_sensors(running=False, observing=False)
"""The sensors as values (tests evaluate them directly)."""
