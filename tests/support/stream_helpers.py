"""Helpers for the stream tests and benchmark: demo data into the stores and the log,
and the batch recomputation the online store must equal."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nextbest.demo.shop import DemoConfig, generate_items, iter_event_dicts
from nextbest.features.semantics import batch_window_values, identity_links
from nextbest.ingest.events import Event
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.profile import item_actor
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.store import OnlineStore
from storage.vectors import VectorStore

ROOT = Path(__file__).resolve().parents[2]


def payload_key(event: Mapping[str, Any]) -> str:
    """The log key of an event dict: `Event.actor` (docs/architecture.md#one-event-end-to-end)."""
    return event["user_id"] if event.get("user_id") else f"anon:{event['anonymous_id']}"


def encode(event: Mapping[str, Any]) -> tuple[str, bytes]:
    return payload_key(event), json.dumps(event, separators=(",", ":")).encode()


def demo_events(n: int, *, seed: int = 7, **cfg: Any) -> tuple[DemoConfig, list[dict[str, Any]]]:
    config = DemoConfig.small(n_events=n, seed=seed, **cfg)
    return config, list(iter_event_dicts(config))


def write_catalog(
    settings: Settings, spec: Spec, cfg: DemoConfig, *, vectors: bool
) -> dict[str, dict[str, Any]]:
    """Delta `items` (always) and LanceDB `items` with random vectors (if asked)."""
    rows = generate_items(cfg)
    now = datetime.now(UTC)
    table = pa.Table.from_pylist([{**r, "updated_at": now} for r in rows])
    DeltaStore.from_settings(settings).write("items", table, mode="overwrite")
    if vectors:
        types = {n: a.type for n, a in spec.entities.item.attributes.items()}
        store = VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]
        store.ensure_tables()
        rng = np.random.default_rng(cfg.seed)
        vecs = rng.normal(size=(len(rows), spec.model.dim)).astype(np.float32)
        store.upsert_items(
            [{**r, "vector": vecs[i]} for i, r in enumerate(rows)], model_version="t"
        )
    return {r["item_id"]: {k: v for k, v in r.items() if k != "item_id"} for r in rows}


def append_log(settings: Settings, events: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> int:
    """Append events to the embedded log (writer mode); returns how many."""
    n = 0
    with EventLog.from_settings(settings, mode="writer") as log:
        batch: list[tuple[str, bytes]] = []
        for event in events:
            batch.append(encode(event))
            if len(batch) >= chunk:
                n += len(log.append(batch))
                batch = []
        if batch:
            n += len(log.append(batch))
    return n


def delta_events(settings: Settings) -> tuple[list[Event], pa.Table]:
    """Bronze rows back as `Event`s (the batch side's view of history)."""
    table = DeltaStore.from_settings(settings).read("events")
    events = []
    for row in table.to_pylist():
        events.append(
            Event(
                event_id=row["event_id"],
                type=row["type"],
                user_id=row["user_id"],
                anonymous_id=row["anonymous_id"],
                item_id=row["item_id"],
                ts=row["ts"],
                value=row["value"],
                context=json.loads(row["context"] or "{}"),
                properties=json.loads(row["properties"] or "{}"),
            )
        )
    return events, table


def expected_features(
    spec: Spec, events: Sequence[Event], items: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[tuple[str, str], float]]:
    """actor -> {(feature, group): value} recomputed in batch from `events`."""
    aliases = identity_links(spec, events)
    out: dict[str, dict[tuple[str, str], float]] = {}
    for name, feature in spec.window_features().items():
        values = batch_window_values(spec, name, events, items, aliases=aliases)
        for entity, groups in values.items():
            actor = item_actor(entity) if feature.entity == "item" else entity
            for group, value in groups.items():
                out.setdefault(actor, {})[(name, group)] = value
    return out


def online_mismatches(
    settings: Settings, spec: Spec, events: Sequence[Event], items: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Differences between the online store's window features and a batch recomputation.

    Groups the online store has but the batch does not must be 0 (they left their
    window). Anonymous actors later linked to a user are skipped: the batch attributes
    their events to the user, while their stale pre-login rows remain under `anon:`.
    """
    expected = expected_features(spec, events, items)
    linked = {f"anon:{a}" for a in identity_links(spec, events)}
    windows = set(spec.window_features())
    store = OnlineStore.from_settings(settings)
    try:
        actors = sorted(set(expected) | _online_actors(store))
        online = store.get_features_many(actors)
    finally:
        store.dispose()
    problems: list[str] = []
    for actor in actors:
        if actor in linked:
            continue
        want = expected.get(actor, {})
        have = {
            (r.feature, r.group_key): r.value for r in online.get(actor, []) if r.feature in windows
        }
        for key in sorted(set(want) | set(have)):
            w, h = want.get(key, 0.0), have.get(key)
            if h is None or not math.isclose(w, h, rel_tol=1e-9, abs_tol=1e-9):
                problems.append(f"{actor} {key}: batch {w} online {h}")
    return problems


def _online_actors(store: OnlineStore) -> set[str]:
    import sqlalchemy as sa

    from storage.online.models import FEATURES

    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(FEATURES.c.user_id).distinct()).scalars())


def start_stream(settings: Settings, *, epoch_ms: int = 200) -> subprocess.Popen[bytes]:
    """`python -m pipelines` on the settings' home, tailing the log, output in logs/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "pipelines", "--home", str(settings.home_dir)]
    argv += ["--spec", str(settings.spec), "--epoch-ms", str(epoch_ms)]
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stream.log", "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)
