"""Launch a job through a running Dagster webserver's GraphQL API and wait for it."""

import subprocess
import time

from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def launch_and_wait(
    port: int,
    job: str,
    *,
    timeout: float,
    proc: subprocess.Popen | None = None,
) -> tuple[str, DagsterRunStatus]:
    """Submit `job` (retrying while the code location loads), then poll until the run
    is done; the daemon dequeues it. Returns (run_id, final status)."""
    client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)
    deadline = time.monotonic() + timeout
    run_id: str | None = None
    while run_id is None:
        try:
            run_id = client.submit_job_execution(job)
        except DagsterGraphQLClientError:
            _tick(deadline, f"launching {job}", proc)
    while (status := client.get_run_status(run_id)) not in DONE:
        _tick(deadline, f"run {run_id} of {job}", proc)
    return run_id, status


def _tick(deadline: float, what: str, proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"the Dagster process exited with {proc.returncode}: {what}")
    if time.monotonic() > deadline:
        raise AssertionError(f"timed out: {what}")
    time.sleep(0.5)
