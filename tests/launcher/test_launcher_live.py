"""The command line against a running home: a second `api`/`up` is refused while the
first keeps serving, `replay` uses the home's key and says what was rejected, a revoked
key gets 401, and `materialize`/`eval`/`status` with only NEXTBEST_HOME set."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_stack import free_port
from tests.support.common import ROOT
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def _env(home: Path, api_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_API_PORT": str(api_port),
        "NEXTBEST_DAGSTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("NEXTBEST_API_KEY", "NEXTBEST_ONLINE_URL", "NEXTBEST_SPEC", "DAGSTER_HOME"):
        env.pop(name, None)
    env.pop("NEXTBEST_KAFKA_BOOTSTRAP", None)
    return env


def nextbest(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    home = (tmp_path_factory.mktemp("live") / "home").resolve()
    port = free_port()
    env = _env(home, port)
    assert nextbest(env, "init").returncode == 0
    key = nextbest(env, "keys", "create", "--scope", "ingest,decide,admin").stdout.strip()
    (home / "api_key").write_text(key + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "api"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # stop waiting if it died

    try:
        wait_until(healthy, timeout=180, what="the API to answer /health", every=0.25)
        assert proc.poll() is None, "the API exited"
        yield env, url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_second_api_and_up_are_refused_while_the_first_serves(api) -> None:
    env, url = api
    for command in ("api", "up"):
        started = time.monotonic()
        second = nextbest(env, command, timeout=120)
        took = time.monotonic() - started
        assert second.returncode == 75, (second.stdout, second.stderr)
        assert "nextbest api is already running on" in second.stdout + second.stderr
        assert "(pid " in second.stdout + second.stderr
        assert took < 30, f"`nextbest {command}` took {took:.1f} s to refuse"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_replay_uses_the_home_key_and_names_rejected_lines(api, tmp_path: Path) -> None:
    env, _ = api
    events = tmp_path / "events.jsonl"
    good = {"type": "view", "user_id": "replayer", "item_id": "i1", "ts": time.time()}
    events.write_text(
        "\n".join([json.dumps(good), json.dumps({"type": "view", "user_id": "x"}), "{oops"]) + "\n"
    )
    out = nextbest(env, "replay", str(events))
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "rejected line 2: ts: Field required", lines
    assert lines[1] == "rejected line 3: an event must be a JSON object", lines
    assert lines[2].startswith("sent 3, accepted 1, rejected 2, failed batches 0"), lines


def test_replay_says_why_a_batch_failed(api, tmp_path: Path) -> None:
    env, _ = api
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"type": "view", "user_id": "u", "item_id": "i", "ts": 1}) + "\n")
    out = nextbest({**env, "NEXTBEST_API_KEY": "nb_bad_key"}, "replay", str(events))
    assert out.returncode == 1
    assert "batch of events 1-1 failed: HTTP 401" in out.stdout, out.stdout


def test_a_revoked_key_gets_401(api) -> None:
    env, url = api
    key = nextbest(env, "keys", "create", "--scope", "decide").stdout.strip()
    body = {"user_id": "someone", "k": 3}
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=10) as http:
        assert http.post("/v1/decide", json=body).status_code == 200
    assert nextbest(env, "keys", "revoke", key.split("_")[1]).returncode == 0
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=10) as http:
        # the API caches a verified key for at most 30 s
        wait_until(
            lambda: http.post("/v1/decide", json=body).status_code == 401,
            timeout=45,
            what="the revoked key to be refused",
            every=1.0,
        )


def test_materialize_eval_status_with_only_the_home_set(tmp_path: Path) -> None:
    home = (tmp_path / "home").resolve()
    env = _env(home, free_port())
    demo = tmp_path / "demo"
    out = nextbest(env, "demo", "--out", str(demo))
    assert out.stdout.splitlines()[0] == f"wrote the small demo shop to {demo}/", out.stdout
    assert nextbest(env, "init").returncode == 0
    assert nextbest(env, "import", "items", str(demo / "items.jsonl")).returncode == 0
    assert nextbest(env, "import", "events", str(demo / "events.jsonl")).returncode == 0

    mat = nextbest(env, "materialize", timeout=600)
    lines = mat.stdout.splitlines()
    assert "DAGSTER_HOME" not in mat.stdout + mat.stderr
    assert lines[0].startswith("materialized ") and " assets in " in lines[0], mat.stdout
    assert int(lines[0].split()[1]) >= 10
    assert len(lines) <= 12 and "DEBUG" not in mat.stdout + mat.stderr, mat.stdout
    assert lines[-1] == f"Dagster's log: {home / 'logs' / 'materialize.log'}"
    assert "DEBUG" in (home / "logs" / "materialize.log").read_text()

    ev = nextbest(env, "eval")
    metrics = dict(line.split() for line in ev.stdout.splitlines())
    assert metrics["users"].isdigit() and int(metrics["users"]) > 0, ev.stdout
    assert "." in metrics["ndcg@10"]

    status = nextbest(env, "status", "--json")
    info = json.loads(status.stdout)
    assert info["delta_events"] == 5000
    assert info["promoted_model"] and info["models"] >= 1
    assert info["lance_items"] > 0 and info["api_keys"] == 0
    assert info["running"] == {}
    text = nextbest(env, "status").stdout
    assert "delta_events       5000" in text and "stream_lag" in text
