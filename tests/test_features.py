"""Feature semantics: the pure functions both engines share."""

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from nextbest.events import Event
from nextbest.features import (
    RecentItems,
    SessionVector,
    WindowState,
    aggregate,
    batch_window_values,
    identity_links,
)
from nextbest.spec_loader import load_spec
from tests.conftest import ROOT

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ITEMS = {"a": {"category": "shoes", "price": 10.0}, "b": {"category": "books", "price": 5.5}}


def ev(i: int, minutes: float, type_: str = "view", item: str = "a", **kw: object) -> Event:
    fields: dict = {"user_id": "u1", **kw}
    return Event(
        event_id=f"e{i}", type=type_, item_id=item, ts=T0 + timedelta(minutes=minutes), **fields
    )


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "nextbest.yaml")


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


def test_session_vector_matches_batch_formula() -> None:
    rng = np.random.default_rng(0)
    half_life = 60_000
    points = [(int(t), rng.normal(size=4)) for t in sorted(rng.integers(0, 300_000, 20))]
    sv = SessionVector(half_life_ms=half_life, dim=4)
    order = list(range(len(points)))
    random.Random(1).shuffle(order)
    for i in order:
        sv.add(*points[i])
    anchor = max(t for t, _ in points)
    weights = np.array([0.5 ** ((anchor - t) / half_life) for t, _ in points])
    expected = (weights[:, None] * np.array([v for _, v in points])).sum(0) / weights.sum()
    got = sv.vector()
    assert got is not None
    np.testing.assert_allclose(got, expected, rtol=1e-5)
