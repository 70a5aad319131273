"""Request ids and structured logs through the real API (`nextbest api`): every response
echoes `X-Request-ID` (the client's when sane, else a fresh one, on 401 and 404 too),
stderr carries JSON lines with timestamp, level, component and logger, the opt-in
access log names method, route (never a user id), status, duration, request and
decision ids, and nothing of it is written when the access log is off."""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextbest.logs import configure_logging, reset_logging
from nextbest.settings import Settings
from serving.app import create_app
from storage.online.engine import create_online_engine
from tests.e2e.test_stack import free_port
from tests.support.common import ROOT
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def _env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "DAGSTER_"))}
    env.update(NEXTBEST_HOME=str(home), NEXTBEST_API_PORT=str(port), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _nextbest(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = (tmp_path_factory.mktemp("reqlog") / "home").resolve()
    env = _env(home, 0)
    _nextbest(env, "init")
    key = _nextbest(env, "keys", "create", "--scope", "ingest,decide,admin").strip()
    return home, key.splitlines()[-1]


@contextmanager
def api(home: Path, log: Path, **extra: str) -> Iterator[str]:
    port = free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "api"],
            cwd=ROOT,
            env=_env(home, port, **extra),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=180, what="the API to answer /health", every=0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _lines(log: Path) -> list[dict[str, Any]]:
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert record["timestamp"].endswith("Z") and "T" in record["timestamp"], record
        assert record["component"] == "api" and record["level"] and record["logger"], record
    return records


def test_request_ids_and_the_access_log_through_the_real_api(
    home: tuple[Path, str], tmp_path: Path
) -> None:
    data_home, key = home
    log = tmp_path / "api.log"
    with api(data_home, log, NEXTBEST_ACCESS_LOG="1") as url:
        auth = {"X-API-Key": key}
        mine = httpx.post(
            f"{url}/v1/decide",
            json={"user_id": "u-log", "k": 3},
            headers={**auth, "X-Request-ID": "client-abc.123"},
        )
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-abc.123"
        decision_id = mine.json()["decision_id"]
        fresh = [httpx.get(f"{url}/health").headers["x-request-id"] for _ in range(2)]
        assert all(len(f) == 16 and int(f, 16) >= 0 for f in fresh) and fresh[0] != fresh[1]
        forged = httpx.get(f"{url}/health", headers={"X-Request-ID": 'x" level="error'})
        assert forged.headers["x-request-id"] != 'x" level="error'
        assert len(forged.headers["x-request-id"]) == 16
        # Answers made outside the handlers carry one too: a key refused by a middleware,
        # a path no route matches.
        refused = httpx.post(
            f"{url}/v1/decide", json={"user_id": "u"}, headers={"X-Request-ID": "r401"}
        )
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "r401"
        missing = httpx.get(f"{url}/nowhere")
        assert missing.status_code == 404 and len(missing.headers["x-request-id"]) == 16
        user = httpx.get(f"{url}/v1/users/secret-user-7/features", headers=auth)
        assert user.status_code == 404  # routed: no such user

        def logged() -> list[dict[str, Any]]:
            return [r for r in _lines(log) if r["logger"] == "nextbest.access"]

        access = wait_until(lambda: len(logged()) >= 8 and logged(), what="access lines")
    records = _lines(log)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # stdlib, same renderer
    decide = next(r for r in access if r["request_id"] == "client-abc.123")
    assert decide["event"] == "request" and decide["level"] == "info"
    assert decide["method"] == "POST" and decide["path"] == "/v1/decide"
    assert decide["status"] == 200 and decide["duration_ms"] >= 0
    assert decide["decision_id"] == decision_id
    by_id = {r["request_id"]: r for r in access}
    assert by_id["r401"]["status"] == 401 and by_id["r401"]["path"] == "/v1/decide"
    assert by_id[missing.headers["x-request-id"]]["status"] == 404
    assert by_id[missing.headers["x-request-id"]]["path"] == "unmatched"
    features = by_id[user.headers["x-request-id"]]
    assert features["path"] == "/v1/users/{user_id}/features" and features["status"] == 404
    assert "secret-user-7" not in log.read_text()  # erasure leaves no id in the logs
    assert {r["request_id"] for r in access} >= set(fresh)


def test_no_access_lines_when_the_access_log_is_off(home: tuple[Path, str], tmp_path: Path) -> None:
    data_home, key = home
    log = tmp_path / "api.log"
    with api(data_home, log, NEXTBEST_ACCESS_LOG="0") as url:
        for _ in range(5):
            r = httpx.post(f"{url}/v1/decide", json={"user_id": "u"}, headers={"X-API-Key": key})
            assert r.status_code == 200 and len(r.headers["x-request-id"]) == 16
    records = _lines(log)
    assert records, "the API logged nothing at all"
    assert not [r for r in records if r["logger"] == "nextbest.access"]


def test_a_line_logged_inside_a_request_carries_its_request_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        spec=ROOT / "nextbest.yaml",
        log_format="json",
        _env_file=None,  # type: ignore[call-arg]
    )
    configure_logging(settings, "api")
    try:
        from litestar.testing import TestClient

        app = create_app(settings, require_keys=False)
        with TestClient(app=app) as client:
            dead = create_online_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
            app.state.runtime.serving.engine = dead
            app.state.runtime.online.engine = dead
            r = client.get("/v1/users/u1/features", headers={"X-Request-ID": "req-500"})
            assert r.status_code == 500 and r.json()["request_id"] == "req-500"
            assert r.headers["x-request-id"] == "req-500"
    finally:
        reset_logging()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    error = next(x for x in lines if x["event"].startswith("unhandled error"))
    assert error["request_id"] == "req-500" and error["level"] == "error"
    assert "OperationalError" in error["exception"]
