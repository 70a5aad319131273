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

from nextbest.events import Event
from nextbest.spec import (
    LastNFeature,
    SessionVectorFeature,
    Spec,
    WindowFeature,
    parse_duration,
)

NO_GROUP = ""


@dataclass(slots=True)
class _GroupAgg:
    """Running aggregate of one group's entries, exact so that `WindowState.values()`
    equals `aggregate(agg, values)` over the group's entries bit for bit."""

    n: int = 0  # entries of the group, numeric or not (the group exists while n > 0)
    numbers: int = 0  # entries whose value `_is_number`
    partials: list[float] = field(default_factory=list)  # exact running sum, see `_grow`
    distinct: dict[Any, int] = field(default_factory=dict)  # non-None value -> entries
    last: tuple[int, str, float] | None = None  # newest numeric entry (ts_ms, event_id, value)


def _grow(partials: list[float], x: float) -> bool:
    """Add `x` exactly to a Shewchuk expansion (the algorithm behind `math.fsum`).

    The expansion holds the exact sum of everything added, subtractions included, so
    `math.fsum(partials)` is the correctly rounded sum of the current values: the same
    float `math.fsum(values)` returns, whatever the order of adds and evictions.
    Returns False on overflow (the caller falls back to rescanning).
    """
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
    return math.isfinite(x)


@dataclass
class WindowState:
    """Events of one entity inside one feature's window, as (ts_ms, event_id, group, value).

    Kept sorted by (ts_ms, event_id) so ties and out-of-order arrivals give the same
    result as a sorted batch. Memory is bounded by the events inside the window.
    Each group's aggregate is maintained incrementally on add and evict (exactly, see
    `_grow`), so `values()` costs O(groups) instead of a rescan of the window; the
    result is identical to `aggregate` over the entries, which stays the definition.
    """

    window_ms: int
    agg: str
    entries: list[tuple[int, str, str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    # None = incremental path disabled (unhashable distinct values, overflow): rescan.
    _groups: dict[str, _GroupAgg] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._rebuild()

    def __getstate__(self) -> dict[str, Any]:
        # Snapshots carry the entries only; `seen` and the aggregates are derived.
        return {"window_ms": self.window_ms, "agg": self.agg, "entries": self.entries}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        # Also restores snapshots pickled before the aggregates existed (full __dict__).
        self.window_ms = state["window_ms"]
        self.agg = state["agg"]
        self.entries = list(state["entries"])
        self.seen = {e[1] for e in self.entries}
        self._rebuild()

    @property
    def anchor_ms(self) -> int | None:
        return self.entries[-1][0] if self.entries else None

    def add(self, ts_ms: int, event_id: str, group: str, value: Any) -> bool:
        """Fold one event in; False when it was a duplicate or fell outside the window."""
        if event_id in self.seen:
            return False
        entries = self.entries
        entry = (ts_ms, event_id, group, value)
        if entries:
            if ts_ms <= entries[-1][0] - self.window_ms:
                return False
            if entry > entries[-1]:
                entries.append(entry)  # the usual case: a new latest event (new anchor)
            else:
                bisect.insort(entries, entry)
        else:
            entries.append(entry)
        self.seen.add(event_id)
        self._count(entry, 1)
        # Only a new anchor can push older entries out of the window.
        if entries[-1] is entry and entries[0][0] <= ts_ms - self.window_ms:
            self._evict()
        return True

    def _evict(self) -> None:
        anchor = self.anchor_ms
        if anchor is None:
            return
        cut = bisect.bisect_right(self.entries, (anchor - self.window_ms, "\uffff"))
        if not cut:
            return
        for entry in self.entries[:cut]:
            self.seen.discard(entry[1])
            self._count(entry, -1)
        del self.entries[:cut]

    def _rebuild(self) -> None:
        self._groups = {}
        for entry in self.entries:
            self._count(entry, 1)

    def _count(self, entry: tuple[int, str, str, Any], sign: int) -> None:
        """Apply one entry to its group's aggregate (+1 added, -1 evicted).

        Evictions remove a prefix of the sorted entries, so an evicted numeric entry
        that is its group's newest leaves no numeric entry behind in that group.
        """
        groups = self._groups
        if groups is None:
            return
        ts_ms, event_id, group, value = entry
        g = groups.get(group)
        if g is None:
            g = groups[group] = _GroupAgg()
        g.n += sign
        agg = self.agg
        if agg == "count":
            pass
        elif agg == "distinct_count":
            if value is not None:
                try:
                    held = g.distinct.get(value, 0) + sign
                except TypeError:  # unhashable: `aggregate` decides (and raises) on read
                    self._groups = None
                    return
                if held:
                    g.distinct[value] = held
                else:
                    del g.distinct[value]
        elif agg in ("sum", "mean"):
            if _is_number(value):
                g.numbers += sign
                if not _grow(g.partials, float(value) if sign > 0 else -float(value)):
                    self._groups = None
                    return
        elif agg == "last" and _is_number(value):
            key = (ts_ms, event_id)
            if sign > 0:
                if g.last is None or key > g.last[:2]:
                    g.last = (ts_ms, event_id, float(value))
            elif g.last is not None and g.last[:2] == key:
                g.last = None
        if g.n <= 0:
            del groups[group]

    def merge(self, other: "WindowState") -> None:
        """Identity stitching: fold the anonymous profile's events into this one."""
        for ts_ms, event_id, group, value in other.entries:
            self.add(ts_ms, event_id, group, value)

    def values(self) -> dict[str, float]:
        """Aggregate per group key ('' when the feature is not grouped)."""
        groups = self._groups
        if groups is None or self.agg not in _INCREMENTAL:
            return self.rescan()
        agg = self.agg
        if agg == "count":
            return {k: float(g.n) for k, g in groups.items()}
        if agg == "sum":
            return {k: math.fsum(g.partials) for k, g in groups.items()}
        if agg == "mean":
            return {
                k: math.fsum(g.partials) / g.numbers if g.numbers else 0.0
                for k, g in groups.items()
            }
        if agg == "distinct_count":
            return {k: float(len(g.distinct)) for k, g in groups.items()}
        return {k: g.last[2] if g.last is not None else 0.0 for k, g in groups.items()}

    def rescan(self) -> dict[str, float]:
        """`values()` by definition: `aggregate` over every entry of each group."""
        groups: dict[str, list[Any]] = {}
        for _, _, group, value in self.entries:
            groups.setdefault(group, []).append(value)
        return {g: aggregate(self.agg, vs) for g, vs in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"window_ms": self.window_ms, "agg": self.agg, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WindowState":
        entries = [tuple(e) for e in data["entries"]]
        return cls(
            window_ms=int(data["window_ms"]),
            agg=str(data["agg"]),
            entries=entries,  # type: ignore[arg-type]
            seen={e[1] for e in entries},
        )


_INCREMENTAL = frozenset({"count", "sum", "mean", "distinct_count", "last"})


def aggregate(agg: str, values: list[Any]) -> float:
    """The aggregation itself; `values` are in event-time order."""
    if agg == "count":
        return float(len(values))
    if agg == "distinct_count":
        return float(len({v for v in values if v is not None}))
    numbers = [float(v) for v in values if _is_number(v)]
    if agg == "sum":
        return math.fsum(numbers)
    if agg == "mean":
        return math.fsum(numbers) / len(numbers) if numbers else 0.0
    if agg == "last":
        return numbers[-1] if numbers else 0.0
    raise ValueError(f"unknown aggregation {agg!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
        items = self.items
        newest = ts_ms
        for index, (t, i) in enumerate(items):
            if i == item_id:
                if t >= ts_ms:
                    return  # already there and at least as new: nothing moves
                newest = ts_ms
                items = items[:index] + items[index + 1 :]
                break
        else:
            items = list(items)
        # `items` is kept sorted by (-ts, id), so inserting in place equals a full sort.
        bisect.insort(items, (newest, item_id), key=_recent_key)
        self.items = items[: self.n]

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
