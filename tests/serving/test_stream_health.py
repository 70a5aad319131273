"""/ready and decisions tell the truth about the stream (issue #18): a stream that is
down (no progress while events wait) is a failing `stream` check and a `degraded`
note on every decision; an idle, caught-up stream is ready."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from storage.eventlog.log import EventLog
from storage.online.models import now_ms
from storage.online.status import PartitionStatus, write_status
from tests.serving.test_serving_world import World, build_world, start_server, stop_server
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # stream_heartbeat_s: also how often the API refreshes the stream's health.
    home, spec = tmp_path / "home", ROOT / "nextbest.yaml"
    settings = Settings(home=home, spec=spec, stream_heartbeat_s=0.1, _env_file=None)  # type: ignore[call-arg]
    w = build_world(settings)
    yield w
    w.store.dispose()


def _ends(settings: Settings) -> dict[int, int]:
    with EventLog.from_settings(settings, mode="reader") as log:
        return log.end_offsets()


def _beat(world: World, offsets: dict[int, int], *, age_s: float) -> None:
    at = now_ms() - int(age_s * 1000)
    rows = [PartitionStatus(p, offsets.get(p, 0), 3, at, at) for p in range(4)]
    write_status(world.store.engine, rows)


def test_ready_and_decisions_report_a_stream_that_is_down(world: World) -> None:
    live = start_server(create_app(world.settings, refresh_interval_s=0.1))
    http = httpx.Client(base_url=live.url, timeout=10)
    ingest = {"X-API-Key": create_key(world.store, ["ingest"])}
    decide = {"X-API-Key": create_key(world.store, ["decide"])}

    def ready() -> httpx.Response:
        return http.get("/ready")

    def decision() -> dict[str, Any]:
        r = http.post("/v1/decide", json={"user_id": "u-1", "k": 2}, headers=decide)
        assert r.status_code == 200, r.text
        return r.json()

    try:
        # Idle and caught up (nothing in the log, no stream yet): ready.
        assert ready().status_code == 200 and ready().json()["checks"]["stream"] == "ok"
        assert not any(n.startswith("stream") for n in decision()["degraded"])

        ts = now_ms() / 1000
        events = [{"type": "view", "user_id": "u-1", "item_id": "i-1", "ts": ts} for _ in range(3)]
        r = http.post("/v1/events", json={"events": events}, headers=ingest)
        assert r.status_code == 202, r.text
        # The stream's last beat was a minute ago and it never read these events (nor
        # the decision records the API logs: they are in the log the stream reads).
        pending = wait_until(
            lambda: (n := sum(_ends(world.settings).values())) >= 4 and n, what="records"
        )
        _beat(world, {}, age_s=60)
        down = wait_until(
            lambda: (r := ready()).status_code == 503 and r.json(), what="/ready reports it"
        )
        assert down["checks"]["stream"].startswith(f"down: {pending} events pending")
        assert all(v == "ok" for k, v in down["checks"].items() if k != "stream")
        notes = decision()["degraded"]
        assert any(n.startswith("stream: down") for n in notes), notes
        metrics = http.get("/metrics").text
        lag = [ln for ln in metrics.splitlines() if ln.startswith("nextbest_stream_lag_events ")]
        assert float(lag[0].split()[1]) >= pending
        assert "nextbest_stream_dead_letters_total 12.0" in metrics

        # The stream caught up (an old heartbeat of an idle stream is fine): ready again.
        # (Re-written until it sticks: the decision log appends records asynchronously.)
        def caught_up() -> bool:
            _beat(world, _ends(world.settings), age_s=60)
            return ready().status_code == 200

        wait_until(caught_up, what="/ready back to 200")
        assert not any(n.startswith("stream") for n in decision()["degraded"])
    finally:
        http.close()
        stop_server(live)


def test_on_kafka_the_lag_is_unknown_and_only_a_stale_heartbeat_is_down(tmp_path: Path) -> None:
    """The broker's end offsets are not read by the API: no heartbeat yet is not an
    error, a fresh one is up, a stale one is down; the lag is reported unknown."""
    from serving.stream_health import StreamProbe
    from storage.online.store import OnlineStore

    home, spec = tmp_path / "home", ROOT / "nextbest.yaml"
    settings = Settings(home=home, spec=spec, kafka_bootstrap="127.0.0.1:9", _env_file=None)  # type: ignore[call-arg]
    store = OnlineStore.from_settings(settings)
    probe = StreamProbe(settings, store.engine)
    try:
        first = probe.check()
        assert first.up and first.lag_events is None and first.heartbeat_age_s is None
        at = now_ms()
        write_status(store.engine, [PartitionStatus(0, 10, 0, at, at)])
        assert probe.check().up
        old = at - 60_000
        write_status(store.engine, [PartitionStatus(0, 10, 1, old, old)])
        down = probe.check()
        assert not down.up and down.detail.startswith("down: no heartbeat for 60 s")
        assert down.dead_letters == 1 and down.lag_events is None
    finally:
        probe.close()
        store.dispose()
