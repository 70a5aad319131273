"""Windowed aggregates, folded incrementally: the state behind every `window` feature.

Split from `nextbest.features.semantics` (which re-exports it) because the incremental
bookkeeping is most of the code; the semantics stay there. A group's running state
equals `aggregate(agg, values)` over its entries bit for bit (math.fsum partials).
"""

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NO_GROUP = ""
_KEY_END = 1 << 64  # above every `event_key`: the bisect bound of "all entries at ts"
VALUE_BOUND = 1e15
"""Numeric values are clamped to +-VALUE_BOUND before they are aggregated: a window of
any realistic size then sums far below float's range, so no client value (1.7e308 twice
overflowed `math.fsum` and crashed the stream on every replay) can overflow a sum or
a mean. Stream and batch share `bounded`, so they still agree bit for bit."""


def event_key(event_id: str) -> int:
    """What a window keeps of an event's id: a 64-bit digest, never the id itself.

    Item windows outlive an erased user (they belong to the item), and a client-chosen
    event id may embed the user's id, so a raw id there would survive the erasure (in
    the recovery snapshots) until the window expired. The digest still dedupes (a
    collision inside one entity's window is ~n^2/2^65) and orders ties the same way in
    the stream and the batch backfill, which both key entries here. Not keyed with the
    pseudonymization key on purpose: stream, batch and old snapshots agree without it,
    and the id cannot be read back from it.
    """
    return int.from_bytes(
        hashlib.blake2b(event_id.encode(), digest_size=8, person=b"nb-window").digest()
    )


def _keyed(entries: Iterable[Any]) -> list[tuple[int, int, str, Any]]:
    """Entries of a snapshot from before `event_key` (raw ids) keyed as now, re-sorted."""
    out = [(e[0], e[1] if isinstance(e[1], int) else event_key(e[1]), e[2], e[3]) for e in entries]
    out.sort(key=lambda e: e[:2])
    return out


@dataclass(slots=True)
class _GroupAgg:
    """Running aggregate of one group's entries, exact so that `WindowState.values()`
    equals `aggregate(agg, values)` over the group's entries bit for bit."""

    n: int = 0  # entries of the group, numeric or not (the group exists while n > 0)
    numbers: int = 0  # entries whose value `_is_number`
    # Made on first use, by the aggregations that need them (most groups need neither).
    partials: list[float] | None = None  # exact running sum, see `_grow`
    distinct: dict[Any, int] | None = None  # non-None value -> entries
    last: tuple[int, int, float] | None = None  # newest numeric entry (ts_ms, key, value)


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
    """Events of one entity inside one feature's window, as (ts_ms, key, group, value),
    `key` the event id's `event_key`.

    Kept sorted by (ts_ms, key) so ties and out-of-order arrivals give the same
    result as a sorted batch. Memory is bounded by the events inside the window.
    Each group's aggregate is maintained incrementally on add and evict (exactly, see
    `_grow`), so `values()` costs O(groups) instead of a rescan of the window; the
    result is identical to `aggregate` over the entries, which stays the definition.
    """

    window_ms: int
    agg: str
    entries: list[tuple[int, int, str, Any]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    # None = incremental path disabled (unhashable distinct values, overflow): rescan.
    _groups: dict[str, _GroupAgg] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # Groups whose value may have changed since the reader last called `take_changed`.
    _changed: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(not isinstance(e[1], int) for e in self.entries):
            self.entries = _keyed(self.entries)
            self.seen = {e[1] for e in self.entries}
        self._rebuild()

    def __getstate__(self) -> dict[str, Any]:
        # Snapshots carry the entries only; `seen` and the aggregates are derived.
        return {"window_ms": self.window_ms, "agg": self.agg, "entries": self.entries}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        # Also restores snapshots pickled before the aggregates existed (full __dict__).
        self.window_ms = state["window_ms"]
        self.agg = state["agg"]
        self.entries = _keyed(state["entries"])
        self.seen = {e[1] for e in self.entries}
        self._changed = set()
        self._rebuild()

    @classmethod
    def restore(cls, window_ms: int, agg: str, entries: list[Any]) -> "WindowState":
        """From (window_ms, agg, entries) of a compact snapshot (`entries` is taken over)."""
        state = cls.__new__(cls)
        state.window_ms = window_ms
        state.agg = agg
        state.entries = entries if all(isinstance(e[1], int) for e in entries) else _keyed(entries)
        state.seen = {e[1] for e in entries}
        state._changed = set()
        state._rebuild()
        return state

    @property
    def anchor_ms(self) -> int | None:
        return self.entries[-1][0] if self.entries else None

    def add(self, ts_ms: int, event_id: str | int, group: str, value: Any) -> bool:
        """Fold one event in; False when it was a duplicate or fell outside the window.
        `event_id` is the id, or its `event_key` when the caller computed it once for
        several windows."""
        key = event_id if isinstance(event_id, int) else event_key(event_id)
        if key in self.seen:
            return False
        entries = self.entries
        entry = (ts_ms, key, group, value)
        if entries:
            if ts_ms <= entries[-1][0] - self.window_ms:
                return False
            if entry > entries[-1]:
                entries.append(entry)  # the usual case: a new latest event (new anchor)
            else:
                bisect.insort(entries, entry)
        else:
            entries.append(entry)
        self.seen.add(key)
        self._count(entry, 1)
        # Only a new anchor can push older entries out of the window.
        if entries[-1] is entry and entries[0][0] <= ts_ms - self.window_ms:
            self._evict()
        return True

    def _evict(self) -> None:
        anchor = self.anchor_ms
        if anchor is None:
            return
        cut = bisect.bisect_right(self.entries, (anchor - self.window_ms, _KEY_END))
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
        self._changed.clear()

    def take_changed(self) -> set[str] | None:
        """The groups added to or evicted from since the last call (and forget them),
        or None when unknown (the rescan path): every group may have changed."""
        changed = self._changed
        self._changed = set()
        return changed if self._groups is not None else None

    def _count(self, entry: tuple[int, int, str, Any], sign: int) -> None:
        """Apply one entry to its group's aggregate (+1 added, -1 evicted).

        Evictions remove a prefix of the sorted entries, so an evicted numeric entry
        that is its group's newest leaves no numeric entry behind in that group.
        """
        groups = self._groups
        if groups is None:
            return
        ts_ms, key_id, group, value = entry
        self._changed.add(group)
        g = groups.get(group)
        if g is None:
            g = groups[group] = _GroupAgg()
        g.n += sign
        agg = self.agg
        if agg == "count":
            pass
        elif agg == "distinct_count":
            if value is not None:
                distinct = g.distinct
                if distinct is None:
                    distinct = g.distinct = {}
                try:
                    held = distinct.get(value, 0) + sign
                except TypeError:  # unhashable: `aggregate` decides (and raises) on read
                    self._groups = None
                    return
                if held:
                    distinct[value] = held
                else:
                    del distinct[value]
        elif agg in ("sum", "mean"):
            if is_number(value):
                g.numbers += sign
                partials = g.partials
                if partials is None:
                    partials = g.partials = []
                x = bounded(value)
                if not _grow(partials, x if sign > 0 else -x):
                    self._groups = None
                    return
        elif agg == "last" and is_number(value):
            key = (ts_ms, key_id)
            if sign > 0:
                if g.last is None or key > g.last[:2]:
                    g.last = (ts_ms, key_id, bounded(value))
            elif g.last is not None and g.last[:2] == key:
                g.last = None
        if g.n <= 0:
            del groups[group]

    def merge(self, other: "WindowState") -> None:
        """Identity stitching: fold the anonymous profile's events into this one."""
        for ts_ms, key, group, value in other.entries:
            self.add(ts_ms, key, group, value)

    def values(self) -> dict[str, float]:
        """Aggregate per group key ('' when the feature is not grouped)."""
        groups = self._groups
        if groups is None or self.agg not in _INCREMENTAL:
            return self.rescan()
        agg = self.agg
        if agg == "count":
            return {k: float(g.n) for k, g in groups.items()}
        return {k: _value(agg, g) for k, g in groups.items()}

    def values_of(self, keys: Iterable[str]) -> dict[str, float]:
        """`values()` restricted to `keys` (those that exist), without the others' cost."""
        groups = self._groups
        if groups is None or self.agg not in _INCREMENTAL:
            every = self.rescan()
            return {k: every[k] for k in keys if k in every}
        agg = self.agg
        return {k: _value(agg, g) for k in keys if (g := groups.get(k)) is not None}

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
        entries = _keyed(data["entries"])
        return cls(
            window_ms=int(data["window_ms"]),
            agg=str(data["agg"]),
            entries=entries,
            seen={e[1] for e in entries},
        )


_INCREMENTAL = frozenset({"count", "sum", "mean", "distinct_count", "last"})


def _value(agg: str, g: _GroupAgg) -> float:
    """One group's aggregate from its running state (equals `aggregate` over it)."""
    if agg == "count":
        return float(g.n)
    if agg == "sum":
        return math.fsum(g.partials) if g.partials else 0.0
    if agg == "mean":
        return math.fsum(g.partials) / g.numbers if g.numbers and g.partials else 0.0
    if agg == "distinct_count":
        return float(len(g.distinct)) if g.distinct else 0.0
    return g.last[2] if g.last is not None else 0.0


def aggregate(agg: str, values: list[Any]) -> float:
    """The aggregation itself; `values` are in event-time order."""
    if agg == "count":
        return float(len(values))
    if agg == "distinct_count":
        return float(len({v for v in values if v is not None}))
    numbers = [bounded(v) for v in values if is_number(v)]
    if agg == "sum":
        return math.fsum(numbers)
    if agg == "mean":
        return math.fsum(numbers) / len(numbers) if numbers else 0.0
    if agg == "last":
        return numbers[-1] if numbers else 0.0
    raise ValueError(f"unknown aggregation {agg!r}")


def is_number(v: Any) -> bool:
    # A tuple, not `int | float`: that builds a union object on every call (hot path).
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bounded(v: float) -> float:
    """`v` as a float clamped to +-VALUE_BOUND (see there)."""
    x = float(v)
    return x if -VALUE_BOUND <= x <= VALUE_BOUND else math.copysign(VALUE_BOUND, x)
