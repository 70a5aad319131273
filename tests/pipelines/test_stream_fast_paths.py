"""The stream's fast paths give exactly what the general paths give: parsing JSON straight
into an `Event`, rows from the groups that changed only, compact profile snapshots."""

import json
import pickle
import random
from datetime import UTC, datetime
from typing import Any

from nextbest.features.semantics import RecentItems, WindowState
from nextbest.ingest.events import Event
from nextbest.spec.models import Spec
from pipelines import records
from pipelines.profile import FeaturePlan, ItemProfile, UserProfile
from pipelines.records import parse_record


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


ITEMS = {f"i{n}": {"category": f"c{n % 4}", "price": float(n)} for n in range(12)}


def _general(item: tuple[int, int, str, bytes], spec: Spec, key: bytes) -> records.Record:
    fast = records._event_fast
    records._event_fast = lambda payload, spec, key: None  # type: ignore[assignment]
    try:
        return parse_record(item, spec, pii_key=key)
    finally:
        records._event_fast = fast


def test_parse_fast_path_equals_the_general_path(spec: Spec) -> None:
    ts = "2025-03-01T12:00:00+00:00"
    view = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "ts": ts}
    payloads: list[Any] = [
        view,
        {**view, "ts": 1740830400, "context": {"session_id": "s", "extra": [1]}},
        {**view, "properties": {"referrer": "record"}},
        {**view, "properties": {"referrer": 3}},  # wrong property type
        {**view, "record": "event"},  # not a field
        {**view, "type": "teleport"},
        {**view, "value": "NaN"},
        {"event_id": "e2", "type": "rate", "user_id": "u1", "item_id": "i1", "ts": ts, "value": 4},
        {"event_id": "e3", "type": "identify", "user_id": "u1", "ts": ts},  # needs anonymous_id
        {
            "event_id": "e4",
            "type": "identify",
            "user_id": "u1",
            "anonymous_id": "a1",
            "ts": ts,
            "properties": {"email": "x@y.z"},
        },
        {"record": "feedback", "decision_id": "d", "outcome": "click", "ts": ts},
        [view],
    ]
    raws = [json.dumps(p).encode() for p in payloads]
    raws += [
        b'{"event_id": "e5", "type": "view", "ts": 1',
        b"\xff",
        "\ud800".encode("utf-8", "surrogatepass"),
    ]
    kinds = []
    for offset, raw in enumerate(raws):
        item = (0, offset, "k", raw)
        got, want = parse_record(item, spec, pii_key=b"k"), _general(item, spec, b"k")
        assert got == want, raw
        if isinstance(got.body, Event):
            assert got.body.model_fields_set == want.body.model_fields_set
        kinds.append(got.kind)
    assert kinds.count("event") == 5 and kinds.count("feedback") == 1


def _reference_groups(
    values: dict[str, float], before: dict[str, float], offered: set[str], full: bool
) -> set[str]:
    """The rule of `_window_rows` as it was first written (every group, every time)."""
    groups = set(values) | set(before) | offered
    if full:
        return groups
    return {g for g in groups if g in offered or before.get(g) != values.get(g, 0.0)}


def test_rows_from_changed_groups_equal_the_full_rule(spec: Spec) -> None:
    plan = FeaturePlan.from_spec(spec)
    rng = random.Random(5)
    profile, shadow = UserProfile(), {}  # shadow: feature -> values as last written
    for batch_no in range(300):
        offered: dict[str, set[str]] = {}
        for _ in range(rng.randint(1, 4)):
            n = rng.randrange(200)
            item = f"i{rng.randrange(12)}"
            kind = rng.choice(["view", "view", "add_to_cart", "purchase", "rate"])
            event = Event(
                event_id=f"e{n}",  # repeats: duplicates are offered, not added
                type=kind,
                user_id="u1",
                item_id=item,
                ts=_ts(1_740_000_000 + n * rng.choice([1, 60, 600])),
                value=3.0 if kind == "rate" else None,
            )
            profile.fold(plan, event, ITEMS[item], offered)
        if batch_no == 150:  # a restore: the next rows rewrite every known group
            profile = pickle.loads(pickle.dumps(profile))
            profile.restored()
        full = set(profile.rewrite)
        rows = profile.feature_rows(plan, "u1", offered, (0, batch_no))
        got: dict[str, set[str]] = {}
        for row in rows:
            if row.feature in plan.user_windows:
                got.setdefault(row.feature, set()).add(row.group_key)
                assert row.value == profile.windows[row.feature].values().get(row.group_key, 0.0)
        for name in offered:
            values = profile.windows[name].values()
            want = _reference_groups(values, shadow.get(name, {}), offered[name], name in full)
            assert got.get(name, set()) == want, (batch_no, name)
            shadow[name] = values
            assert profile.written[name] == values


def test_compact_snapshots_restore_the_same_profile(spec: Spec) -> None:
    plan = FeaturePlan.from_spec(spec)
    profile, item = UserProfile(), ItemProfile()
    for n in range(30):
        event = Event(
            event_id=f"e{n}",
            type="view",
            user_id="u1",
            item_id=f"i{n % 5}",
            ts=_ts(1_740_000_000 + n),
        )
        profile.fold(plan, event, ITEMS[event.item_id or ""], {})
    item.fold(plan, "i1", [(0, n, e) for n, e in enumerate([event])], lambda _i: ITEMS["i1"])
    profile.feature_rows(plan, "u1", {name: set() for name in profile.windows}, (0, 1))

    def same(a: UserProfile, b: UserProfile) -> None:
        assert {n: w.values() for n, w in a.windows.items()} == {
            n: w.values() for n, w in b.windows.items()
        }
        assert {n: w.entries for n, w in a.windows.items()} == {
            n: w.entries for n, w in b.windows.items()
        }
        assert (a.written, a.recent, a.seen, a.interactions, a.latest, a.session_id) == (
            b.written,
            b.recent,
            b.seen,
            b.interactions,
            b.latest,
            b.session_id,
        )
        assert a.interaction_ids == b.interaction_ids and a.online == b.online

    same(pickle.loads(pickle.dumps(profile)), profile)
    # A snapshot written before the compact form (the dataclass's own dict) still loads.
    old = {k: v for k, v in profile.__dict__.items() if k != "interaction_ids"}
    legacy = UserProfile.__new__(UserProfile)
    legacy.__setstate__(pickle.loads(pickle.dumps(old)))
    same(legacy, profile)
    back = pickle.loads(pickle.dumps(item))
    assert {n: w.values() for n, w in back.windows.items()} == {
        n: w.values() for n, w in item.windows.items()
    }
    legacy_item = ItemProfile.__new__(ItemProfile)
    legacy_item.__setstate__(pickle.loads(pickle.dumps(dict(item.__dict__))))
    assert legacy_item.windows["item_views_1h"].values() == {"": 1.0}
    assert isinstance(profile.recent["recent_items"], RecentItems)
    assert isinstance(back.windows["item_views_1h"], WindowState)


def _general_decision(item: tuple[int, int, str, bytes], spec: Spec) -> records.Record:
    fast = records._decision_fast
    records._decision_fast = lambda payload: None  # type: ignore[assignment]
    try:
        return parse_record(item, spec)
    finally:
        records._decision_fast = fast


def _columns(record: records.Record) -> list[dict[str, Any]]:
    """The Delta row of a decision record, JSON columns decoded."""
    from storage.delta.schemas import decisions_to_table

    row = decisions_to_table([record.body]).to_pylist()[0]
    for name in ("actions", "candidates", "features"):
        text = row[name]
        if text is not None and text[:1] in ("{", "["):
            row[name] = json.loads(text)
    return [row]


def test_decision_fast_path_gives_the_general_paths_rows(spec: Spec) -> None:
    """Decision records keep their JSON columns as the text they arrive in: the stored
    row reads back as the general path's would, and anything the general path treats
    differently (an empty id, a string where an object goes, NaN) still goes there."""
    import msgspec

    base = {
        "record": "decision",
        "decision_id": "d1",
        "user_id": "u1",
        "ts": "2025-03-01T12:00:00+00:00",
        "served_from": "realtime",
        "model_version": "m1",
        "actions": [{"action_id": "a", "item_id": "i1", "score": 0.5, "propensity": 1.0}],
        "candidates": [{"action_id": "a", "item_id": "i1", "score": 0.5, "propensity": 1.0}],
        "features": {"values": {"b": 1.0, "a": None}, "pool": {"item_id": ["i1"]}},
    }
    variants: list[dict[str, Any]] = [
        base,
        {**base, "ts": 1740830400.5, "model_version": None},
        {k: v for k, v in base.items() if k not in ("candidates", "model_version")},
        {**base, "features": None, "actions": []},
        {**base, "actions": "already text"},
        {**base, "features": 3},
        {**base, "user_id": ""},
        {**base, "model_version": ""},
        {**base, "ts": True},
        {**base, "ts": "yesterday"},
        {k: v for k, v in base.items() if k != "served_from"},
    ]
    fast_taken = 0
    for offset, payload in enumerate(variants):
        raw = msgspec.json.encode(payload)  # as the API's decision log encodes
        item = (0, offset, "u1", raw)
        got, want = parse_record(item, spec), _general_decision(item, spec)
        fast_taken += records._decision_fast(raw) is not None
        assert got.kind == want.kind, payload
        if got.kind == "decision":
            assert _columns(got) == _columns(want), payload
        else:
            assert got == want, payload
    loose = json.dumps(base).encode()  # another producer's spacing: the general path
    assert records._decision_fast(loose) is None
    assert parse_record((0, 99, "u1", loose), spec).kind == "decision"
    assert fast_taken == 4
