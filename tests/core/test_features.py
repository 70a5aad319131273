"""Feature semantics: the pure functions both engines share."""

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from nextbest.features.semantics import (
    RecentItems,
    WindowState,
    aggregate,
    batch_window_values,
    event_key,
    identity_links,
    session_vector,
)
from nextbest.ingest.events import Event
from nextbest.spec.models import SessionVectorFeature

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ITEMS = {"a": {"category": "shoes", "price": 10.0}, "b": {"category": "books", "price": 5.5}}


def ev(i: int, minutes: float, type_: str = "view", item: str = "a", **kw: object) -> Event:
    fields: dict = {"user_id": "u1", **kw}
    return Event(
        event_id=f"e{i}", type=type_, item_id=item, ts=T0 + timedelta(minutes=minutes), **fields
    )


def test_window_is_anchored_at_latest_event() -> None:
    state = WindowState(window_ms=3_600_000, agg="count")
    for i, minutes in enumerate([0, 10, 50, 65]):
        state.add(int(minutes * 60_000), f"e{i}", "", 1)
    # the window is (65m - 60m, 65m]: 10, 50 and 65 remain
    assert state.values() == {"": 3.0}
    assert not state.add(0, "late", "", 1), "older than the window: ignored"


def test_duplicates_count_once() -> None:
    state = WindowState(window_ms=10_000, agg="sum")
    assert state.add(1000, "x", "", 2.0)
    assert not state.add(1000, "x", "", 2.0)
    assert state.values() == {"": 2.0}


@pytest.mark.parametrize(
    ("agg", "values", "expected"),
    [
        ("count", [1, 1, 1], 3.0),
        ("sum", [1.5, 2.5, None], 4.0),
        ("mean", [1.0, 2.0, 6.0], 3.0),
        ("last", [4.0, 7.0], 7.0),
        ("distinct_count", ["a", "b", "a", None], 2.0),
        ("mean", [], 0.0),
    ],
)
def test_aggregations(agg: str, values: list, expected: float) -> None:
    assert aggregate(agg, values) == expected


def test_order_does_not_matter(spec) -> None:
    """Stream arrival order is not event order; the result must not depend on it."""
    events = [ev(i, i * 7 % 200, item="ab"[i % 2]) for i in range(60)]
    expected = batch_window_values(spec, "category_affinity_1h", events, ITEMS)
    rng = random.Random(3)
    for _ in range(5):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert batch_window_values(spec, "category_affinity_1h", shuffled, ITEMS) == expected
    assert set(expected["u1"]) == {"shoes", "books"}


def test_group_by_and_weights(spec) -> None:
    events = [ev(1, 0), ev(2, 1, "add_to_cart"), ev(3, 2, item="b"), ev(4, 3, "purchase", "b")]
    values = batch_window_values(spec, "category_affinity_1h", events, ITEMS)
    # weights from the spec: view 1, add_to_cart 3, purchase 5
    assert values == {"u1": {"shoes": 4.0, "books": 6.0}}
    spend = batch_window_values(spec, "spend_30d", events, ITEMS)
    assert spend == {"u1": {"": 5.5}}


def test_identity_stitching_merges_anonymous_history(spec) -> None:
    anon = [
        Event(event_id="a1", type="view", anonymous_id="x", item_id="a", ts=T0),
        Event(
            event_id="a2",
            type="identify",
            anonymous_id="x",
            user_id="u9",
            ts=T0 + timedelta(minutes=1),
        ),
        Event(
            event_id="a3",
            type="view",
            user_id="u9",
            item_id="b",
            ts=T0 + timedelta(minutes=2),
        ),
    ]
    links = identity_links(spec, anon)
    assert links == {"x": "u9"}
    values = batch_window_values(spec, "views_1h", anon, ITEMS, aliases=links)
    assert values == {"u9": {"": 2.0}}


def test_merge_equals_union() -> None:
    a, b, both = (WindowState(window_ms=100_000, agg="count") for _ in range(3))
    for i in range(10):
        (a if i % 2 else b).add(i * 1000, f"e{i}", "", 1)
        both.add(i * 1000, f"e{i}", "", 1)
    a.merge(b)
    assert a.values() == both.values()
    assert WindowState.from_dict(a.to_dict()).values() == a.values()


def test_recent_items_distinct_newest_first() -> None:
    recent = RecentItems(n=3)
    for ts, item in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "d")]:
        recent.add(ts, item)
    assert recent.ids() == ["d", "c", "a"]


def test_session_vector_matches_the_decay_formula() -> None:
    rng = np.random.default_rng(0)
    feature = SessionVectorFeature.model_validate(
        {"kind": "session_vector", "events": ["view"], "half_life": "1m", "max_items": 50}
    )
    half_life = 60_000
    times = sorted(int(t) for t in rng.integers(0, 300_000, 20))
    vectors = {f"i{n}": rng.normal(size=4) for n in range(20)}
    interactions = [(t, f"e{n}", f"i{n}", "view") for n, t in enumerate(times)]
    anchor = max(times)
    weights = np.array([0.5 ** ((anchor - t) / half_life) for t in times])
    stacked = np.array([vectors[f"i{n}"] for n in range(20)])
    expected = (weights[:, None] * stacked).sum(0) / weights.sum()
    got = session_vector(interactions, feature, vectors)
    assert got is not None
    np.testing.assert_allclose(got, expected, rtol=1e-5)


AGGS = ["count", "sum", "mean", "last", "distinct_count"]


def _random_value(rng: random.Random) -> object:
    kind = rng.random()
    if kind < 0.1:
        return None
    if kind < 0.15:
        return rng.choice([True, "x", "y"])
    if kind < 0.45:
        return rng.randint(-3, 5)
    # Magnitudes far apart make a naive running sum drift from math.fsum.
    return rng.choice([1e16, 1.0, 0.1, 1e-8, 3.3]) * rng.choice([1, -1]) * rng.random()


@pytest.mark.parametrize("agg", AGGS)
def test_incremental_values_equal_a_rescan_bit_for_bit(agg: str) -> None:
    """The running aggregates equal `aggregate` over the entries after every step of a
    random stream with duplicates, late events and evictions, including a pickle
    round trip (the snapshot path) and a state rebuilt from its dict."""
    import pickle

    rng = random.Random(f"incremental-{agg}")
    for _ in range(20):
        state = WindowState(window_ms=rng.choice([50, 200, 1000]), agg=agg)
        ids = [f"e{i}" for i in range(rng.randint(1, 120))]
        for step in range(300):
            event_id = rng.choice(ids)
            ts = rng.randint(0, 3000) if rng.random() < 0.3 else step * 10 - rng.randint(0, 300)
            state.add(ts, event_id, rng.choice(["", "g1", "g2", "g3"]), _random_value(rng))
            assert state.values() == state.rescan()
            if step % 97 == 0:
                state = pickle.loads(pickle.dumps(state))
                assert state.values() == state.rescan()
        again = WindowState.from_dict(state.to_dict())
        assert again.values() == state.values() == state.rescan()
        assert again.seen == state.seen == {e[1] for e in state.entries}


def test_incremental_sum_is_exact_after_evicting_large_values() -> None:
    state = WindowState(window_ms=10, agg="sum")
    state.add(0, "big", "", 1e17)
    state.add(1, "small", "", 1.0)
    state.add(2, "neg", "", -1e17)
    state.add(15, "late", "", 0.5)  # evicts the first three
    assert state.values() == {"": 0.5}
    state.add(16, "x", "", 0.1)
    assert state.values() == {"": aggregate("sum", [0.5, 0.1])}


def test_unhashable_distinct_values_fall_back_to_the_definition() -> None:
    state = WindowState(window_ms=1000, agg="distinct_count")
    state.add(0, "a", "", 1)
    state.add(1, "b", "", ["not", "hashable"])
    with pytest.raises(TypeError):
        state.values()  # what `aggregate` itself does with such values


def test_snapshots_from_before_incremental_aggregates_restore() -> None:
    """A pickled state from an older version (plain __dict__) rebuilds its aggregates."""
    state = WindowState(window_ms=1000, agg="mean")
    old = {"window_ms": 1000, "agg": "mean", "entries": [(1, "a", "", 2), (2, "b", "", 4.0)]}
    state.__setstate__({**old, "seen": {"a", "b"}})
    assert state.values() == {"": 3.0}
    # Their raw event ids are keyed as now (`event_key`), so they still dedupe.
    assert state.seen == {event_key("a"), event_key("b")}
    assert not state.add(2, "b", "", 100.0) and state.values() == {"": 3.0}


def test_recent_items_equal_the_sorting_definition() -> None:
    """`RecentItems.add` inserts in place; it must equal re-sorting the whole list."""

    def reference(items: list, n: int, ts: int, item: str) -> list:
        kept = [(t, i) for t, i in items if i != item]
        previous = next((t for t, i in items if i == item), None)
        kept.append((max(ts, previous) if previous is not None else ts, item))
        kept.sort(key=lambda e: (-e[0], e[1]))
        return kept[:n]

    rng = random.Random(11)
    for n in (1, 3, 20):
        recent, expected = RecentItems(n), []
        for _ in range(500):
            ts, item = rng.randint(0, 60), f"i{rng.randint(0, 30)}"
            recent.add(ts, item)
            expected = reference(expected, n, ts, item)
            assert recent.items == expected
