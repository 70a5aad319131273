"""Degrading honestly (issue #13): a decision whose snapshot read overruns the budget
or fails still serves the user's cached decision when one exists, and /metrics says how
many decisions fell back and why, with bounded label values."""

import re
import time
from pathlib import Path
from typing import Any

import httpx

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from serving.metrics import FALLBACK_REASONS, degraded_reason
from storage.online.models import CachedDecision
from tests.serving.test_serving_world import build_world, start_server, stop_server, stream_state

ROOT = Path(__file__).resolve().parents[2]


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of `name` with exactly these labels (0 when absent)."""
    for line in metrics.splitlines():
        m = re.match(rf"^{name}\{{([^}}]*)\}} (\S+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def test_a_read_over_budget_serves_the_cached_decision_and_counts_why(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    world = build_world(settings)
    key = create_key(world.store, ["decide"])
    picks = world.category_items("garden")[:3]
    world.store.put_cached_decisions(
        [CachedDecision("u-slow", [{"item_id": i, "score": 1.0} for i in picks], "v0")]
    )
    stream_state(world.store, "u-slow", [(picks[0], "view")])
    app = create_app(settings)
    live = start_server(app)
    try:
        headers = {"X-API-Key": key}
        r = httpx.post(f"{live.url}/v1/decide", json={"user_id": "u-slow", "k": 3}, headers=headers)
        assert r.status_code == 200 and r.json()["served_from"] == "realtime"
        serving = app.state.runtime.serving
        read = serving.snapshot

        def slow(*args: Any, **kw: Any) -> Any:
            time.sleep(0.3)  # the default policy's budget is 50 ms
            return read(*args, **kw)

        serving.snapshot = slow  # now every read overruns (as under load)
        r = httpx.post(f"{live.url}/v1/decide", json={"user_id": "u-slow", "k": 3}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["served_from"] == "cached", body
        assert [a["item_id"] for a in body["actions"]] == picks
        assert any("budget" in d for d in body["degraded"])
        r = httpx.post(f"{live.url}/v1/decide", json={"user_id": "u-new", "k": 3}, headers=headers)
        assert r.status_code == 200 and r.json()["served_from"] == "fallback"
        serving.snapshot = read
        r = httpx.post(
            f"{live.url}/v1/decide", json={"user_id": "u-never", "k": 3}, headers=headers
        )
        assert r.status_code == 200 and r.json()["served_from"] == "fallback"
        text = httpx.get(f"{live.url}/metrics").text
        fallbacks = "nextbest_decision_fallbacks_total"
        assert _sample(text, fallbacks, reason="budget", served_from="cached") == 1
        # u-never's read is fast unless the machine is loaded enough to overrun it too.
        over = _sample(text, fallbacks, reason="budget", served_from="fallback")
        assert over >= 1
        assert over + _sample(text, fallbacks, reason="no_state", served_from="fallback") == 2
        assert _sample(text, "nextbest_decisions_degraded_total", reason="budget") == over + 1
    finally:
        stop_server(live)
        world.store.dispose()


def test_degraded_reasons_are_a_bounded_set() -> None:
    notes = [
        "realtime: over the 50 ms budget",
        "realtime: OperationalError",
        "realtime: decide ValueError",
        "surface 'x' * 100 unknown; served 'home'",
        "stream: no heartbeat for 40 s",
        "cached: TimeoutError",
        "anything else: at all",
    ]
    assert [degraded_reason(n) for n in notes] == [
        "budget",
        "store_error",
        "decide_error",
        "surface",
        "stream",
        "cached",
        "other",
    ]
    assert "budget" in FALLBACK_REASONS and "no_state" in FALLBACK_REASONS
