"""The flow's steps with `TestingSource`/`TestingSink` (real Bytewax, no stores), and the
sources and sinks against real files."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from nextbest.features.semantics import session_vector
from nextbest.ingest.events import Event
from nextbest.learn.online_model import Feedback
from nextbest.settings import Settings
from nextbest.spec.models import SessionVectorFeature, Spec
from pipelines.catalog import StaticCatalog
from pipelines.flow import FEEDBACK_BUFFER, STITCH_BUFFER, StitchState, build_flow, stitch
from pipelines.records import Record, Routed, Update
from pipelines.sinks import LakeBatch, LakeSink, StreamSinks
from pipelines.sources import EventLogSource
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)
ITEMS = {
    "i1": {"category": "shoes", "price": 50.0},
    "i2": {"category": "hats", "price": 20.0},
    "i3": {"category": "shoes", "price": 80.0},
}


def ev(event_id: str, kind: str, minutes: float, **fields: Any) -> dict[str, Any]:
    ts = (T0 + timedelta(minutes=minutes)).isoformat()
    return {"event_id": event_id, "type": kind, "ts": ts, **fields}


def run(
    settings: Settings, spec: Spec, payloads: list[Any]
) -> tuple[list[Record], list[Update], list[Any]]:
    """Run the flow over payloads (dicts are JSON-encoded) on partition 0."""
    items = []
    for offset, payload in enumerate(payloads):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        items.append((0, offset, "k", raw))
    lake: list[Any] = []
    online: list[Update] = []
    vectors: list[Any] = []
    sinks = StreamSinks(TestingSink(lake), TestingSink(online), TestingSink(vectors))
    catalog = StaticCatalog(ITEMS, {"i1": np.ones(spec.model.dim), "i2": -np.ones(spec.model.dim)})
    run_main(
        build_flow(
            settings, spec, source=TestingSource(items, batch_size=3), sinks=sinks, catalog=catalog
        )
    )
    return [r for _, r in lake], online, vectors


def final_values(updates: list[Update]) -> dict[tuple[str, str, str], float | None]:
    out: dict[tuple[str, str, str], float | None] = {}
    for update in updates:
        for row in update.features:
            out[(row.user_id, row.feature, row.group_key)] = row.value
    return out


def test_parse_routes_records_and_dead_letters_never_crash(settings: Settings, spec: Spec) -> None:
    decision = {
        "record": "decision",
        "decision_id": "d1",
        "user_id": "u1",
        "ts": T0.isoformat(),
        "served_from": "cached",
        "actions": [{"item_id": "i1"}],
    }
    feedback = {
        "record": "feedback",
        "decision_id": "d1",
        "user_id": "u1",
        "outcome": "click",
        "item_id": "i1",
        "ts": 1740830400,
    }
    payloads: list[Any] = [
        ev("e1", "view", 0, user_id="u1", item_id="i1"),
        b"\x00\xff not json",
        [1, 2, 3],
        ev("e2", "teleport", 1, user_id="u1"),  # undeclared type
        ev("e3", "view", 2, user_id="u1"),  # view needs item_id
        ev("e4", "rate", 3, user_id="u1", item_id="i1"),  # rate needs a value
        decision,
        feedback,
        {**feedback, "outcome": "maybe"},
        {"record": "decision", "decision_id": "d2"},  # missing fields
        ev("e5", "identify", 4, user_id="u1", anonymous_id="a1", properties={"email": "x@y.z"}),
    ]
    lake, online, _ = run(settings, spec, payloads)
    kinds = [(r.offset, r.kind) for r in sorted(lake, key=lambda r: r.offset)]
    assert kinds == [
        (0, "event"), (1, "dead"), (2, "dead"), (3, "dead"), (4, "dead"), (5, "dead"),
        (6, "decision"), (7, "feedback"), (8, "dead"), (9, "dead"), (10, "event"),
    ]  # fmt: skip
    dead = {r.offset: r.body.error for r in lake if r.kind == "dead"}
    assert "teleport" in dead[3] and "item_id" in dead[4] and "value" in dead[5]
    assert all(r.body.source_partition == 0 and r.body.raw for r in lake if r.kind == "dead")
    fb = next(r.body for r in lake if r.kind == "feedback")
    assert fb["ts"] == datetime(2025, 3, 1, 12, tzinfo=UTC) and fb["outcome"] == "click"
    # PII declared in the spec is hashed before any store sees it, and only once.
    identify = next(r.body for r in lake if r.offset == 10)
    assert identify.properties["email"].startswith("h:")
    assert final_values(online)[("u1", "views_1h", "")] == 1.0


def test_identity_stitching_merges_history_in_any_order(settings: Settings, spec: Spec) -> None:
    before = [
        ev("a1", "view", 0, anonymous_id="anon", item_id="i1"),
        ev("a2", "view", 1, anonymous_id="anon", item_id="i2"),
        ev("a3", "add_to_cart", 2, anonymous_id="anon", item_id="i1"),
    ]
    link = ev("l1", "identify", 3, anonymous_id="anon", user_id="u9", properties={})
    after = [
        ev("a4", "view", 4, anonymous_id="anon", item_id="i3"),
        ev("u1", "view", 5, user_id="u9", item_id="i3"),
    ]
    expected = {
        ("u9", "views_1h", ""): 4.0,
        ("u9", "cart_adds_1h", ""): 1.0,
        ("u9", "category_affinity_1h", "shoes"): 6.0,  # 1 + 3 + 1 + 1 (view, cart, view, view)
        ("u9", "category_affinity_1h", "hats"): 1.0,
        ("u9", "distinct_items_1d", ""): 3.0,
    }
    for order in ([*before, link, *after], [link, *after, *before], [*after, *before, link]):
        _, online, vectors = run(settings, spec, order)
        values = final_values(online)
        assert {k: values.get(k) for k in expected} == expected, order
        assert [a for u in online for a in u.aliases] and all(
            a.anonymous_id == "anon" and a.user_id == "u9" for u in online for a in u.aliases
        )
        state = [u.state for u in online if u.state and u.state.user_id == "u9"][-1]
        assert state.recent_items == ["i3", "i1", "i2"]
        assert [h[0] for h in state.session.history] == ["i3", "i3", "i1", "i2", "i1"]
        assert state.session.seen["add_to_cart"] == ["i1"]
        assert vectors and vectors[-1][1]["user_id"] in {"u9", "anon:anon"}


def test_window_features_zero_groups_that_leave_and_ignore_duplicates(
    settings: Settings, spec: Spec
) -> None:
    payloads = [
        ev("e1", "view", 0, user_id="u1", item_id="i2"),
        ev("e1", "view", 0, user_id="u1", item_id="i2"),  # the same event again
        ev("e2", "purchase", 10, user_id="u1", item_id="i1", properties={"quantity": 1}),
        ev("e3", "view", 150, user_id="u1", item_id="i1"),  # 2.5 h later: hats leave the 1h window
    ]
    _, online, _ = run(settings, spec, payloads)
    values = final_values(online)
    assert values[("u1", "views_1h", "")] == 1.0
    assert values[("u1", "category_affinity_1h", "hats")] == 0.0
    assert values[("u1", "category_affinity_1h", "shoes")] == 1.0
    assert values[("u1", "category_affinity_7d", "hats")] == 1.0
    assert values[("u1", "category_affinity_7d", "shoes")] == 6.0  # purchase 5 + view 1
    assert values[("u1", "spend_30d", "")] == 50.0
    assert values[("item:i1", "item_views_1h", "")] == 1.0  # the purchase left the hour
    rows = [r for u in online for r in u.features if r.user_id == "u1"]
    assert all(r.event_ts_ms > 0 and r.source_partition == 0 for r in rows)


def test_session_vector_is_a_decayed_mean_of_item_vectors() -> None:
    feature = SessionVectorFeature.model_validate(
        {"kind": "session_vector", "events": ["view"], "half_life": "1h", "max_items": 2}
    )
    hour = 3_600_000
    interactions = [
        (0, "e0", "old", "view"),
        (hour, "e1", "a", "view"),
        (2 * hour, "e2", "b", "view"),
    ]
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "old": np.array([9.0, 9.0])}
    got = session_vector(interactions, feature, vectors)
    assert got is not None
    # b has weight 1, a (one half-life older) 0.5; "old" is beyond max_items.
    assert np.allclose(got, [0.5 / 1.5, 1 / 1.5])
    assert session_vector(interactions, feature, {}) is None


def test_log_source_backs_off_when_idle_and_stops_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with EventLog.open(path, partitions=2, mode="writer") as log:
        log.append([("u1", b"a"), ("u1", b"b")])
        p = log.append([("u1", b"c")])[0][0]
    bounded = EventLogSource(path, partitions=2, tail=False).build_part("in", f"p{p}", None)
    first = bounded.next_batch()
    assert [item[3] for item in first] == [b"a", b"b", b"c"]
    assert bounded.snapshot() == 3
    with pytest.raises(StopIteration):
        bounded.next_batch()
    tail = EventLogSource(path, partitions=2).build_part("in", f"p{p}", 3)  # resume at 3
    assert tail.next_batch() == []
    awake = tail.next_awake()
    assert awake is not None and awake > datetime.now(UTC)
    with EventLog.open(path, partitions=2, mode="writer") as log:
        log.append([("u1", b"d")])
    assert [item[1:] for item in tail.next_batch()] == [(3, "u1", b"d")]
    assert tail.next_awake() is None


def test_lake_sink_is_idempotent_when_a_replay_regroups_offsets(
    settings: Settings, spec: Spec
) -> None:
    from nextbest.ingest.events import Event

    def record(offset: int) -> Record:
        event = Event.model_validate(ev(f"e{offset}", "view", offset, user_id="u1", item_id="i1"))
        return Record("event", 3, offset, event)

    sink = LakeSink(settings, parts=1)
    part = sink.build_part("lake", "lake000", None)
    part.write_batch([record(o) for o in range(0, 10)])
    pending = part.snapshot()  # the epoch's recovery state: the sealed, unwritten batch
    batches = [b for b in pending if isinstance(b, LakeBatch)]
    assert [tuple(r.offset for r in b.records) for b in batches] in ([tuple(range(10))], [])
    part.close()  # ... which then commits; the crash comes before the next epoch
    # The resumed partition re-submits the pending batch and the source replays from
    # the snapshot, batched differently: nothing may be written twice.
    part = sink.build_part("lake", "lake000", pending)
    part.write_batch([record(o) for o in range(5, 12)])
    part.write_batch([record(o) for o in range(12, 15)])
    part.close()
    delta = DeltaStore.from_settings(settings)
    table = delta.read("events")
    assert sorted(table.column("source_offset").to_pylist()) == list(range(15))
    assert delta.transaction_version("events", "bronze-p3") == 14


def test_lake_sink_drops_a_client_retry_of_an_acknowledged_event(
    settings: Settings, spec: Spec
) -> None:
    """The API made a batch durable, died before its 202, and the client sent it again:
    same event ids at new offsets. Bronze keeps each id once, also across a restart."""
    from nextbest.ingest.events import Event

    def record(offset: int, event_id: str) -> Record:
        event = Event.model_validate(ev(event_id, "view", offset, user_id="u1", item_id="i1"))
        return Record("event", 2, offset, event)

    sink = LakeSink(settings, parts=1)
    part = sink.build_part("lake", "lake000", None)
    part.write_batch([record(o, f"e{o}") for o in range(5)])
    part.write_batch([record(5 + o, f"e{o}") for o in range(3)])  # retry at offsets 5-7
    part.close()
    part = sink.build_part("lake", "lake000", None)  # a restart: memory rebuilt from Delta
    part.write_batch([record(8 + o, f"e{o}") for o in range(2)] + [record(10, "e-new")])
    part.close()
    ids = DeltaStore.from_settings(settings).read("events").column("event_id").to_pylist()
    assert sorted(ids) == sorted([f"e{o}" for o in range(5)] + ["e-new"])


def test_anonymous_feedback_never_pushes_events_out_of_the_stitch_buffer() -> None:
    """Impressions of a visitor are buffered apart from its events: after many of them,
    identify still re-sends every event (the stitched profile equals a batch recompute)."""

    def ev(n: int, **kw: object) -> Event:
        body = {"event_id": f"e{n}", "type": "view", "anonymous_id": "a1", "item_id": "i1"}
        return Event.model_validate({**body, "ts": 1_700_000_000 + n, **kw})

    state = StitchState()
    events = [(0, n, ev(n)) for n in range(5)]
    impressions = [
        (0, 100 + n, Feedback(f"d{n}", "anon:a1", "impression", "offer", None, n))
        for n in range(STITCH_BUFFER + FEEDBACK_BUFFER)
    ]
    stitch(state, [*events, *impressions], frozenset({"identify"}))
    out = stitch(
        state, [(0, 9999, ev(9999, type="identify", user_id="u1"))], frozenset({"identify"})
    )
    routed = [r for r in out if isinstance(r, Routed)]
    assert len(routed) == len(out)  # no dead letters
    resent = [r.event for r in routed if not r.link]
    assert {e.event_id for e in resent if isinstance(e, Event)} == {f"e{n}" for n in range(5)}
    assert sum(isinstance(e, Feedback) for e in resent) == FEEDBACK_BUFFER
    assert all(r.actor == "u1" for r in routed)
