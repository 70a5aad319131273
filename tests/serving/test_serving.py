"""The HTTP API over real HTTP (uvicorn on a free port): decisions, events, feedback,
features, erasure, keys, readiness, metrics, degraded stores."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from storage.eventlog.log import EventLog
from storage.online.models import CachedDecision
from tests.serving.test_serving_world import (
    LiveServer,
    World,
    build_world,
    start_server,
    stop_server,
    stream_state,
    train_and_promote,
)
from tests.support.broker import read_topic
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _settings(home: Path, **kw: Any) -> Settings:
    return Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None, **kw)  # type: ignore[call-arg]


class Api:
    """A live server plus keys of every scope."""

    def __init__(self, world: World, live: LiveServer, app: Litestar) -> None:
        self.world = world
        self.live = live
        self.app = app
        self.admin = create_key(world.store, ["admin"])
        self.ingest = create_key(world.store, ["ingest"])
        self.decide_key = create_key(world.store, ["decide"])
        self.http = httpx.Client(base_url=live.url, timeout=10)

    def post(self, path: str, body: Any, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"X-API-Key": key or self.admin, **kw.pop("headers", {})}
        return self.http.post(path, json=body, headers=headers, **kw)

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return self.http.get(path, headers={"X-API-Key": key or self.admin})

    def decide(self, user_id: str, **body: Any) -> dict[str, Any]:
        r = self.post("/v1/decide", {"user_id": user_id, **body}, self.decide_key)
        assert r.status_code == 200, r.text
        return r.json()

    def log_records(self) -> list[tuple[str, dict[str, Any]]]:
        s = self.world.settings
        with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
            return [
                (key, json.loads(payload))
                for p in range(s.partitions)
                for _, key, payload in log.read(p, 0, max_records=100_000)
            ]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = _settings(tmp_path_factory.mktemp("serving") / "home")
    world = build_world(settings)
    app = create_app(settings, refresh_interval_s=0.1)
    live = start_server(app)
    yield Api(world, live, app)
    stop_server(live)
    world.store.dispose()


def test_category_viewer_gets_that_category_in_realtime(api: Api) -> None:
    viewed = api.world.category_items("hiking")[:5]
    stream_state(api.world.store, "u-hiker", [(i, "view") for i in viewed])

    def hiking() -> dict[str, Any] | None:
        out = api.decide("u-hiker", k=4)
        cats = [api.world.category_of(a["item_id"]) for a in out["actions"]]
        return out if cats.count("hiking") >= 3 and out["served_from"] == "realtime" else None

    out = wait_until(hiking, timeout=1.0, what="hiking items served real-time")
    assert out["model_version"] == "v1" and out["feature_age_ms"] is not None
    assert all(a["reasons"] for a in out["actions"])


def test_decided_items_read_with_their_titles_and_categories(api: Api) -> None:
    """The README's story, readable from the answer alone: a user who viewed kitchen
    items gets kitchen items, each with its catalogue title and category."""
    kitchen = api.world.category_items("kitchen")[:2]
    stream_state(api.world.store, "u-cook", [(i, "view") for i in kitchen])
    catalog = {i["item_id"]: i for i in api.world.items}
    out = api.decide("u-cook", k=4)
    assert out["served_from"] == "realtime" and out["actions"]
    for action in out["actions"]:
        row = catalog[action["item_id"]]
        assert action["title"] == row["title"] and action["title"]
        assert action["attributes"] == {
            n: row[n] for n in ("category", "price", "in_stock", "title")
        }
    categories = [a["attributes"]["category"] for a in out["actions"]]
    assert categories.count("kitchen") >= 3, categories
    fallback = api.decide("never-seen-cook", k=2)
    assert all(a["title"] == catalog[a["item_id"]]["title"] for a in fallback["actions"])
    stream_state(
        api.world.store, "u-cook-pays", [(kitchen[0], "add_to_cart")],
        features={"cart_adds_1h": 1.0, "views_1h": 7.0},
    )  # fmt: skip
    offers = api.decide("u-cook-pays", k=3, surface="checkout", context={"device": "mobile"})
    assert offers["actions"]
    for offer in offers["actions"]:  # offers keep their action title, no item attributes
        assert offer["item_id"] is None and offer["attributes"] == {}
        assert offer["title"] == api.world.spec.actions[offer["action_id"]].title


def test_unknown_and_anonymous_users_get_a_cold_start(api: Api) -> None:
    for user in ("never-seen", "anon:visitor-1"):
        out = api.decide(user, k=5)
        assert out["served_from"] == "fallback" and len(out["actions"]) == 5


def test_anonymous_id_resolves_to_the_linked_user(api: Api) -> None:
    viewed = api.world.category_items("books")[:5]
    stream_state(api.world.store, "u-reader", [(i, "view") for i in viewed])
    api.world.store.link_alias("cookie-7", "u-reader")
    out = api.decide("anon:cookie-7", k=4)
    assert out["served_from"] == "realtime" and out["user_id"] == "anon:cookie-7"
    assert [api.world.category_of(a["item_id"]) for a in out["actions"]].count("books") >= 3


def test_cached_decision_for_a_user_without_state(api: Api) -> None:
    picks = api.world.category_items("garden")[:3]
    api.world.store.put_cached_decisions(
        [CachedDecision("u-batch", [{"item_id": i, "score": 1.0} for i in picks], "v0")]
    )
    out = api.decide("u-batch", k=3)
    assert out["served_from"] == "cached" and out["model_version"] == "v0"
    assert [a["item_id"] for a in out["actions"]] == picks


def test_checkout_surface_decides_offers(api: Api) -> None:
    stream_state(
        api.world.store,
        "u-shopper",
        [(api.world.category_items("toys")[0], "add_to_cart")],
        features={"cart_adds_1h": 1.0, "views_1h": 7.0},
    )
    out = api.decide("u-shopper", k=3, context={"surface": "checkout", "device": "mobile"})
    assert out["surface"] == "checkout"
    assert {a["action_id"] for a in out["actions"]} == {"free_shipping", "ten_percent_off"}

    runtime = api.app.state.runtime
    assert runtime.decision_log.flush()  # cap counters are written off the request path
    again = api.decide("u-shopper", k=3, surface="checkout", context={"device": "mobile"})
    assert [a["action_id"] for a in again["actions"]] == ["ten_percent_off"]  # 1 per day
    assert runtime.decision_log.flush()
    third = api.decide("u-shopper", k=3, surface="checkout", context={"device": "mobile"})
    assert third["actions"] == [] and third["served_from"] == "realtime"  # 2 per week


def test_events_accepted_individually_and_durable(api: Api) -> None:
    item = api.world.category_items("shoes")[0]
    events = [
        {"type": "view", "user_id": "u-ev", "item_id": item, "ts": 1736150400},
        {"type": "view", "user_id": "u-ev", "ts": 1736150400},  # no item_id
        "not an object",
        {
            "event_id": "ident-1",
            "type": "identify",
            "user_id": "u-ev",
            "anonymous_id": "a-ev",
            "ts": "2025-01-06T08:00:00Z",
            "properties": {"email": "someone@example.com"},
        },
    ]
    r = api.post("/v1/events", {"events": events}, api.ingest)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 2 and len(body["event_ids"]) == 2
    assert [(x["index"], x["event_id"]) for x in body["rejected"]] == [(1, None), (2, None)]
    assert "item_id" in body["rejected"][0]["reason"]
    logged = {p.get("event_id"): (k, p) for k, p in api.log_records()}
    assert set(body["event_ids"]) <= set(logged)
    key, identify = logged["ident-1"]
    assert key == "u-ev" and identify["properties"]["email"].startswith("h:")  # pseudonymized


def test_events_422_413_400(api: Api) -> None:
    r = api.post("/v1/events", {"events": [{"type": "nope", "user_id": "u"}]}, api.ingest)
    assert r.status_code == 422 and r.json()["accepted"] == 0
    big = {"events": [{"type": "view", "user_id": "u", "item_id": "x" * 200, "ts": 1}] * 30_000}
    assert api.post("/v1/events", big, api.ingest).status_code == 413
    r = api.http.post(
        "/v1/events",
        content=b'{"events": [',
        headers={"X-API-Key": api.ingest, "content-type": "application/json"},
    )
    assert r.status_code == 400


def test_keys_401_and_403(api: Api) -> None:
    body = {"user_id": "u1"}
    assert api.http.post("/v1/decide", json=body).status_code == 401
    bad = api.admin[:-4] + "zzzz"
    assert api.post("/v1/decide", body, bad).status_code == 401
    assert api.post("/v1/decide", body, "garbage").status_code == 401
    assert api.post("/v1/decide", body, api.ingest).status_code == 403
    assert api.post("/v1/events", {"events": [{}]}, api.decide_key).status_code == 403
    assert api.http.delete("/v1/users/u1", headers={"X-API-Key": api.decide_key}).status_code == 403
    assert api.post("/v1/decide", body, api.decide_key).status_code == 200
    assert api.http.get("/health").status_code == 200  # probes need no key


def test_decisions_and_feedback_are_logged(api: Api) -> None:
    out = api.decide("u-logged", k=2)
    fb = {"decision_id": out["decision_id"], "user_id": "u-logged", "outcome": "click"}
    r = api.post("/v1/feedback", {**fb, "item_id": out["actions"][0]["item_id"]}, api.decide_key)
    assert r.status_code == 202 and r.json()["decision_id"] == out["decision_id"]
    assert api.post("/v1/feedback", {**fb, "decision_id": "xyz"}).status_code == 400
    assert api.post("/v1/feedback", {**fb, "outcome": "purchase"}).status_code == 400

    def logged() -> list[dict[str, Any]]:
        return [p for _, p in api.log_records() if p.get("decision_id") == out["decision_id"]]

    records = wait_until(
        lambda: len(logged()) == 2 and logged(), what="decision and feedback records"
    )
    decision = next(p for p in records if p["record"] == "decision")
    feedback = next(p for p in records if p["record"] == "feedback")
    assert decision["served_from"] == out["served_from"] and decision["features"]["pool"]["item_id"]
    assert [a["item_id"] for a in decision["actions"]] == [a["item_id"] for a in out["actions"]]
    # Without exploration (the demo spec): the greedy slate, every propensity 1.
    assert all(a["propensity"] == 1.0 for a in decision["actions"])
    arms = decision["candidates"]
    assert arms[0]["item_id"] == out["actions"][0]["item_id"] and arms[0]["propensity"] == 1.0
    assert sum(a["propensity"] for a in arms) == 1.0 and len(arms) == 20
    assert feedback["outcome"] == "click" and feedback["user_id"] == "u-logged"


def test_features_endpoint_reports_ages(api: Api) -> None:
    stream_state(api.world.store, "u-feat", [("i00001", "view")], features={"views_1h": 3.0})
    r = api.get("/v1/users/u-feat/features", api.decide_key)
    assert r.status_code == 200
    body = r.json()
    views = next(f for f in body["features"] if f["feature"] == "views_1h")
    assert views["value"] == 3.0 and views["age_ms"] >= 0 and views["updated_at"]
    assert body["state"]["recent_items"] == ["i00001"]
    assert api.get("/v1/users/nobody-here/features").status_code == 404


def test_erasure_removes_online_state_and_log_records(api: Api) -> None:
    stream_state(api.world.store, "u-erase", [("i00002", "view")], features={"views_1h": 1.0})
    item = api.world.category_items("shoes")[1]
    event = {"type": "view", "user_id": "u-erase", "item_id": item, "ts": 1736150400}
    assert api.post("/v1/events", {"events": [event]}, api.ingest).status_code == 202
    assert any(k == "u-erase" for k, _ in api.log_records())
    r = api.http.delete("/v1/users/u-erase", headers={"X-API-Key": api.admin})
    assert r.status_code == 202 and r.json()["stores"]["online"].startswith("done")

    def finished() -> dict[str, Any] | None:
        job = api.get("/v1/users/u-erase/erasure").json()
        return job if "removed" in job["stores"]["eventlog"] else None

    job = wait_until(finished, what="event log erasure")
    # No stream runs here: the stream's stores stay pending, and the erase request
    # (removed by the API once the stream reports done) is all the log holds of them.
    assert job["status"] == "running" and job["stores"]["lance_users"] == "pending: stream"
    left = [p for k, p in api.log_records() if k == "u-erase"]
    assert left and all(p["record"] == "erase" for p in left)
    assert api.get("/v1/users/u-erase/features").status_code == 404
    assert api.get("/v1/users/someone-else/erasure").status_code == 404


def test_ready_metrics_and_model_reload(api: Api) -> None:
    r = api.http.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "v1"
    metrics = api.http.get("/metrics").text
    assert (
        'nextbest_http_request_duration_seconds_count{method="POST",route="/v1/decide"' in metrics
    )
    assert "nextbest_events_accepted_total" in metrics
    assert 'nextbest_decisions_total{served_from="realtime"' in metrics
    assert "nextbest_event_to_online_lag_seconds_count" in metrics
    s = api.world.settings
    train_and_promote(s, api.world.spec, api.world.store, DemoConfig.small(seed=3), version="v2")
    wait_until(lambda: api.http.get("/ready").json()["model_version"] == "v2", what="reload of v2")
    assert api.decide("u-hiker", k=2)["model_version"] == "v2"


def test_vector_store_unavailable_still_answers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("LanceDB cannot live inside a file")
    settings = _settings(home, lance_uri=str(blocker / "lance"))
    world = build_world(settings)
    key = create_key(world.store, ["decide"])
    viewed = world.category_items("hiking")[:5]
    stream_state(world.store, "u-hiker", [(i, "view") for i in viewed])
    live = start_server(create_app(settings))
    try:
        headers = {"X-API-Key": key}
        r = httpx.post(
            f"{live.url}/v1/decide", json={"user_id": "u-hiker", "k": 4}, headers=headers
        )
        assert r.status_code == 200 and r.json()["served_from"] == "realtime"
        ready = httpx.get(f"{live.url}/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["vector_store"] != "ok"
        world.store.set_model_status("v1", "retired")  # no model: the vector path needs LanceDB
        r = httpx.post(f"{live.url}/v1/decide", json={"user_id": "u-hiker"}, headers=headers)
        assert r.status_code == 200
    finally:
        stop_server(live)
        world.store.dispose()


def test_online_store_down_serves_fallback(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home")
    world = build_world(settings)
    key = create_key(world.store, ["decide"])
    app = create_app(settings)
    live = start_server(app)
    try:
        from storage.online.engine import create_online_engine

        # Point the decision reads at a database that cannot be opened.
        dead = create_online_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
        (tmp_path / "gone").rmdir()
        app.state.runtime.serving.engine = dead
        r = httpx.post(
            f"{live.url}/v1/decide", json={"user_id": "u1", "k": 3}, headers={"X-API-Key": key}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["served_from"] == "fallback" and len(body["actions"]) == 3
        assert any(d.startswith("realtime: OperationalError") for d in body["degraded"])
    finally:
        stop_server(live)
        world.store.dispose()


def test_kafka_producer_acknowledges_before_202(tmp_path: Path, kafka_broker: Any) -> None:
    topic = f"nb-api-{tmp_path.name[-8:]}".replace("_", "-")
    kafka_broker.create_topic(topic, partitions=2)
    settings = _settings(
        tmp_path / "home", kafka_bootstrap=kafka_broker.bootstrap, kafka_topic=topic
    )
    world = build_world(settings)
    key = create_key(world.store, ["ingest", "decide"])
    live = start_server(create_app(settings))
    try:
        headers = {"X-API-Key": key}
        event = {"type": "view", "user_id": "u-k", "item_id": "i00001", "ts": 1736150400}
        r = httpx.post(f"{live.url}/v1/events", json={"events": [event]}, headers=headers)
        assert r.status_code == 202, r.text
        event_id = r.json()["event_ids"][0]
        # Acknowledged means already on the broker: read it back without waiting.
        records = read_topic(kafka_broker.bootstrap, topic)
        assert [(rec.key, json.loads(rec.value or b"")["event_id"]) for rec in records] == [
            (b"u-k", event_id)
        ]
        r = httpx.post(f"{live.url}/v1/decide", json={"user_id": "u-k"}, headers=headers)
        decision_id = r.json()["decision_id"]

        def logged() -> bool:
            values = [
                json.loads(rec.value or b"") for rec in read_topic(kafka_broker.bootstrap, topic)
            ]
            return any(v.get("decision_id") == decision_id for v in values)

        wait_until(logged, timeout=20, what="decision record on the topic")
    finally:
        stop_server(live)
        world.store.dispose()


def test_ready_says_why_the_event_log_cannot_be_written(tmp_path: Path) -> None:
    """A log that cannot take an append (here: its writer closed after a failure) makes
    /ready 503 with the reason, instead of a ping that only knows the directory exists."""
    settings = _settings(tmp_path / "home")
    world = build_world(settings)
    app = create_app(settings)
    live = start_server(app)
    try:
        assert httpx.get(f"{live.url}/ready").json()["checks"]["event_log"] == "ok"
        app.state.runtime.sink.log.close()
        ready = httpx.get(f"{live.url}/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["event_log"] == "not writable: closed"
    finally:
        stop_server(live)
        world.store.dispose()
