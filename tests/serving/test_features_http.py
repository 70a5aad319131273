"""POST /v1/features over real HTTP: many users or items at once, Feast style."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from storage.online.models import FeatureRow, now_ms
from tests.serving.test_serving_world import (
    World,
    build_world,
    start_server,
    stop_server,
    stream_state,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, httpx.Client]]:
    settings = Settings(
        home=tmp_path_factory.mktemp("features") / "home",
        spec=ROOT / "nextbest.yaml",
        _env_file=None,  # type: ignore[call-arg]
    )
    world = build_world(settings)
    live = start_server(create_app(settings, rate_limit_per_s=None))
    key = create_key(world.store, ["decide"])
    with httpx.Client(base_url=live.url, timeout=30, headers={"X-API-Key": key}) as client:
        yield world, client
    stop_server(live)
    world.store.dispose()


def _post(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/features", json=body)


def test_many_users_with_grouped_last_n_and_unknown_users(
    api: tuple[World, httpx.Client],
) -> None:
    world, client = api
    ts = now_ms() - 5000
    items = world.category_items("kitchen")[:2]
    stream_state(world.store, "fu-1", [(i, "view") for i in items], ts_ms=ts)
    world.store.upsert_features(
        [
            FeatureRow("fu-1", "views_1h", 2.0, ts),
            FeatureRow("fu-1", "category_affinity_1h", 2.0, ts, group_key="kitchen"),
            FeatureRow("fu-1", "category_affinity_1h", 1.0, ts - 1000, group_key="books"),
            FeatureRow("fu-2", "views_1h", 7.0, ts),
        ]
    )
    world.store.link_alias("cookie-f", "fu-2")
    names = ["views_1h", "category_affinity_1h", "recent_items", "spend_30d"]
    r = _post(
        client, {"entities": {"user_id": ["fu-1", "anon:cookie-f", "nobody"]}, "features": names}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["entity"] == "user_id" and out["features"] == names
    one, two, nobody = out["results"]
    assert one["id"] == "fu-1" and one["found"] is True
    assert one["values"] == {
        "views_1h": 2.0,
        "category_affinity_1h": {"books": 1.0, "kitchen": 2.0},
        "recent_items": list(reversed(items)),
        "spend_30d": None,
    }
    assert one["event_ts"]["views_1h"] is not None and one["event_ts"]["spend_30d"] is None
    assert two["id"] == "anon:cookie-f" and two["resolved_id"] == "fu-2"
    assert two["values"]["views_1h"] == 7.0 and two["values"]["recent_items"] is None
    assert nobody == {
        "id": "nobody",
        "resolved_id": "nobody",
        "found": False,
        "values": dict.fromkeys(names),
        "event_ts": dict.fromkeys(names),
    }


def test_entity_rows_and_all_features_of_items(api: tuple[World, httpx.Client]) -> None:
    world, client = api
    item = world.category_items("garden")[0]
    world.store.upsert_features([FeatureRow(f"item:{item}", "item_views_1h", 4.0, now_ms())])
    r = _post(client, {"entities": [{"item_id": item}, {"item_id": "never"}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["entity"] == "item_id" and out["features"] == ["item_views_1h"]
    assert out["results"][0]["values"] == {"item_views_1h": 4.0}
    assert out["results"][0]["resolved_id"] == item
    assert out["results"][1]["values"] == {"item_views_1h": None}
    assert out["results"][1]["found"] is False


def test_unknown_and_misplaced_features_are_listed(api: tuple[World, httpx.Client]) -> None:
    _, client = api
    r = _post(
        client, {"entities": {"user_id": ["u"]}, "features": ["views_1h", "views_1d", "nope"]}
    )
    assert r.status_code == 422
    extra = r.json()["extra"]
    assert extra["unknown"] == ["views_1d", "nope"] and "views_1h" in extra["known"]
    r = _post(client, {"entities": {"user_id": ["u"]}, "features": ["item_views_1h"]})
    assert r.status_code == 422 and r.json()["extra"]["unknown"] == ["item_views_1h"]


def test_bounds_and_entity_keys(api: tuple[World, httpx.Client]) -> None:
    _, client = api
    too_many = {"entities": {"user_id": [f"u{i}" for i in range(1001)]}}
    r = _post(client, too_many)
    assert r.status_code == 422 and r.json()["extra"]["field"] == "entities.user_id"
    assert _post(client, {"entities": {"user_id": [f"u{i}" for i in range(1000)]}}).is_success
    for body in (
        {"entities": {"customer": ["u"]}},
        {"entities": {"user_id": ["u"], "item_id": ["i"]}},
        {"entities": [{"user_id": "u", "item_id": "i"}]},
        {"entities": {"user_id": []}},
        {"entities": {"user_id": ["item:x"]}},
        {"entities": {"user_id": ["a\x00"]}},
    ):
        assert _post(client, body).status_code == 422, body
    assert _post(client, {"entities": {"user_id": ["u"]}, "extra": 1}).status_code == 400
