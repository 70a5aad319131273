"""The API with exploration on: decisions logged with propensities in the layout the
Dagster OPE/uplift assets read, offers ranked by a trained uplift model, rate limits
and the generic 500."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from definitions.batch.bandit_log import read_rounds
from nextbest.demo.offer_sim import OfferWorld, decision_records, simulate_log
from nextbest.learn.uplift import OfferUplift
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Exploration, Spec
from pipelines.records import decision_row, feedback_row
from serving.app import create_app
from serving.keys import create_key
from serving.ratelimit import TokenBuckets
from storage.delta.schemas import decisions_to_table, feedback_to_table
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.engine import create_online_engine
from tests.core.test_decide import _uplift
from tests.serving.test_serving_world import (
    LiveServer,
    World,
    build_world,
    start_server,
    stop_server,
    stream_state,
)

ROOT = Path(__file__).resolve().parents[2]
EPS = 0.5


def _exploring_spec() -> Spec:
    spec = load_spec(ROOT / "nextbest.yaml")
    policies = {
        name: p.model_copy(
            update={"exploration": Exploration(strategy="epsilon_greedy", epsilon=EPS)}
        )
        for name, p in spec.policies.items()
    }
    return spec.model_copy(update={"policies": policies})


class Api:
    def __init__(self, world: World, live: LiveServer, app: Any) -> None:
        self.world, self.live, self.app = world, live, app
        self.key = create_key(world.store, ["admin"])
        self.http = httpx.Client(base_url=live.url, timeout=10)

    def decide(self, user_id: str, **body: Any) -> dict[str, Any]:
        r = self.http.post(
            "/v1/decide", json={"user_id": user_id, **body}, headers={"X-API-Key": self.key}
        )
        assert r.status_code == 200, r.text
        return r.json()

    def records(self, kind: str) -> list[dict[str, Any]]:
        assert self.app.state.runtime.decision_log.flush()
        s = self.world.settings
        with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
            payloads = [
                json.loads(payload)
                for p in range(s.partitions)
                for _, _, payload in log.read(p, 0, max_records=100_000)
            ]
        return [p for p in payloads if p.get("record") == kind]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("explore") / "home"
    settings = Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    world = build_world(settings)
    app = create_app(settings, spec=_exploring_spec(), refresh_interval_s=0.1)
    live = start_server(app)
    yield Api(world, live, app)
    stop_server(live)
    world.store.dispose()


def _shoppers(api: Api, n: int, prefix: str) -> list[str]:
    users = [f"{prefix}{i}" for i in range(n)]
    for u in users:  # one decision each: offer caps never interfere
        stream_state(
            api.world.store,
            u,
            [(api.world.category_items("toys")[0], "add_to_cart")],
            features={"cart_adds_1h": 1.0, "views_1h": 7.0, "spend_30d": 20.0},
        )
    return users


def test_logged_decisions_feed_the_ope_reader(api: Api, tmp_path: Path) -> None:
    shoppers = _shoppers(api, 60, "u-shop-")  # P(no "none" arm drawn) = (5/6)^60
    outs = [api.decide(u, k=3, surface="checkout", context={"device": "mobile"}) for u in shoppers]
    outs += [api.decide(f"u-browse-{i}", k=4) for i in range(5)]
    assert all(len(o["actions"]) <= 1 for o in outs[:60])  # one arm (or none) per decision
    ids = {o["decision_id"] for o in outs}
    logged = [r for r in api.records("decision") if r["decision_id"] in ids]
    assert len(logged) == len(outs)
    for rec in logged:
        arms = rec["candidates"]
        assert abs(sum(a["propensity"] for a in arms) - 1.0) < 1e-9
        n = len(arms)
        assert max(a["propensity"] for a in arms) == pytest.approx(1 - EPS + EPS / n)
        shown = rec["actions"][0] if rec["actions"] else None
        key = (shown["action_id"], shown["item_id"]) if shown else ("none", None)
        p = next(a["propensity"] for a in arms if (a["action_id"], a["item_id"]) == key)
        assert (shown["propensity"] if shown else rec["features"]["propensity"]) == p
        assert rec["features"]["exploration"]["seed"] == int(rec["decision_id"][:8], 16)

    # Field by field, the layout of nextbest.demo.offer_sim.decision_records.
    sim, _ = decision_records(simulate_log(OfferWorld(), 30, seed=1), start=datetime.now(UTC))
    sim_none = next(d for d in sim if not d["actions"])
    sim_shown = next(d for d in sim if d["actions"])
    api_none = next(r for r in logged if not r["actions"])
    api_shown = next(r for r in logged if r["actions"] and r["features"]["surface"] == "checkout")
    assert set(sim_shown) <= set(api_shown)
    assert set(sim_shown["actions"][0]) <= set(api_shown["actions"][0])
    assert all(set(c) <= set(api_shown["candidates"][0]) for c in sim_shown["candidates"])
    assert set(sim_none["features"]) <= set(api_none["features"])
    assert set(sim_shown["features"]["values"]) & set(api_shown["features"]["values"])

    # Through the stream's row parsing into Delta, then definitions.batch.bandit_log.
    converted = {logged[0]["decision_id"], api_none["decision_id"]}
    for did in converted:
        r = api.http.post(
            "/v1/feedback",
            json={"decision_id": did, "user_id": "x", "outcome": "conversion"},
            headers={"X-API-Key": api.key},
        )
        assert r.status_code == 202
    feedback = [f for f in api.records("feedback") if f["decision_id"] in converted]
    store = DeltaStore(str(tmp_path / "delta"))
    store.append(
        "decisions",
        decisions_to_table([decision_row(r) for r in logged]),
        app_id="t",
        batch_version=0,
    )
    store.append(
        "feedback",
        feedback_to_table([feedback_row(f) for f in feedback]),
        app_id="t",
        batch_version=0,
    )
    rounds = read_rounds(store)
    assert rounds is not None and rounds.n == len(logged) and rounds.skipped["no_propensity"] == 0
    assert {"none", "free_shipping", "ten_percent_off"} <= set(rounds.arms)
    by_id = dict(zip(rounds.decision_ids, rounds.rewards.tolist(), strict=True))
    assert {d for d, y in by_id.items() if y == 1.0} == converted
    row = rounds.decision_ids.index(api_none["decision_id"])
    assert rounds.arms[rounds.actions[row]] == "none"
    assert rounds.propensities[row] == api_none["features"]["propensity"]
    assert rounds.x.shape[1] >= 3  # cart_adds_1h, spend_30d, views_1h


def test_offers_ranked_by_uplift_once_a_model_is_trained(api: Api) -> None:
    runtime = api.app.state.runtime
    models = api.world.settings.home_dir / "models"
    uplift = _uplift({"free_shipping": 0.1, "ten_percent_off": 1.0}, ["views_1h", "spend_30d"])
    path = uplift.save(models / "uplift" / "u-test.npz")
    (models / "uplift.json").write_text(json.dumps({"version": "u-1", "artifact_path": str(path)}))
    runtime.reload_uplift()  # the app's own refresh (every 0.1 s) may load it first
    assert runtime.uplift is not None and runtime.uplift.version == "u-1"
    assert isinstance(runtime.uplift, OfferUplift) and not runtime.reload_uplift()
    out = None
    for user in _shoppers(api, 10, "u-up-"):
        out = api.decide(user, surface="checkout", context={"device": "mobile"})
        if out["actions"] and out["actions"][0]["action_id"] == "ten_percent_off":
            break
    assert out is not None and out["actions"][0]["source"] == "uplift"
    assert any(r.startswith("uplift: predicted +") for r in out["actions"][0]["reasons"])
    rec = next(r for r in api.records("decision") if r["decision_id"] == out["decision_id"])
    arms = {a["action_id"]: a for a in rec["candidates"]}
    assert arms["ten_percent_off"]["score"] > arms["free_shipping"]["score"] > 0
    assert arms["ten_percent_off"]["propensity"] == pytest.approx(1 - EPS + EPS / 3)
    (models / "uplift.json").unlink()
    # The app's own refresh (every 0.1 s) may see the missing pointer first.
    runtime.reload_uplift()
    assert runtime.uplift is None and not runtime.reload_uplift()


def test_token_bucket_refills_at_its_rate() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", now=0.0) == pytest.approx(0.5)
    assert buckets.take("b", now=0.0) == 0.0  # per client
    assert buckets.take("a", now=0.5) == 0.0 and buckets.take("a", now=0.5) > 0


def _bare_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]


def test_429_with_retry_after_when_the_bucket_is_empty(tmp_path: Path) -> None:
    app = create_app(
        _bare_settings(tmp_path), require_keys=False, rate_limit_per_s=0.5, rate_limit_burst=2
    )
    with TestClient(app=app) as client:
        codes = [client.post("/v1/decide", json={"user_id": "u1"}).status_code for _ in range(2)]
        assert codes == [200, 200]
        r = client.post("/v1/decide", json={"user_id": "u1"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200  # probes are never limited
        assert "429" in json.dumps(app.openapi_schema.to_schema()["paths"]["/v1/decide"])


def test_internal_errors_answer_a_generic_500_with_a_request_id(tmp_path: Path) -> None:
    app = create_app(_bare_settings(tmp_path), require_keys=False)
    with TestClient(app=app) as client:
        dead = create_online_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
        app.state.runtime.serving.engine = dead
        app.state.runtime.online.engine = dead
        r = client.get("/v1/users/u1/features")
        assert r.status_code == 500
        body = r.json()
        assert body["detail"] == "internal server error" and len(body["request_id"]) == 16
        assert r.headers["x-request-id"] == body["request_id"]
        for leak in ("sqlite", "Operational", "Traceback", "x.db", str(tmp_path)):
            assert leak not in r.text
