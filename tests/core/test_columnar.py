"""The columnar window backfill equals the stream's `WindowState` fold.

`window_values` against `batch_window_values` (the stream's classes, event by event),
and `values_before` against the definition of a point-in-time value (fold the earlier
events, aggregate the label group's entries inside the window), on random histories
with ties, anonymous visitors stitched by identify events, missing groups, floats,
missing values and properties.
"""

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from nextbest.features.columnar import EventColumns, ts_ms_of_us, values_before, window_values
from nextbest.features.semantics import (
    WindowState,
    actor_of,
    aggregate,
    applies,
    batch_window_values,
    field_value,
    group_key,
    identity_links,
    new_window_state,
)
from nextbest.ingest.events import Event
from nextbest.spec.models import Spec, WindowFeature

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ITEMS: dict[str, dict[str, Any]] = {
    "a": {"category": "shoes", "price": 10.0},
    "b": {"category": "books", "price": 5.5},
    "c": {"category": "shoes", "price": 0.1},
    "d": {"category": None, "price": 3},
    "e": {"category": "toys", "price": None},
}  # "z" is an item missing from the catalogue

EXTRA = {
    "last_rating_2d": {"events": ["rate"], "agg": "last", "field": "value", "window": "2d"},
    "quantity_6h": {"events": ["add_to_cart"], "agg": "sum", "field": "quantity", "window": "6h"},
    "mean_price_1d": {"events": ["view"], "agg": "mean", "field": "price", "window": "1d"},
    "views_by_category_3h": {
        "events": ["view"],
        "agg": "count",
        "window": "3h",
        "group_by": "category",
    },
    "price_sum_by_category_1d": {
        "events": ["view", "purchase"],
        "agg": "sum",
        "field": "price",
        "window": "1d",
        "group_by": "category",
    },
    "items_by_category_12h": {
        "events": ["view", "add_to_cart"],
        "agg": "distinct_count",
        "field": "item_id",
        "window": "12h",
        "group_by": "category",
    },
}


@pytest.fixture(scope="module")
def rich_spec(spec: Spec) -> Spec:
    raw = spec.model_dump(mode="json", exclude_none=True)
    raw["features"].update(EXTRA)
    return Spec.model_validate(raw)


def history(seed: int, n: int = 600) -> list[Event]:
    """Random events over four days, minute-resolution (many ties), sorted as bronze."""
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(6)]
    anons = [f"v{i}" for i in range(8)]  # v4..v7 never identify
    events: list[Event] = []
    for i in range(n):
        minute = rng.randrange(4 * 24 * 60)
        ts = T0 + timedelta(minutes=minute, microseconds=rng.choice([0, 1000, 999_999]))
        kind = rng.choices(
            ["view", "add_to_cart", "purchase", "rate", "identify"], [8, 3, 2, 2, 1]
        )[0]
        who: dict[str, Any] = {}
        if kind == "identify":
            who = {"user_id": rng.choice(users), "anonymous_id": rng.choice(anons[:4])}
        elif rng.random() < 0.3:
            who = {"anonymous_id": rng.choice(anons)}
        else:
            who = {"user_id": rng.choice(users)}
        item = None if kind == "identify" else rng.choice([*ITEMS, "z"])
        value = rng.choice([1, 2.5, 4, 5]) if kind == "rate" else None
        props: dict[str, Any] = {}
        if kind == "add_to_cart" and rng.random() < 0.8:
            props["quantity"] = rng.choice([1, 2, 3])
        events.append(
            Event(
                event_id=f"e{i:04d}",
                type=kind,
                item_id=item,
                ts=ts,
                value=value,
                properties=props,
                **who,
            )
        )
    events.sort(key=lambda e: (e.ts, e.event_id))
    return events


def columns(events: list[Event], links: dict[str, str]) -> EventColumns:
    def objects(values: list[Any]) -> np.ndarray:
        return np.asarray(values, dtype=object)

    us = np.array([int(e.ts.timestamp()) * 1_000_000 + e.ts.microsecond for e in events])
    return EventColumns(
        event_id=objects([e.event_id for e in events]),
        type=objects([e.type for e in events]),
        actor=objects([actor_of(e, links) for e in events]),
        item_id=objects([e.item_id for e in events]),
        ts_ms=ts_ms_of_us(us),
        value=objects([e.value for e in events]),
        properties=[json.dumps(e.properties) if e.properties else None for e in events],
    )


def reference_before(
    spec: Spec, name: str, events: list[Event], links: dict[str, str], at: list[int]
) -> list[float | None]:
    """The definition: fold every earlier event, then aggregate the labelled item's
    group inside (ts - window, ts]."""
    feature = spec.features[name]
    assert isinstance(feature, WindowFeature)
    wanted = set(at)
    states: dict[str, WindowState] = {}
    out: list[float | None] = []
    for i, event in enumerate(events):
        user = actor_of(event, links)
        item = ITEMS.get(event.item_id) if event.item_id else None
        if i in wanted:
            group = group_key(feature, item)
            state = states.get(user)
            if group is None:
                out.append(None)
            elif state is None:
                out.append(0.0)
            else:
                since = event.ts_ms - state.window_ms
                values = [v for t, _, g, v in state.entries if t > since and g == group]
                out.append(aggregate(feature.agg, values) if values else 0.0)
        if applies(feature, event) and (group := group_key(feature, item)) is not None:
            state = states.setdefault(user, new_window_state(feature))
            state.add(event.ts_ms, event.event_id, group, field_value(spec, feature, event, item))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_window_values_equal_the_stream_fold(rich_spec: Spec, seed: int) -> None:
    events = history(seed)
    links = identity_links(rich_spec, events)
    cols = columns(events, links)
    assert {a for a in cols.actor.tolist() if a.startswith("anon:")}, "some visitors stay anonymous"
    for name in rich_spec.window_features():
        expected = batch_window_values(rich_spec, name, events, ITEMS, aliases=links)
        assert window_values(rich_spec, name, cols, ITEMS) == expected, name


@pytest.mark.parametrize("seed", range(6))
def test_values_before_are_point_in_time(rich_spec: Spec, seed: int) -> None:
    events = history(seed)
    links = identity_links(rich_spec, events)
    cols = columns(events, links)
    at = [i for i, e in enumerate(events) if e.item_id and i % 3 == 0]
    for name, feature in rich_spec.window_features().items():
        if feature.entity != "user":
            continue
        got = values_before(rich_spec, name, cols, ITEMS, np.array(at))
        expected = reference_before(rich_spec, name, events, links, at)
        assert got == [v if v is None else pytest.approx(v, rel=1e-12) for v in expected], name
        assert any(v for v in got), f"{name}: the history exercises the feature"


def test_the_millisecond_is_the_events() -> None:
    """Columns put every event on the millisecond `Event.ts_ms` does (it truncates a
    float), including sub-millisecond instants where float rounding bites."""
    stamps = [T0 + timedelta(microseconds=us) for us in (0, 1000, 1001, 999, 999_999, 123_456)]
    us = np.array([int(t.timestamp()) * 1_000_000 + t.microsecond for t in stamps])
    events = [Event(event_id=str(i), type="view", user_id="u", ts=t) for i, t in enumerate(stamps)]
    assert ts_ms_of_us(us).tolist() == [e.ts_ms for e in events]
