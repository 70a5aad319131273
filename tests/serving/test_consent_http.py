"""Consent over real HTTP with the real stream (spec privacy.consent): what reaches the
event log, Delta bronze and the online store with and without consent, in `drop` and
`aggregate` mode, and how decisions change when consent is granted and revoked."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bytewax.testing import run_main
from litestar import Litestar

from definitions.batch.bandit_log import read_rounds
from nextbest.demo.shop import DemoConfig
from nextbest.ingest.consent import NO_CONSENT_PREFIX, ConsentChange
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from pipelines.flow import build_flow
from serving.app import create_app
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.consent import ConsentStore
from storage.online.models import FEATURES
from storage.online.store import OnlineStore
from tests.core.test_consent import consent_spec_text
from tests.serving.test_serving_world import (
    LiveServer,
    start_server,
    stop_server,
    train_and_promote,
)
from tests.support.stream_helpers import append_log, write_catalog


class Stack:
    def __init__(self, settings: Settings, spec: Spec, live: LiveServer, app: Litestar) -> None:
        self.settings, self.spec, self.live, self.app = settings, spec, live, app
        self.http = httpx.Client(base_url=live.url, timeout=10)
        self.ts = int(time.time()) - 600

    def post(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        for e in events:
            self.ts += 1
            e.setdefault("ts", self.ts)
        r = self.http.post("/v1/events", json={"events": events})
        assert r.status_code == 202, r.text
        return r.json()

    def decide(self, user: str) -> dict[str, Any]:
        r = self.http.post("/v1/decide", json={"user_id": user, "k": 5})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def stream(self) -> None:
        """The real flow, to the current end of the log."""
        run_main(build_flow(self.settings, self.spec, tail=False))

    def log(self, *, keys: bool = False) -> list[dict[str, Any]]:
        """The log's records (with `keys`, each with its key under `_key`)."""
        s = self.settings
        with EventLog.open(s.eventlog_dir, partitions=s.partitions, mode="reader") as log:
            return [
                {**json.loads(payload), **({"_key": key} if keys else {})}
                for p in range(s.partitions)
                for _, key, payload in log.read(p, 0, max_records=100_000)
            ]

    def bronze(self) -> list[dict[str, Any]]:
        delta = DeltaStore.from_settings(self.settings)
        return delta.read("events").to_pylist() if delta.exists("events") else []

    def online_actors(self) -> set[str]:
        store = OnlineStore.from_settings(self.settings)
        try:
            with store.engine.connect() as conn:
                return set(
                    conn.execute(FEATURES.select().with_only_columns(FEATURES.c.user_id)).scalars()
                )
        finally:
            store.dispose()


def _stack(tmp: Path, mode: str) -> Iterator[Stack]:
    path = tmp / "consent.yaml"
    path.write_text(consent_spec_text(default="denied", mode=mode))
    settings = Settings(home=tmp / "home", spec=path, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(path)
    cfg = DemoConfig.small()
    write_catalog(settings, spec, cfg, vectors=True)
    store = OnlineStore.from_settings(settings)
    train_and_promote(settings, spec, store, cfg)
    store.dispose()
    app = create_app(settings, require_keys=False, rate_limit_per_s=None, refresh_interval_s=0.1)
    live = start_server(app)
    try:
        yield Stack(settings, spec, live, app)
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def drop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _stack(tmp_path_factory.mktemp("consent_drop"), "drop")


@pytest.fixture(scope="module")
def aggregate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _stack(tmp_path_factory.mktemp("consent_aggregate"), "aggregate")


def view(user: str, item: str, event_id: str) -> dict[str, Any]:
    return {"type": "view", "user_id": user, "item_id": item, "event_id": event_id}


def consent(user: str, granted: bool, event_id: str) -> dict[str, Any]:
    return {
        "type": "consent",
        "user_id": user,
        "event_id": event_id,
        "properties": {"granted": granted},
    }


def test_without_consent_nothing_is_stored_and_decisions_are_not_personal(drop: Stack) -> None:
    items = [f"i{n:05d}" for n in range(1, 9)]
    before = drop.post([view("u-c", items[0], "pre-1"), view("u-c", items[1], "pre-2")])
    assert before["accepted"] == 0 and before["rejected"] == [] and before["event_ids"] == []
    assert [(d["index"], d["reason"], d["event_id"]) for d in before["dropped"]] == [
        (0, "no consent", "pre-1"),
        (1, "no consent", "pre-2"),
    ]
    first = drop.decide("u-c")
    assert first["served_from"] == "fallback" and first["actions"]
    assert all(a["reasons"][0] == "not personalized: no consent" for a in first["actions"])

    # A grant and events in one batch: processed in order, the events are kept.
    after = drop.post(
        [
            consent("u-c", True, "grant-1"),
            *(view("u-c", i, f"post-{n}") for n, i in enumerate(items[2:6])),
        ]
    )
    assert after["accepted"] == 5 and after["dropped"] == []
    drop.stream()

    logged = {r.get("event_id") for r in drop.log()}
    bronze = {r["event_id"]: r for r in drop.bronze()}
    assert {"pre-1", "pre-2"}.isdisjoint(logged | set(bronze))
    assert {"grant-1", "post-0", "post-1", "post-2", "post-3"} <= set(bronze)
    assert json.loads(bronze["post-0"]["context"])["nb_consent"].startswith("granted:")
    assert "u-c" in drop.online_actors()
    personal = drop.decide("u-c")
    assert personal["served_from"] == "realtime", personal
    assert not any("no consent" in r for a in personal["actions"] for r in a["reasons"])

    # Revoking: decisions stop being personal at once, new events are dropped again.
    revoke = drop.post([consent("u-c", False, "revoke-1"), view("u-c", items[6], "late-1")])
    assert revoke["accepted"] == 1 and [d["event_id"] for d in revoke["dropped"]] == ["late-1"]
    again = drop.decide("u-c")
    assert again["served_from"] == "fallback"
    assert all(a["reasons"][0] == "not personalized: no consent" for a in again["actions"])
    runtime = drop.app.state.runtime
    assert runtime.decision_log.flush()
    record = next(
        r
        for r in drop.log()
        if r.get("record") == "decision" and r["decision_id"] == again["decision_id"]
    )
    assert record["features"]["values"] == {} and record["features"]["personalized"]
    assert record["served_from"] == "fallback"
    drop.stream()
    assert "late-1" not in {r["event_id"] for r in drop.bronze()}

    # Erasure removes the consent row with the rest of the user.
    assert drop.http.delete("/v1/users/u-c").status_code == 202
    assert runtime.consent.store.get("u-c") is None


def test_stream_judges_what_producers_wrote_past_the_api(tmp_path: Path) -> None:
    """Records appended straight to the log (as a Kafka producer would) are judged by
    the stream: the consented user's events are kept, the other's are dropped, and a
    consent event seen only by the stream is recorded in the consent table."""
    path = tmp_path / "consent.yaml"
    path.write_text(consent_spec_text(default="denied", mode="drop"))
    settings = Settings(home=tmp_path / "home", spec=path, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(path)
    write_catalog(settings, spec, DemoConfig.small(), vectors=True)
    ts = int(time.time()) - 600
    forged = {"type": "view", "item_id": "i00003", "ts": ts + 3}
    rows = [
        {"type": "consent", "user_id": "u-yes", "ts": ts, "properties": {"granted": True}},
        {"type": "view", "user_id": "u-yes", "item_id": "i00001", "ts": ts + 1, "event_id": "y1"},
        {"type": "view", "user_id": "u-no", "item_id": "i00002", "ts": ts + 2, "event_id": "n1"},
        # Forged: a mark or an anonymized-looking id a producer set itself.
        {**forged, "user_id": "u-no", "event_id": "n2", "context": {"nb_consent": "granted"}},
        {**forged, "anonymous_id": f"{NO_CONSENT_PREFIX}cookie", "event_id": "n3"},
    ]
    assert append_log(settings, rows) == 5
    run_main(build_flow(settings, spec, tail=False))
    ids = {r["event_id"] for r in DeltaStore.from_settings(settings).read("events").to_pylist()}
    assert "y1" in ids and not {"n1", "n2", "n3"} & ids and len(ids) == 2
    online = OnlineStore.from_settings(settings)
    try:
        assert ConsentStore(online.engine).get("u-yes") == ConsentChange("u-yes", True, ts * 1000)
        assert online.get_features("u-no") == [] and online.get_state("u-no") is None
        assert online.get_features("u-yes")
    finally:
        online.dispose()


def test_aggregate_keeps_item_counts_but_no_user_rows(aggregate: Stack) -> None:
    item = "i00011"
    out = aggregate.post(
        [
            *(view("u-agg", item, f"agg-{n}") for n in range(3)),
            {"type": "identify", "user_id": "u-agg", "anonymous_id": "a-agg"},
            {"type": "view", "anonymous_id": "a-agg", "item_id": item, "event_id": "agg-anon"},
        ]
    )
    assert out["accepted"] == 4 and out["aggregated"] == 4
    assert [d["index"] for d in out["dropped"]] == [3]  # identify: nothing to aggregate
    aggregate.stream()

    rows = [r for r in aggregate.bronze() if r["item_id"] == item]
    assert len(rows) == 4
    assert all(
        r["user_id"] is None and r["anonymous_id"].startswith(NO_CONSENT_PREFIX) for r in rows
    )
    assert not {"agg-0", "agg-1", "agg-2", "agg-anon"} & {r["event_id"] for r in rows}
    for record in [*aggregate.log(), *aggregate.bronze()]:
        assert "u-agg" not in json.dumps(record, default=str) and "a-agg" not in json.dumps(
            record, default=str
        )
    actors = aggregate.online_actors()
    assert not any(a in ("u-agg", "anon:a-agg") or NO_CONSENT_PREFIX in a for a in actors)
    store = OnlineStore.from_settings(aggregate.settings)
    try:
        counts = {r.feature: r.value for r in store.get_features(f"item:{item}")}
        assert counts["item_views_1h"] == 4.0
    finally:
        store.dispose()
    out = aggregate.decide("u-agg")
    assert out["served_from"] == "fallback"


def test_no_id_of_a_user_without_consent_is_logged(drop: Stack) -> None:
    """A decision and its feedback for a user who never consented: neither the log
    (payload or key) nor Delta holds the id; the decision still joins its feedback and
    is left out of the bandit rounds (it read nothing of the user)."""
    out = drop.decide("u-never")
    assert out["served_from"] == "fallback"
    fb = {"decision_id": out["decision_id"], "user_id": "u-never", "outcome": "conversion"}
    assert drop.http.post("/v1/feedback", json=fb).status_code == 202
    assert drop.app.state.runtime.decision_log.flush()
    assert not [r for r in drop.log(keys=True) if "u-never" in json.dumps(r)]
    drop.stream()
    delta = DeltaStore.from_settings(drop.settings)
    for table in ("decisions", "feedback"):
        rows = delta.read(table).to_pylist()
        assert not [r for r in rows if "u-never" in json.dumps(r, default=str)]
        mine = [r for r in rows if r["decision_id"] == out["decision_id"]]
        assert len(mine) == 1, table
        assert mine[0]["user_id"] == (
            f"{NO_CONSENT_PREFIX}{out['decision_id']}" if table == "decisions" else None
        )
    rounds = read_rounds(delta)
    assert rounds is not None and out["decision_id"] not in rounds.decision_ids
    assert rounds.skipped["not_personalized"] >= 1


def test_identify_links_a_visitor_before_the_stream_stores_it(drop: Stack) -> None:
    """No stream runs here: the visitor of a consenting user is kept from the next
    request on, and a client cannot pass its events off as anonymized."""
    drop.post([consent("u-l", True, "l-grant")])
    drop.post([{"type": "identify", "user_id": "u-l", "anonymous_id": "a-l"}])
    out = drop.post([{"type": "view", "anonymous_id": "a-l", "item_id": "i00004"}])
    assert out["accepted"] == 1 and out["dropped"] == []
    assert drop.app.state.runtime.consent.store.get("anon:a-l").granted  # u-l's, copied
    r = drop.http.post(
        "/v1/events",
        json={"events": [{"type": "view", "anonymous_id": "~nc:x", "item_id": "i1", "ts": 1}]},
    )
    assert r.status_code == 422 and "reserved" in r.json()["rejected"][0]["reason"]
