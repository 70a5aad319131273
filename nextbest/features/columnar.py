"""Window features over columns: the batch backfill of millions of events.

`batch_window_values` folds `Event` objects one by one through the stream's
`WindowState`: exact, but about 10 µs an event and feature, and building a million
`Event`s costs another 20 s. This module selects the same entries with numpy and
aggregates them with `nextbest.features.windows.aggregate`, the function `WindowState`
equals bit for bit, so the values are the stream's (a test compares the two on random
histories). Events are columns in bronze order, (ts, event_id); what a feature reads of
each event follows `nextbest.features.semantics.field_value` / `group_key` / `applies`.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from nextbest.features.windows import NO_GROUP, aggregate, bounded, event_key, is_number
from nextbest.spec.models import Spec, WindowFeature


@dataclass(frozen=True)
class EventColumns:
    """Bronze events as columns, sorted by (ts, event_id); `actor` is already stitched
    (user id, else the linked user of the anonymous id, else `anon:<id>`)."""

    event_id: np.ndarray  # object: str
    type: np.ndarray  # object: str
    actor: np.ndarray  # object: str
    item_id: np.ndarray  # object: str | None
    ts_ms: np.ndarray  # int64, as `Event.ts_ms` rounds
    value: np.ndarray  # object: number | None
    properties: Sequence[str | None] | None = None  # raw JSON, parsed only when read

    def __len__(self) -> int:
        return len(self.ts_ms)


def ts_ms_of_us(us: np.ndarray) -> np.ndarray:
    """Microseconds to ms exactly as `Event.ts_ms` does (float seconds * 1000, truncated),
    so both paths put an event on the same millisecond."""
    return ((us.astype(np.int64) / 1e6) * 1000.0).astype(np.int64)


@dataclass(frozen=True)
class _Rows:
    """The events one feature folds: positions in `EventColumns`, entity, group, value."""

    pos: np.ndarray
    entity: np.ndarray  # object
    group: np.ndarray  # object: str
    value: list[Any]


def _feature(spec: Spec, name: str) -> WindowFeature:
    feature = spec.features[name]
    if not isinstance(feature, WindowFeature):
        raise TypeError(f"{name} is not a window feature")
    return feature


def _window_ms(feature: WindowFeature) -> int:
    return int(feature.window.delta.total_seconds() * 1000)


def _rows(
    spec: Spec, feature: WindowFeature, cols: EventColumns, items: Mapping[str, Mapping[str, Any]]
) -> _Rows:
    pos = np.flatnonzero(np.isin(cols.type, list(feature.events)))
    entity = (cols.item_id if feature.entity == "item" else cols.actor)[pos]
    item_ids = cols.item_id[pos]
    keep = entity != None  # noqa: E711 (elementwise on an object array)
    if feature.group_by is not None:
        attr = feature.group_by
        groups = {i: str(a[attr]) for i, a in items.items() if a.get(attr) is not None}
        group = np.array([groups.get(i) if i is not None else None for i in item_ids], object)
        keep &= group != None  # noqa: E711
    else:
        group = np.full(len(pos), NO_GROUP, object)
    pos, entity, group, item_ids = pos[keep], entity[keep], group[keep], item_ids[keep]
    return _Rows(pos, entity, group, _values(spec, feature, cols, pos, item_ids, items))


def _values(
    spec: Spec,
    feature: WindowFeature,
    cols: EventColumns,
    pos: np.ndarray,
    item_ids: np.ndarray,
    items: Mapping[str, Mapping[str, Any]],
) -> list[Any]:
    """`field_value` for each selected event."""
    name = feature.field
    if name is None:
        return [1] * len(pos)
    if name == "value":
        return cols.value[pos].tolist()
    if name == "weight":
        weights = {t: e.weight for t, e in spec.events.items()}
        return [weights[t] for t in cols.type[pos].tolist()]
    if name == "item_id":
        return item_ids.tolist()
    if name in spec.entities.item.attributes:
        return [None if (a := items.get(i)) is None else a.get(name) for i in item_ids.tolist()]
    props = cols.properties or [None] * len(cols)
    return [json.loads(p).get(name) if (p := props[i]) else None for i in pos.tolist()]


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(codes, how many distinct) of an object array of strings."""
    encoded = pa.array(values, pa.string()).dictionary_encode()
    return encoded.indices.to_numpy().astype(np.int64), len(encoded.dictionary)


def window_values(
    spec: Spec, name: str, cols: EventColumns, items: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """{entity: {group: value}}, equal to `batch_window_values` over the same events:
    each entity's window ends at its newest event, repeated event ids count once."""
    feature = _feature(spec, name)
    rows = _rows(spec, feature, cols, items)
    if not len(rows.pos):
        return {}
    codes, _ = _codes(rows.entity)
    ts = cols.ts_ms[rows.pos]
    newest = np.full(int(codes.max()) + 1, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(newest, codes, ts)
    inside = np.flatnonzero(ts > newest[codes] - _window_ms(feature))
    if feature.agg == "last":  # ties in ts are ordered by the id's digest, as entries are
        keys = [event_key(e) for e in cols.event_id[rows.pos[inside]].tolist()]
        inside = inside[np.lexsort((np.array(keys, np.uint64), ts[inside]))]
    entity, group, event_ids = rows.entity, rows.group, cols.event_id[rows.pos]
    seen: set[tuple[str, str]] = set()
    collected: dict[str, dict[str, list[Any]]] = {}
    for i in inside.tolist():
        who = entity[i]
        if (who, event_ids[i]) in seen:
            continue
        seen.add((who, event_ids[i]))
        collected.setdefault(who, {}).setdefault(group[i], []).append(rows.value[i])
    agg = feature.agg
    return {
        who: {g: aggregate(agg, vs) for g, vs in groups.items()}
        for who, groups in collected.items()
    }


def values_before(
    spec: Spec,
    name: str,
    cols: EventColumns,
    items: Mapping[str, Mapping[str, Any]],
    at: np.ndarray,
) -> list[float | None]:
    """A user feature as it was just before each event at positions `at`: over the
    user's earlier events (in bronze order) inside (ts - window, ts] and of the group of
    that event's item (None when the item has no group). What the training set needs:
    nothing of the labelled event or after it leaks into its features."""
    feature = _feature(spec, name)
    rows = _rows(spec, feature, cols, items)
    at = np.asarray(at, np.int64)
    out: list[float | None] = [0.0] * len(at)
    if feature.group_by is not None:
        attr = feature.group_by
        groups = {i: str(a[attr]) for i, a in items.items() if a.get(attr) is not None}
        at_group = [groups.get(i) if i is not None else None for i in cols.item_id[at].tolist()]
        for j, g in enumerate(at_group):
            if g is None:
                out[j] = None
    else:
        at_group = [NO_GROUP] * len(at)
    if not len(rows.pos) or not len(at):
        return out
    # One key per (user, group) over the feature's rows and the labelled events together.
    users = np.concatenate([rows.entity, cols.actor[at]])
    grps = np.concatenate([rows.group, np.array([g or "" for g in at_group], object)])
    user_codes, _ = _codes(users)
    group_codes, n_groups = _codes(grps)
    pair = user_codes * (n_groups + 1) + group_codes
    mine, asked = pair[: len(rows.pos)], pair[len(rows.pos) :]
    order = np.lexsort((rows.pos, mine))  # by pair, then bronze order (so by ts as well)
    mine, pos = mine[order], rows.pos[order]
    ts = cols.ts_ms[pos]
    values = [rows.value[i] for i in order.tolist()]
    n = len(cols) + 1
    # Rows of the same pair earlier in bronze order: [start of pair, hi).
    hi = np.searchsorted(mine * n + pos, asked * n + at, side="left")
    # ... and inside the window: ts > ts_at - window, via the rank of ts among all ts.
    stamps = np.unique(ts)
    rank = np.searchsorted(stamps, ts)
    bound = np.searchsorted(stamps, cols.ts_ms[at] - _window_ms(feature), side="right")
    r = len(stamps) + 1
    lo = np.searchsorted(mine * r + rank, asked * r + bound, side="left")
    lo = np.minimum(lo, hi)
    fast = _prefix_aggregate(feature.agg, values, lo, hi)
    for j in range(len(at)):
        if out[j] is None:
            continue
        if fast is not None:
            out[j] = fast[j]
        elif hi[j] > lo[j]:
            out[j] = aggregate(feature.agg, values[lo[j] : hi[j]])
    return out


def _prefix_aggregate(
    agg: str, values: list[Any], lo: np.ndarray, hi: np.ndarray
) -> list[float] | None:
    """count / sum / mean / last over [lo, hi) slices from prefix arrays, when that is
    exact (sums of integers below 2**53); None: aggregate each slice instead."""
    if agg == "count":
        return (hi - lo).astype(float).tolist()
    numeric = np.array([is_number(v) for v in values], bool)
    x = np.array([bounded(v) if ok else 0.0 for v, ok in zip(values, numeric, strict=True)])
    if agg == "last":
        index = np.where(numeric, np.arange(len(values)), -1)
        latest = np.maximum.accumulate(index) if len(index) else index
        prev = latest[np.maximum(hi - 1, 0)] if len(latest) else np.zeros(len(hi), int)
        ok = (hi > lo) & (prev >= lo)
        return np.where(ok, x[np.maximum(prev, 0)] if len(x) else 0.0, 0.0).tolist()
    if agg not in ("sum", "mean"):
        return None
    if not np.all(np.floor(x) == x) or float(np.abs(x).sum()) >= 2.0**53:
        return None
    sums = np.concatenate([[0.0], np.cumsum(x)])
    counts = np.concatenate([[0], np.cumsum(numeric)])
    total = sums[hi] - sums[lo]
    if agg == "sum":
        return total.tolist()
    k = counts[hi] - counts[lo]
    return [t / c if c else 0.0 for t, c in zip(total.tolist(), k.tolist(), strict=True)]
