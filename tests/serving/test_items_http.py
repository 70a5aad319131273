"""PUT /v1/items, GET /v1/items/{id}/similar and decide's `candidates`, over real HTTP.

Two API servers share the stores (online store, Delta, LanceDB) the way several API
processes do; each has its own runtime, memory and event log (a real deployment
shares Kafka instead). An update made through one must change the other's next
decisions within seconds, and be recorded in Delta `item_updates`.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from serving.runtime import ServingRuntime
from storage.delta.item_updates import read_item_updates
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.vectors import VectorStore
from tests.serving.test_serving_world import (
    LiveServer,
    World,
    build_world,
    start_server,
    stop_server,
    stream_state,
)
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
LANCE_ONLY = "lance-only-1"


@dataclass
class Two:
    world: World
    a: httpx.Client
    b: httpx.Client
    servers: list[LiveServer]

    def decide(self, client: httpx.Client, user: str, **body: Any) -> dict[str, Any]:
        r = client.post("/v1/decide", json={"user_id": user, **body})
        assert r.status_code == 200, r.text
        return r.json()

    def put(self, client: httpx.Client, items: list[Any]) -> httpx.Response:
        return client.put("/v1/items", json={"items": items})


def _lance_items(settings: Settings, world: World) -> None:
    """LanceDB `items` as Dagster writes it, plus one item the model does not know."""
    spec = world.spec
    store = VectorStore.from_settings(
        settings,
        dim=spec.model.dim,
        item_attributes={n: a.type for n, a in spec.entities.item.attributes.items()},
    )
    store.ensure_tables()
    vectors = world.model.vectors
    rows = [
        {**item, "vector": vectors[world.model.index[item["item_id"]]]}
        for item in world.items
        if item["item_id"] in world.model.index
    ]
    hiking = world.category_items("hiking")[0]
    near = vectors[world.model.index[hiking]] + 0.01
    rows.append(
        {
            "item_id": LANCE_ONLY,
            "vector": near / np.linalg.norm(near),
            "category": "hiking",
            "price": 10.0,
            "in_stock": True,
            "title": "Lance only",
        }
    )
    store.upsert_items(rows, model_version="v1")


def _sharing(first: Settings, home: Path) -> Settings:
    """Another API process's settings: its own home and event log, the same stores."""
    return Settings(
        home=home,
        spec=ROOT / "nextbest.yaml",
        online_url=first.online_database_url,
        delta_uri=first.delta_root,
        lance_uri=first.lance_root,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Two]:
    base = tmp_path_factory.mktemp("items")
    first = Settings(home=base / "a", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    world = build_world(first)
    _lance_items(first, world)
    second = _sharing(first, base / "b")
    key = create_key(world.store, ["admin"])
    servers = [
        start_server(create_app(s, refresh_interval_s=0.2, rate_limit_per_s=None))
        for s in (first, second)
    ]
    a, b = (httpx.Client(base_url=s.url, timeout=30, headers={"X-API-Key": key}) for s in servers)
    yield Two(world, a, b, servers)
    for s in servers:
        stop_server(s)
    world.store.dispose()


def _decision(settings: Settings, decision_id: str) -> dict[str, Any] | None:
    with EventLog.open(settings.eventlog_dir, partitions=settings.partitions, mode="reader") as log:
        for p in range(settings.partitions):
            for _, _, payload in log.read(p, 0, max_records=100_000):
                record = json.loads(payload)
                if record.get("decision_id") == decision_id:
                    return record
    return None


def _hiker(two: Two, user: str) -> list[str]:
    viewed = two.world.category_items("hiking")[:4]
    stream_state(two.world.store, user, [(i, "view") for i in viewed])
    return viewed


def test_out_of_stock_leaves_the_next_decision_of_every_process(two: Two) -> None:
    _hiker(two, "u-stock")
    first = two.decide(two.a, "u-stock", k=5)["actions"]
    top = first[0]["item_id"]
    assert top in [a["item_id"] for a in two.decide(two.b, "u-stock", k=5)["actions"]]
    r = two.put(two.a, [{"item_id": top, "attributes": {"in_stock": False}}])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["version"] >= 1
    # The process that took the update honours it at once ...
    assert top not in [a["item_id"] for a in two.decide(two.a, "u-stock", k=5)["actions"]]

    # ... and the other one within its refresh interval.
    def gone() -> bool:
        return top not in [a["item_id"] for a in two.decide(two.b, "u-stock", k=5)["actions"]]

    wait_until(gone, timeout=10, what="the other process drops the out-of-stock item")
    # Back in stock: served again, and the answer shows the new price.
    r = two.put(two.b, [{"item_id": top, "attributes": {"in_stock": True, "price": 1.5}}])
    assert r.status_code == 200, r.text

    def back() -> dict[str, Any] | None:
        acts = two.decide(two.a, "u-stock", k=5)["actions"]
        return next((a for a in acts if a["item_id"] == top), None)

    action = wait_until(back, timeout=10, what="the item served again")
    assert action["attributes"]["price"] == 1.5 and action["attributes"]["in_stock"] is True
    assert action["attributes"]["category"] == two.world.category_of(top)  # merged, kept


def test_updates_are_in_delta_history_and_survive_a_restart(two: Two) -> None:
    item = two.world.category_items("garden")[0]
    r = two.put(two.a, [{"item_id": item, "attributes": {"price": 12.5, "title": "Rake"}}])
    assert r.status_code == 200, r.text
    update_id = r.json()["update_id"]
    history = read_item_updates(DeltaStore.from_settings(two.world.settings)).to_pylist()
    rows = [h for h in history if h["update_id"] == update_id]
    assert len(rows) == 1 and rows[0]["item_id"] == item and rows[0]["source"] == "api"
    assert json.loads(rows[0]["attributes"]) == {"price": 12.5, "title": "Rake"}
    # A process started later lays the stored updates over the Delta catalog.
    later = _sharing(two.world.settings, two.world.settings.home_dir.parent / "c")
    fresh = ServingRuntime.open(later, two.world.spec, require_keys=False)
    try:
        attrs = fresh.assets.attributes[item]
        assert attrs["price"] == 12.5 and attrs["title"] == "Rake"
        assert attrs["category"] == "garden"
    finally:
        fresh.close()


def test_bad_items_are_rejected_with_reasons_valid_ones_applied(two: Two) -> None:
    item = two.world.category_items("books")[0]
    r = two.put(
        two.a,
        [
            {"item_id": item, "attributes": {"price": 7}},  # an int is a fine float
            {"item_id": "x1", "attributes": {"colour": "red"}},
            {"item_id": "x2", "attributes": {"in_stock": "no"}},
            {"item_id": "x3", "attributes": {}},
            {"attributes": {"price": 1.0}},
            "not an object",
            {"item_id": "x4", "attributes": {"price": 1.0}, "extra": 1},
            {"item_id": "x5", "attributes": {"title": "a\x00b"}},
        ],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 1
    reasons = {x["index"]: x["reason"] for x in body["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert reasons[1].startswith("attributes.colour: not an item attribute")
    assert reasons[2] == "attributes.in_stock: must be true or false"
    assert reasons[4].startswith("item_id:") and reasons[6].startswith("extra:")
    none = two.put(two.a, [{"item_id": "x6", "attributes": {"price": "cheap"}}])
    assert none.status_code == 422 and none.json()["accepted"] == 0
    assert two.a.put("/v1/items", json={"items": []}).status_code == 400
    assert two.a.put("/v1/items", json={"things": []}).status_code == 400


def test_null_clears_an_attribute(two: Two) -> None:
    item = two.world.category_items("books")[1]
    assert two.put(two.a, [{"item_id": item, "attributes": {"title": None}}]).status_code == 200
    (action,) = two.decide(two.a, "u-null", candidates=[item])["actions"]
    assert action["title"] is None and action["attributes"]["title"] is None
    assert action["attributes"]["category"] == "books"


def test_similar_items_from_the_model(two: Two) -> None:
    hiking = two.world.category_items("hiking")
    r = two.a.get(f"/v1/items/{hiking[0]}/similar", params={"k": 8})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = [i["item_id"] for i in out["items"]]
    assert out["source"] == "model" and out["model_version"] == "v1"
    assert len(ids) == 8 and hiking[0] not in ids and len(set(ids)) == 8
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert [two.world.category_of(i) for i in ids].count("hiking") >= 6
    # Out of stock: no longer a neighbour.
    gone = ids[0]
    assert two.put(two.a, [{"item_id": gone, "attributes": {"in_stock": False}}]).status_code == 200
    again = [i["item_id"] for i in two.a.get(f"/v1/items/{hiking[0]}/similar?k=8").json()["items"]]
    assert gone not in again and again[0] == ids[1]
    two.put(two.a, [{"item_id": gone, "attributes": {"in_stock": True}}])


def test_similar_items_from_lancedb_for_an_item_the_model_lacks(two: Two) -> None:
    r = two.a.get(f"/v1/items/{LANCE_ONLY}/similar?k=5")
    assert r.status_code == 200, r.text
    out = r.json()
    ids = [i["item_id"] for i in out["items"]]
    assert out["source"] == "vectors" and LANCE_ONLY not in ids and len(ids) == 5
    assert ids[0] == two.world.category_items("hiking")[0]


def test_similar_items_errors(two: Two) -> None:
    assert two.a.get("/v1/items/no-such-item/similar").status_code == 404
    assert two.a.get("/v1/items/i00001/similar?k=0").status_code == 400
    assert two.a.get("/v1/items/i00001/similar?k=101").status_code == 400
    assert two.a.get("/v1/items/a%01b/similar").status_code == 422


def test_candidates_are_reranked_by_the_policy(two: Two) -> None:
    viewed = _hiker(two, "u-rank")
    hiking = [i for i in two.world.category_items("hiking") if i not in viewed]
    kitchen = two.world.category_items("kitchen")
    given = [kitchen[0], hiking[5], "nope-1", kitchen[1], hiking[6], viewed[0]]
    out = two.decide(two.a, "u-rank", k=10, candidates=given)
    ids = [a["item_id"] for a in out["actions"]]
    assert out["unknown_candidates"] == ["nope-1"]
    # Only the given, known, eligible items (the viewed one is excluded as seen) ...
    assert sorted(ids) == sorted([kitchen[0], hiking[5], kitchen[1], hiking[6]])
    # ... scored as the unrestricted policy scores them, best first.
    full = {a["item_id"]: a["score"] for a in two.decide(two.a, "u-rank", k=100)["actions"]}
    both = [a for a in out["actions"] if a["item_id"] in full]
    assert both and all(a["score"] == pytest.approx(full[a["item_id"]]) for a in both)
    assert out["actions"][0]["source"] != "popular"  # a source proposed the first one
    # The decision record names the candidate set its propensities are relative to.
    logged = wait_until(
        lambda: _decision(two.world.settings, out["decision_id"]), what="the decision record"
    )
    assert logged["features"]["candidates"] == sorted(set(given) - {"nope-1"})
    scores = [a["score"] for a in out["actions"]]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    assert all(a["reasons"] for a in out["actions"])
    top = two.decide(two.a, "u-rank", k=1, candidates=given)["actions"]
    assert [a["item_id"] for a in top] == ids[:1]
    # Item rules still apply: out of stock is dropped.
    two.put(two.a, [{"item_id": hiking[5], "attributes": {"in_stock": False}}])
    ids = [a["item_id"] for a in two.decide(two.a, "u-rank", candidates=given)["actions"]]
    assert hiking[5] not in ids and len(ids) == 3
    two.put(two.a, [{"item_id": hiking[5], "attributes": {"in_stock": True}}])
    # Nothing known: nothing returned, every id reported.
    none = two.decide(two.a, "u-rank", candidates=["zz-1", "zz-2"])
    assert none["actions"] == [] and none["unknown_candidates"] == ["zz-1", "zz-2"]
    bad = two.a.post("/v1/decide", json={"user_id": "u-rank", "candidates": ["a\x00"]})
    assert bad.status_code == 422 and bad.json()["extra"]["field"] == "candidates[0]"
    plain = two.decide(two.a, "u-rank", k=3)
    assert plain["unknown_candidates"] == [] and len(plain["actions"]) == 3
