"""The code location served by `dagster dev` run in the project with no `-m` (found
through pyproject's [tool.dagster]; webserver + daemon, the real instance config): a
retrain launched through the GraphQL API runs to SUCCESS, observes bronze and promotes
a model into the online store."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dagster import DagsterRunStatus

from definitions.batch.importer import import_events, import_items
from nextbest.demo.shop import DemoConfig, write_demo
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.online.store import OnlineStore
from tests.support.dagster_client import launch_and_wait

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(predicate, *, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"dagster dev exited with {proc.returncode} while waiting for {what}"
            )
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[tuple[Settings, int, subprocess.Popen]]:
    home = tmp_path / "home"
    settings = Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    cfg = DemoConfig(n_users=80, n_items=100, n_events=1500, days=5)
    write_demo(tmp_path / "demo", cfg)
    import_items(settings, spec, tmp_path / "demo" / "items.jsonl")
    import_events(settings, spec, tmp_path / "demo" / "events.jsonl", progress=False)
    dagster_home = settings.dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "definitions" / "dagster.yaml", dagster_home / "dagster.yaml")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml"),
        "PYTHONPATH": str(ROOT),
    }
    log = (tmp_path / "dagster.log").open("wb")
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown stops all it spawned
    )
    try:
        yield settings, port, proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_retrain_launched_through_graphql_succeeds(
    dagster_dev: tuple[Settings, int, subprocess.Popen],
) -> None:
    settings, port, proc = dagster_dev

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # ~100 s on a loaded 2-core machine (load 13) before the webserver answers.
    _until(up, timeout=240, what="the webserver", proc=proc)
    run_id, status = launch_and_wait(port, "retrain", timeout=240, proc=proc)
    assert status == DagsterRunStatus.SUCCESS, (
        Path(settings.home_dir).parent / "dagster.log"
    ).read_text()[-4000:]

    online = OnlineStore.from_settings(settings)
    promoted = online.promoted_model()
    online.dispose()
    assert promoted is not None
    # The run's materializations are visible through the API as well.
    query = (
        "{ assetNodes { assetKey { path } repository { location { name } } "
        "assetMaterializations(limit: 1) { runId } assetObservations(limit: 1) { runId } } }"
    )
    data = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10).json()
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    runs = {k: [m["runId"] for m in n["assetMaterializations"]] for k, n in nodes.items()}
    assert runs["model_registry"] == [run_id] and runs["cached_decisions"] == [run_id]
    bronze = nodes["bronze_events"]
    assert bronze["assetMaterializations"] == []  # the stream writes it; Dagster observes
    assert [o["runId"] for o in bronze["assetObservations"]] == [run_id]
    assert {n["repository"]["location"]["name"] for n in nodes.values()} == {"definitions"}
