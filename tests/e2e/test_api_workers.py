"""`nextbest api --workers 2` for real: two uvicorn worker processes on one port, the
stream process on the same home. Which worker takes a connection is the kernel's
choice, so every request opens a new connection and the answering pid is read from
the `X-Nextbest-Worker` header; a check "via the other worker" retries until the other
pid answers. What must not depend on the worker: events reach bronze exactly once
with one partition per user, a revoked key, a promoted model, a consent answer, the
rate limit and an erasure job."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.admin import revoke_key
from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from serving.keys import create_key
from serving.run import PID_HEADER
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog, partition_for
from storage.online.store import OnlineStore
from tests.core.test_consent import consent_spec_text
from tests.serving.test_serving_world import train_and_promote
from tests.support.common import ROOT, free_port
from tests.support.stream_helpers import start_stream, write_catalog
from tests.support.waiting import wait_until

TAG = uuid.uuid4().hex[:8]
BURST = 100  # per key; each test takes a fresh admin key (`fresh_key`)
RATE = 5.0
MAX_TRIES = 300  # fresh connections before giving up on reaching a given worker


@dataclass
class Workers:
    settings: Settings
    spec: Spec
    url: str
    api: subprocess.Popen[bytes]
    admin: str
    _pids: frozenset[int] = frozenset()

    def call(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        """One request on a new connection (so the kernel picks the worker again)."""
        headers = {"X-API-Key": key or self.admin}
        with httpx.Client(base_url=self.url, timeout=10, headers=headers) as client:
            return client.request(method, path, **kw)

    def until(
        self, method: str, path: str, pid: Callable[[int], bool], **kw: Any
    ) -> httpx.Response:
        """Repeat the request until a worker for which `pid(...)` holds answers it."""
        for _ in range(MAX_TRIES):
            r = self.call(method, path, **kw)
            if pid(worker(r)):
                return r
        raise AssertionError(f"no matching worker answered {method} {path}")

    def new_key(self, scopes: list[str]) -> str:
        store = OnlineStore.from_settings(self.settings)
        try:
            return create_key(store, scopes)
        finally:
            store.dispose()

    def pids(self) -> frozenset[int]:
        """The two workers' pids (found once: uvicorn would only change one that died)."""
        if not self._pids:
            found = wait_until(lambda: _two(self), timeout=30, what="both workers answering")
            self._pids = frozenset(found)
        return self._pids


def worker(r: httpx.Response) -> int:
    return int(r.headers[PID_HEADER])


def _two(w: "Workers") -> set[int] | None:
    seen = {worker(w.call("GET", "/health")) for _ in range(20)}
    return seen if len(seen) == 2 else None


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("api_workers")
    spec_path = tmp / "consent.yaml"
    spec_path.write_text(consent_spec_text(default="granted", mode="drop"))
    port = free_port()
    settings = Settings(home=tmp / "home", spec=spec_path, api_port=port, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(spec_path)
    cfg = DemoConfig.small()
    write_catalog(settings, spec, cfg, vectors=False)
    store = OnlineStore.from_settings(settings)
    train_and_promote(settings, spec, store, cfg, version="v1")
    admin = create_key(store, ["admin"])
    store.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "NEXTBEST_HOME": str(settings.home_dir),
        "NEXTBEST_SPEC": str(spec_path),
        "NEXTBEST_API_PORT": str(port),
        "NEXTBEST_RATE_LIMIT_PER_S": str(RATE),
        "NEXTBEST_RATE_LIMIT_BURST": str(BURST),
        "NEXTBEST_AUTH_FAILURES_PER_MIN": "1000000",
    }
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "api.log", "ab") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "launcher", "api", "--workers", "2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own group: the workers go down with it
        )
    stream = start_stream(settings)
    w = Workers(settings, spec, f"http://127.0.0.1:{port}", api, admin)
    try:
        wait_until(lambda: _up(w), timeout=60, what="the API on its port")
        yield w
    finally:
        stream.kill()
        stream.wait(timeout=20)
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait(timeout=10)


@pytest.fixture(autouse=True)
def fresh_key(workers: Workers) -> None:
    """A full token bucket for each test (the rate limit is on, and shared)."""
    workers.admin = workers.new_key(["admin"])


def _up(w: Workers) -> bool:
    assert w.api.poll() is None, (w.settings.home_dir / "logs" / "api.log").read_text()[-3000:]
    try:
        return w.call("GET", "/health").status_code == 200
    except httpx.HTTPError:
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_two_worker_processes_answer_on_one_port(workers: Workers) -> None:
    pids = workers.pids()
    assert workers.api.pid not in pids
    assert {_parent(p) for p in pids} == {workers.api.pid}  # uvicorn's supervisor's children


def _views(user: str, n: int, start: int) -> list[dict[str, Any]]:
    ts = int(time.time()) - 300
    return [
        {
            "type": "view",
            "user_id": user,
            "item_id": f"i{1 + (start + i) % 40:05d}",
            "event_id": f"{user}-{start + i}",
            "ts": ts + start + i,
        }
        for i in range(n)
    ]


def test_events_through_both_workers_reach_bronze_once(workers: Workers) -> None:
    users = [f"w-{TAG}-{n}" for n in range(8)]
    sent: list[str] = []
    answered: set[int] = set()
    for batch in range(16):  # each user's events arrive through both workers, interleaved
        events = [e for u in users for e in _views(u, 3, 3 * batch)]
        r = workers.call("POST", "/v1/events", json={"events": events})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(events)
        sent += [e["event_id"] for e in events]
        answered.add(worker(r))
    assert len(answered) == 2, "both workers took event batches"

    def bronze_ids() -> list[str] | None:
        delta = DeltaStore.from_settings(workers.settings)
        if not delta.exists("events"):
            return None
        ids = [i for i in delta.read("events").column("event_id").to_pylist() if TAG in i]
        return ids if len(set(ids)) >= len(sent) else None

    ids = wait_until(bronze_ids, timeout=60, what="every event in bronze")
    assert sorted(ids) == sorted(sent)  # each exactly once, nothing else
    s = workers.settings
    with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
        for p in range(s.partitions):
            records = log.read(p, 0, max_records=100_000)
            assert [o for o, _, _ in records] == list(range(len(records)))  # dense, no clash
            mine = [(k, json.loads(v)) for _, k, v in records if TAG in k]
            assert all(partition_for(k, s.partitions) == p for k, _ in mine)
            for user in users:  # one user's events: in one partition, in the order sent
                order = [int(e["event_id"].rsplit("-", 1)[1]) for k, e in mine if k == user]
                assert order == sorted(order)


def _accepted_total(r: httpx.Response) -> float:
    lines = [ln for ln in r.text.splitlines() if ln.startswith("nextbest_events_accepted_total")]
    return sum(float(ln.split()[-1]) for ln in lines)


def test_metrics_count_the_whole_api_whichever_worker_answers(workers: Workers) -> None:
    totals = {
        pid: _accepted_total(workers.until("GET", "/metrics", lambda p, q=pid: p == q))
        for pid in workers.pids()
    }
    assert len(set(totals.values())) == 1, totals  # the same sum from both
    assert next(iter(totals.values())) >= 16 * 8 * 3  # every event the test before sent


def test_a_revoked_key_is_refused_by_both_workers(workers: Workers) -> None:
    key = workers.new_key(["decide"])
    path = f"/v1/users/nobody-{TAG}/features"
    pids = workers.pids()
    for pid in pids:  # both verified (and cached) the key
        r = workers.until("GET", path, lambda p, pid=pid: p == pid, key=key)
        assert r.status_code == 404
    assert revoke_key(workers.settings, key.split("_")[1])  # `nextbest keys revoke`
    for pid in pids:  # at once, not after the 30 s cache
        r = workers.until("GET", path, lambda p, pid=pid: p == pid, key=key)
        assert r.status_code == 401, r.text


def test_a_promoted_model_is_loaded_by_both_workers(workers: Workers) -> None:
    # What Dagster's model_registry does: register a new artifact, promote it.
    v1 = workers.settings.home_dir / "models" / "v1.npz"
    v2 = shutil.copy(v1, v1.with_name("v2.npz"))
    store = OnlineStore.from_settings(workers.settings)
    store.register_model(version="v2", artifact_path=str(v2), metrics={"ndcg@10": 0.2})
    store.promote_model("v2")
    store.dispose()
    body = {"user_id": f"model-{TAG}", "k": 3}
    for pid in workers.pids():

        def on_v2(pid: int = pid) -> bool:
            r = workers.until("POST", "/v1/decide", lambda p: p == pid, json=body)
            return r.json()["model_version"] == "v2"

        wait_until(on_v2, timeout=20, what=f"worker {pid} serving model v2")


def _personal(r: httpx.Response) -> bool:
    assert r.status_code in (200, 201), r.text
    reasons = [reason for a in r.json()["actions"] for reason in a["reasons"]]
    return not any("no consent" in reason for reason in reasons)


def test_a_consent_answer_given_via_one_worker_is_honoured_by_the_other(
    workers: Workers,
) -> None:
    user = f"c-{TAG}"
    decide = {"user_id": user, "k": 3}
    first = workers.call("POST", "/v1/decide", json=decide)
    assert _personal(first)  # default granted
    # Both workers cache the answer "granted" ...
    for pid in workers.pids():
        assert _personal(workers.until("POST", "/v1/decide", lambda p, q=pid: p == q, json=decide))
    # ... then one of them records a revoke.
    ts = int(time.time()) - 60
    revoke = {"type": "consent", "user_id": user, "ts": ts, "properties": {"granted": False}}
    r = workers.call("POST", "/v1/events", json={"events": [revoke]})
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
    took = worker(r)
    other = workers.until("POST", "/v1/decide", lambda p: p != took, json=decide)
    assert not _personal(other)  # at once: no TTL to wait out
    late = {"type": "view", "user_id": user, "item_id": "i00001", "ts": ts + 1}
    dropped = workers.until("POST", "/v1/events", lambda p: p != took, json={"events": [late]})
    assert dropped.json()["accepted"] == 0 and len(dropped.json()["dropped"]) == 1


def test_the_rate_limit_is_one_for_the_whole_api(workers: Workers) -> None:
    key = workers.new_key(["decide"])
    path = f"/v1/users/nobody-{TAG}/features"
    pids = workers.pids()
    start = time.monotonic()
    answers: list[httpx.Response] = []
    # Until each worker took BURST requests: with a bucket per worker both would serve
    # a full burst (2 * BURST in all).
    while min(sum(worker(r) == p for r in answers) for p in pids) < BURST:
        answers.append(workers.call("GET", path, key=key))
        assert len(answers) < 10 * BURST, "the kernel kept handing connections to one worker"
    elapsed = time.monotonic() - start
    served = [r for r in answers if r.status_code != 429]
    limited = [r for r in answers if r.status_code == 429]
    assert {r.status_code for r in served} == {404}
    # One bucket of BURST tokens refilled at RATE/s, whichever worker answered.
    assert BURST <= len(served) <= BURST + RATE * elapsed + 1, (len(served), elapsed)
    assert limited and all(r.headers.get("Retry-After") for r in limited)


def test_an_erasure_job_started_on_one_worker_is_seen_by_the_other(workers: Workers) -> None:
    user = f"e-{TAG}"
    r = workers.call("POST", "/v1/events", json={"events": _views(user, 3, 0)})
    assert r.status_code == 202, r.text
    started = workers.call("DELETE", f"/v1/users/{user}")
    assert started.status_code == 202, started.text
    job = started.json()
    seen = workers.until("GET", f"/v1/users/{user}/erasure", lambda p: p != worker(started))
    assert seen.status_code == 200, seen.text
    assert seen.json()["job_id"] == job["job_id"]
