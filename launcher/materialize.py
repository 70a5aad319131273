"""`nextbest materialize`: retrain from the command line on the home's Dagster instance.

It sets DAGSTER_HOME itself (the home's dagster.yaml refers to it), sends Dagster's
console output (DEBUG per step) to `<home>/logs/materialize.log`, and prints what a
person wants: how many assets were materialized, how long it took, and each failure
with its error.
"""

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from definitions.metadata import DATA_VERSION_TAG
from definitions.runs import instance_for, materialize
from launcher.supervisor import prepare_dagster_home
from nextbest.settings import Settings
from nextbest.spec.models import Spec


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors, so native and child
    output too) at `path` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def summarize(instance: dg.DagsterInstance, since: float) -> tuple[list[str], list[str], list[str]]:
    """(materialized asset keys, observed assets with their data version, failure lines)
    of the CLI's runs since `since`."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={"nextbest/trigger": "cli"},
            created_after=datetime.fromtimestamp(since, tz=UTC),
        )
    )
    done: list[str] = []
    observed: list[str] = []
    failures: list[str] = []
    wanted = {
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        dg.DagsterEventType.ASSET_OBSERVATION,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        dg.DagsterEventType.RUN_FAILURE,
    }
    for run in runs:
        for record in instance.all_logs(run.run_id, of_type=wanted):
            event = record.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                key = event.asset_key
                if key is not None:
                    done.append(key.to_user_string())
            elif event.event_type == dg.DagsterEventType.ASSET_OBSERVATION:
                data = event.asset_observation_data.asset_observation
                version = (data.tags or {}).get(DATA_VERSION_TAG)
                observed.append(
                    data.asset_key.to_user_string() + (f" v{version}" if version else "")
                )
            elif event.event_type == dg.DagsterEventType.STEP_FAILURE:
                error = event.step_failure_data.error
                message = error.message.strip() if error else "no error recorded"
                failures.append(f"{event.step_key}: {message.splitlines()[-1][:300]}")
            elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                check = event.asset_check_evaluation_data
                if not check.passed:
                    name = check.asset_check_key.name
                    asset = check.asset_key.to_user_string()
                    severity = check.severity.value if check.severity else "ERROR"
                    facts = ", ".join(
                        f"{k} {getattr(v, 'value', v)}" for k, v in (check.metadata or {}).items()
                    )
                    failures.append(
                        f"check {asset}:{name} failed ({severity})"
                        + (f": {facts}" if facts else "")
                    )
    return sorted(set(done)), sorted(set(observed)), failures


def materialize_with_summary(settings: Settings, spec: Spec, *, select: str | None) -> int:
    try:
        prepare_dagster_home(settings)
    except RuntimeError as exc:  # no dagster.yaml: no writer limit against a running daemon
        print(f"nextbest materialize: {exc}", file=sys.stderr)
        return 1
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    log = settings.home_dir / "logs" / "materialize.log"
    since = time.time()
    instance = instance_for(settings)
    try:
        with output_to(log):
            ok = materialize(settings, select=select, spec=spec, instance=instance)
        assets, observed, failures = summarize(instance, since)
    finally:
        instance.dispose()
    seconds = time.time() - since
    seen = f", observed {', '.join(observed)}" if observed else ""
    print(
        f"materialized {len(assets)} assets in {seconds:.1f} s{seen}" + ("" if ok else " (FAILED)")
    )
    for failure in failures:
        print(f"  {failure}")
    print(f"Dagster's log: {log}")
    return 0 if ok else 1
