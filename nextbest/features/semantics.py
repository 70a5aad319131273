"""Feature semantics shared by the stream (Bytewax) and the batch backfill (Dagster).

One definition, two engines: the stream folds events into these states one by one,
the backfill folds the same events read from Delta through the same classes, so online
values equal a batch recomputation at the same offset.

Windows are anchored in event time at the entity's latest event (not the wall
clock): the value of `views_1h` is the count of views in the hour before the user's
most recent event. That makes the result depend only on the set of events, never on
processing time or arrival order, which is what lets replay and recovery be exact.
"""

import bisect
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextbest.features.windows import NO_GROUP, WindowState, aggregate, event_key
from nextbest.ingest.events import Event
from nextbest.spec.models import (
    LastNFeature,
    SessionVectorFeature,
    Spec,
    WindowFeature,
    parse_duration,
)

__all__ = ["NO_GROUP", "WindowState", "aggregate", "event_key"]


def field_value(
    spec: Spec, feature: WindowFeature, event: Event, item: Mapping[str, Any] | None
) -> Any:
    """What a window feature reads from one event (None when the event lacks it)."""
    name = feature.field
    if name is None:
        return 1
    if name == "value":
        return event.value
    if name == "weight":
        return spec.events[event.type].weight
    if name == "item_id":
        return event.item_id
    if name in spec.entities.item.attributes:
        return None if item is None else item.get(name)
    return event.properties.get(name)


def group_key(feature: WindowFeature, item: Mapping[str, Any] | None) -> str | None:
    """The group an event counts towards; None means the event cannot be grouped."""
    if feature.group_by is None:
        return NO_GROUP
    if item is None or item.get(feature.group_by) is None:
        return None
    return str(item[feature.group_by])


def applies(feature: WindowFeature | LastNFeature | SessionVectorFeature, event: Event) -> bool:
    return event.type in feature.events


def _recent_key(entry: tuple[int, str]) -> tuple[int, str]:
    return (-entry[0], entry[1])


@dataclass
class RecentItems:
    """The last N distinct items, most recent first, ordered by event time."""

    n: int
    items: list[tuple[int, str]] = field(default_factory=list)  # (ts_ms, item_id), newest first

    def add(self, ts_ms: int, item_id: str) -> None:
        items = self.items  # changed in place: one list per state, not one per event
        for index, (t, i) in enumerate(items):
            if i == item_id:
                if t >= ts_ms:
                    return  # already there and at least as new: nothing moves
                del items[index]
                break
        # `items` is kept sorted by (-ts, id), so inserting in place equals a full sort.
        bisect.insort(items, (ts_ms, item_id), key=_recent_key)
        del items[self.n :]

    def merge(self, other: "RecentItems") -> None:
        for ts_ms, item_id in other.items:
            self.add(ts_ms, item_id)

    def ids(self) -> list[str]:
        return [i for _, i in self.items]


@functools.cache
def _half_life_ms(text: str) -> float:
    return parse_duration(text).total_seconds() * 1000


def session_vector(
    interactions: Iterable[tuple[int, str, str, str]],
    feature: SessionVectorFeature,
    vectors: Mapping[str, np.ndarray],
) -> list[float] | None:
    """Time-decayed mean of the item vectors of the newest `max_items` interactions.

    Weight 0.5 ** (age / half_life) with age measured from the newest of them, so the
    result depends only on the set of interactions (order-independent, idempotent).
    `interactions` are (ts_ms, event_id, item_id, event_type) in ascending order.
    Returns None when none of those items has a vector yet.
    """
    events = set(feature.events)
    picked = [(ts, item) for ts, _e, item, kind in reversed(list(interactions)) if kind in events]
    picked = picked[: feature.max_items]
    if not picked:
        return None
    half_life_ms = _half_life_ms(feature.half_life)
    anchor = picked[0][0]
    total: np.ndarray | None = None
    weight = 0.0
    for ts, item in picked:
        vec = vectors.get(item)
        if vec is None:
            continue
        w = 0.5 ** ((anchor - ts) / half_life_ms)
        total = vec * w if total is None else total + vec * w
        weight += w
    if total is None or weight <= 0 or not math.isfinite(weight):
        return None
    return (total / weight).astype(np.float32).tolist()


def window_ms(feature: WindowFeature) -> int:
    return int(feature.window.delta.total_seconds() * 1000)


def new_window_state(feature: WindowFeature) -> WindowState:
    return WindowState(window_ms=window_ms(feature), agg=feature.agg)


def actor_of(event: Event, aliases: Mapping[str, str]) -> str:
    """Who an event belongs to after identity stitching."""
    if event.user_id is not None:
        return event.user_id
    linked = aliases.get(event.anonymous_id or "")
    return linked if linked is not None else event.actor


def identity_links(spec: Spec, events: Iterable[Event]) -> dict[str, str]:
    """anonymous_id -> user_id from the spec's identify events (first link wins)."""
    kinds = set(spec.identify_events())
    links: dict[str, str] = {}
    for event in events:
        if event.type in kinds and event.anonymous_id and event.user_id:
            links.setdefault(event.anonymous_id, event.user_id)
    return links


def batch_window_values(
    spec: Spec,
    name: str,
    events: Iterable[Event],
    items: Mapping[str, Mapping[str, Any]],
    *,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Backfill one window feature: {entity_id: {group: value}} from a batch of events.

    The same `WindowState` the stream uses, so the two engines cannot disagree;
    `aliases` (from `identity_links`) attributes anonymous events to the stitched user.
    """
    aliases = aliases or {}
    feature = spec.features[name]
    assert isinstance(feature, WindowFeature)
    states: dict[str, WindowState] = {}
    for event in events:
        if not applies(feature, event):
            continue
        entity = event.item_id if feature.entity == "item" else actor_of(event, aliases)
        if entity is None:
            continue
        item = items.get(event.item_id) if event.item_id else None
        group = group_key(feature, item)
        if group is None:
            continue
        state = states.setdefault(entity, new_window_state(feature))
        state.add(event.ts_ms, event.event_id, group, field_value(spec, feature, event, item))
    return {entity: state.values() for entity, state in states.items()}
