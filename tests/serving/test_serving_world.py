"""A small served world for the serving tests and the benchmark: demo catalog in Delta,
an EASE model trained on demo events, registered and promoted, and online state
written the way the stream writes it (docs/architecture.md#user-state).

Also holds the tests of that builder itself, so a broken world fails loudly here
rather than as confusing decision assertions elsewhere.
"""

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import uvicorn

from nextbest.demo.shop import DemoConfig, generate_items, iter_events
from nextbest.features.state import SessionState
from nextbest.learn.model import ItemModel, fit, interaction_matrix
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore
from storage.online.models import FeatureRow, UserState, now_ms
from storage.online.store import OnlineStore


@dataclass
class World:
    settings: Settings
    spec: Spec
    items: list[dict[str, Any]]
    model: ItemModel
    store: OnlineStore

    def category_items(self, category: str) -> list[str]:
        return [i["item_id"] for i in self.items if i["category"] == category and i["in_stock"]]

    def category_of(self, item_id: str) -> str:
        return next(i["category"] for i in self.items if i["item_id"] == item_id)


def write_catalog(settings: Settings, items: Sequence[dict[str, Any]]) -> None:
    """The Delta `items` catalog as `nextbest import items` writes it."""
    now = datetime.now(UTC)
    table = pa.Table.from_pylist([{**i, "updated_at": now} for i in items])
    DeltaStore.from_settings(settings).write("items", table, mode="overwrite")


def train_and_promote(
    settings: Settings, spec: Spec, store: OnlineStore, cfg: DemoConfig, *, version: str = "v1"
) -> ItemModel:
    items = generate_items(cfg)
    ids = [i["item_id"] for i in items]
    events = [e for e in iter_events(cfg) if e.item_id and spec.events[e.type].weight > 0]
    x, _ = interaction_matrix(
        [e.actor for e in events],
        [e.item_id or "" for e in events],
        [spec.events[e.type].weight for e in events],
        item_ids=ids,
    )
    model = fit(
        x, item_ids=ids, groups=[i["category"] for i in items], params=spec.model, version=version
    )
    path = model.save(settings.home_dir / "models" / f"{version}.npz")
    store.register_model(version=version, artifact_path=str(path), metrics={"ndcg@10": 0.1})
    store.promote_model(version)
    return model


def build_world(settings: Settings, *, cfg: DemoConfig | None = None) -> World:
    cfg = cfg or DemoConfig.small()
    spec = load_spec(settings.spec)
    store = OnlineStore.from_settings(settings)
    items = generate_items(cfg)
    write_catalog(settings, items)
    model = train_and_promote(settings, spec, store, cfg)
    return World(settings, spec, items, model, store)


def stream_state(
    store: OnlineStore,
    user_id: str,
    events: Sequence[tuple[str, str]],
    *,
    ts_ms: int | None = None,
    features: dict[str, float] | None = None,
) -> None:
    """Write a user's state as the stream would after these (item_id, event_type)
    events, oldest first, one second apart and ending at `ts_ms`."""
    end = ts_ms if ts_ms is not None else now_ms()
    stamped = [
        (item, kind, end - (len(events) - 1 - n) * 1000) for n, (item, kind) in enumerate(events)
    ]
    history = [[item, kind, ts] for item, kind, ts in reversed(stamped)]
    seen: dict[str, list[str]] = {}
    recent: list[str] = []
    for item, kind, _ in reversed(stamped):
        seen.setdefault(kind, [])
        if item not in seen[kind]:
            seen[kind].append(item)
        if item not in recent:
            recent.append(item)
    state = UserState(
        user_id=user_id,
        event_ts_ms=end,
        recent_items=recent[:20],
        session=SessionState.load(
            {"session_id": "s-test", "last_ts_ms": end, "history": history, "seen": seen}
        ),
        session_vector=None,
    )
    store.upsert_states([state])
    rows = [FeatureRow(user_id, name, value, end) for name, value in (features or {}).items()]
    if rows:
        store.upsert_features(rows)


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


def start_server(app: Any) -> LiveServer:
    """uvicorn on a free port in a thread; returns once it accepts requests."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not (server.started and server.servers):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=20)


@pytest.fixture
def world(settings: Settings) -> Iterator[World]:
    w = build_world(settings)
    yield w
    w.store.dispose()


def test_world_promotes_a_loadable_model(world: World, tmp_path: Path) -> None:
    record = world.store.promoted_model()
    assert record is not None and record.artifact_path
    loaded = ItemModel.load(record.artifact_path)
    assert loaded.item_ids == world.model.item_ids
    assert DeltaStore.from_settings(world.settings).count("items") == len(world.items)


def test_stream_state_is_newest_first(world: World) -> None:
    stream_state(world.store, "u-x", [("i00001", "view"), ("i00002", "purchase")], ts_ms=10_000)
    state = world.store.get_state("u-x")
    assert state is not None
    assert state.recent_items == ["i00002", "i00001"]
    assert state.session.history[0] == ("i00002", "purchase", 10_000)
    assert state.session.seen == {"purchase": ["i00002"], "view": ["i00001"]}
