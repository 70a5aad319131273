"""`nextbest.Client` and `AsyncClient` against a live API (uvicorn on a free port) and a
real stream process writing Delta bronze: the round trip send/decide/feedback/
features/erase, and retries through a fault-injecting TCP proxy (tests/support/proxy.py):
a batch whose 202 was lost is sent again and is in bronze exactly once; 503 and 429 are
retried; a batch failing every retry is reported, not raised; `nextbest replay` retries
through the same client."""

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import main
from nextbest import AsyncClient, Client
from nextbest.client import ApiError, RetryPolicy, SendResult
from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.app import create_app
from serving.keys import create_key
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.store import OnlineStore
from tests.serving.test_serving_world import start_server, stop_server, train_and_promote
from tests.support.common import ROOT
from tests.support.proxy import FaultProxy
from tests.support.stream_helpers import start_stream, write_catalog
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

FAST = RetryPolicy(retries=3, backoff=0.05, max_backoff=0.2)
CATALOG = DemoConfig(n_users=30, n_items=60, n_events=500, days=3)


@dataclass
class Live:
    settings: Settings
    url: str
    key: str

    def bronze_ids(self) -> Counter[str]:
        delta = DeltaStore.from_settings(self.settings)
        if not delta.exists("events"):
            return Counter()
        return Counter(delta.read("events", columns=["event_id"]).column("event_id").to_pylist())

    def log_ids(self) -> Counter[str]:
        """Event ids appended to the event log, repeats included (before deduplication)."""
        s = self.settings
        ids: Counter[str] = Counter()
        with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
            for p in range(s.partitions):
                for _, _, payload in log.read(p, 0, max_records=100_000):
                    ids[json.loads(payload).get("event_id")] += 1
        return ids

    def items(self) -> list[str]:
        delta = DeltaStore.from_settings(self.settings)
        return delta.read("items", columns=["item_id"]).column("item_id").to_pylist()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("client") / "home"
    settings = Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    cfg = CATALOG.replace(start=datetime.now(UTC) - timedelta(days=4))
    write_catalog(settings, spec, cfg, vectors=True)
    store = OnlineStore.from_settings(settings)
    train_and_promote(settings, spec, store, cfg)
    key = create_key(store, ["ingest", "decide", "admin"])
    app = create_app(settings, refresh_interval_s=0.2, rate_limit_per_s=None)
    server = start_server(app)
    stream = start_stream(settings)
    try:
        yield Live(settings, server.url, key)
    finally:
        stream.kill()
        stream.wait(timeout=20)
        stop_server(server)
        store.dispose()


def _views(user: str, items: list[str], n: int) -> list[dict[str, Any]]:
    """`n` views without event ids (the client assigns them)."""
    ts = time.time() - 30
    return [
        {"type": "view", "user_id": user, "item_id": items[i % len(items)], "ts": ts + i}
        for i in range(n)
    ]


def _in_bronze_once(live: Live, user: str, ids: list[str]) -> None:
    """Every id exactly once in bronze, after the stream applied everything the log holds
    for `user`: a sentinel sent last for the same user (same partition, later offset)
    lands only after any repeated batch before it was written or dropped."""
    with Client(live.url, api_key=live.key) as nb:
        sentinel = nb.send_events([{**_views(user, live.items(), 1)[0], "type": "add_to_cart"}])
    assert sentinel.ok, sentinel
    wait_until(
        lambda: live.bronze_ids()[sentinel.event_ids[0]] == 1,
        timeout=60, what="the stream to write the sentinel to bronze",
    )  # fmt: skip
    bronze = live.bronze_ids()
    assert {i: bronze[i] for i in ids} == dict.fromkeys(ids, 1)


def test_round_trip(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    user = f"client-{uuid.uuid4().hex[:8]}"
    items = live.items()
    monkeypatch.setenv("NEXTBEST_API_KEY", live.key)  # read at call time, not at import
    with Client(live.url) as nb:
        events: list[Any] = _views(user, items, 3)
        events[1] = {**events[1], "event_id": f"{user}-chosen"}
        events.append({"type": "view", "user_id": user})  # no ts, no item: rejected
        sent = nb.send_events(events, batch_size=2)
        assert (sent.sent, sent.accepted, sent.retries, sent.failed) == (4, 3, 0, [])
        assert [(r.index, "ts" in r.reason) for r in sent.rejected] == [(3, True)]
        assert not sent.ok and sent.event_ids[1] == f"{user}-chosen"
        assert "event_id" not in events[0], "the caller's events are not modified"

        features = wait_until(
            lambda: (f := nb.features(user)) and f.state and len(f.state.recent_items) == 3 and f,
            timeout=60, what="the stream to write the user's features",
        )  # fmt: skip
        assert features.user_id == features.resolved_user_id == user
        assert features.features and all(f.age_ms >= 0 for f in features.features)
        assert set(features.state.recent_items) == set(items[:3])
        assert nb.features(f"nobody-{user}") is None

        decision = nb.decide(user, k=3, exclude=[items[0]])
        assert decision.user_id == user and 1 <= len(decision.actions) <= 3
        assert items[0] not in [a.item_id for a in decision.actions]
        assert all(a.reasons for a in decision.actions)
        action = decision.actions[0]
        done = nb.feedback(
            decision.decision_id, user, "click", action_id=action.action_id,
            item_id=action.item_id, ts=datetime.now(UTC),
        )  # fmt: skip
        assert done.accepted and done.decision_id == decision.decision_id

        with pytest.raises(ApiError) as bad:
            nb.decide(user, k=0)
        assert bad.value.status_code == 400 and '"key": "k"' in bad.value.detail, bad.value

        assert nb.erasure_status(user) is None
        job = nb.erase(user)
        assert job.user_id == user and job.status in ("running", "pending", "done")
        finished = wait_until(
            lambda: (j := nb.erasure_status(user)) and j.status in ("done", "failed") and j,
            timeout=60, what="the erasure job to finish",
        )  # fmt: skip
        assert finished.job_id == job.job_id and finished.status == "done", finished.stores
        assert nb.features(user) is None

    with Client(live.url, api_key="nb_wrong_key") as nb, pytest.raises(ApiError) as denied:
        nb.decide(user)
    assert denied.value.status_code == 401


def test_a_batch_whose_202_was_lost_is_resent_and_stored_once(live: Live) -> None:
    user = f"dropped-{uuid.uuid4().hex[:8]}"
    with FaultProxy(live.url) as proxy, Client(proxy.url, api_key=live.key, retry=FAST) as nb:
        proxy.arm("drop_response")
        result = nb.send_events(_views(user, live.items(), 20))
    assert result.ok and result.accepted == 20 and result.retries == 1, result
    assert [s.split(b" ")[1] for s in proxy.log.withheld] == [b"202"], "the first was stored"
    ids = result.event_ids
    assert len(set(ids)) == 20
    logged = live.log_ids()
    assert {i: logged[i] for i in ids} == dict.fromkeys(ids, 2), "the log holds both attempts"
    _in_bronze_once(live, user, ids)


def test_503_and_429_are_retried(live: Live) -> None:
    user = f"throttled-{uuid.uuid4().hex[:8]}"
    with FaultProxy(live.url) as proxy, Client(proxy.url, api_key=live.key, retry=FAST) as nb:
        proxy.arm("503", "429")
        result = nb.send_events(_views(user, live.items(), 5))
        assert result.ok and result.accepted == 5 and result.retries == 2, result
        proxy.arm("503")  # a fresh client: a pooled connection would bypass the fault
        with Client(proxy.url, api_key=live.key, retry=FAST) as fresh:
            assert fresh.decide(user, k=2).user_id == user
    assert proxy.log.canned == ["503", "429", "503"]
    _in_bronze_once(live, user, result.event_ids)


def test_a_batch_failing_every_retry_is_reported_not_raised(live: Live) -> None:
    user = f"failing-{uuid.uuid4().hex[:8]}"
    policy = RetryPolicy(retries=2, backoff=0.01)
    with FaultProxy(live.url) as proxy, Client(proxy.url, api_key=live.key, retry=policy) as nb:
        proxy.arm("503", "503", "503")
        result = nb.send_events(_views(user, live.items(), 4), batch_size=2)
        assert result.retries == 2 and result.accepted == 2 and not result.ok, result
        [failed] = result.failed
        assert (failed.start, failed.size, failed.status_code) == (0, 2, 503)
    with FaultProxy(live.url) as proxy, Client(proxy.url, api_key=live.key, retry=policy) as nb:
        proxy.arm("503", "503", "503")
        with pytest.raises(ApiError) as refused:
            nb.decide(user)
        assert refused.value.status_code == 503 and proxy.log.canned == ["503"] * 3


def test_async_client_retries_a_lost_answer(live: Live) -> None:
    user = f"async-{uuid.uuid4().hex[:8]}"

    async def run(url: str) -> tuple[SendResult, str]:
        async with AsyncClient(url, api_key=live.key, retry=FAST) as nb:
            result = await nb.send_events(_views(user, live.items(), 6))
            decision = await nb.decide(user, k=2)
            await nb.feedback(decision.decision_id, user, "impression")
            return result, decision.user_id

    with FaultProxy(live.url) as proxy:
        proxy.arm("drop_response")
        result, decided = asyncio.run(run(proxy.url))
    assert result.ok and result.accepted == 6 and result.retries == 1 and decided == user
    _in_bronze_once(live, user, result.event_ids)


def test_replay_retries_through_the_client(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    user = f"replayed-{uuid.uuid4().hex[:8]}"
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in _views(user, live.items(), 8)))
    with FaultProxy(live.url) as proxy:
        proxy.arm("drop_response")
        monkeypatch.setenv("NEXTBEST_HOME", str(live.settings.home_dir))
        monkeypatch.setenv("NEXTBEST_API_PORT", proxy.url.rsplit(":", 1)[1])
        monkeypatch.setenv("NEXTBEST_API_KEY", live.key)
        assert main(["replay", str(events), "--rate", "1000", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sent 8, accepted 8, rejected 0, failed batches 0, retries 1"), out
    delta = DeltaStore.from_settings(live.settings)
    wait_until(
        lambda: delta.read("events", filters=[("user_id", "=", user)]).num_rows >= 8,
        timeout=60, what="the replayed events in bronze",
    )  # fmt: skip
    ids = delta.read("events", filters=[("user_id", "=", user)]).column("event_id").to_pylist()
    _in_bronze_once(live, user, ids)
    assert len(ids) == 8
