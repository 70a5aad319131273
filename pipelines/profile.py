"""Per-user and per-item state of the stream, folded event by event.

Built on the shared semantics of `nextbest.features.semantics` (`WindowState`, `RecentItems`,
`field_value`, `group_key`), so online values equal `batch_window_values` over the
same events. Every structure here is idempotent by event_id and independent of
arrival order, which is what makes replays after a crash, re-sent anonymous history
(identity stitching) and several workers safe.

Rows are absolute values: a feature row says "the value is now X as of event time T".
A group that left a window is written once as 0.0, so the online store never keeps
a stale group.

Feedback records fold into the user's online model (`nextbest.learn.online_model`), which
is idempotent by (decision_id, target) the same way; it is written with the user's
state (`SessionState.online_model`, `nextbest.features.state`) and kept in the
profile's recovery snapshot.
"""

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from nextbest.features.semantics import (
    NO_GROUP,
    RecentItems,
    WindowState,
    event_key,
    field_value,
    group_key,
    session_vector,
    window_ms,
)
from nextbest.features.state import (
    ITEM_SNAPSHOT,
    USER_SNAPSHOT,
    SessionState,
    WindowSnapshot,
    encode_snapshot,
)
from nextbest.ingest.events import Event, item_actor
from nextbest.learn.online_model import Feedback, OnlinePlan, OnlineState
from nextbest.spec.models import (
    LastNFeature,
    SessionVectorFeature,
    Spec,
    WindowFeature,
)
from storage.online.models import FeatureRow, UserState, now_ms

HISTORY_MAX = 200
"""Entries of `SessionState.history` and of each `SessionState.seen` list."""

ItemLookup = Callable[[str], Mapping[str, Any] | None]
Source = tuple[int, int]  # (partition, offset) of the newest event in a batch
Touched = dict[str, set[str]]  # feature -> groups offered an event in this batch


@dataclass(frozen=True)
class FeaturePlan:
    """What the spec asks the stream to keep, resolved once per flow."""

    spec: Spec
    user_windows: dict[str, WindowFeature]
    item_windows: dict[str, WindowFeature]
    last_n: dict[str, LastNFeature]
    session_vector: SessionVectorFeature | None
    events_of: dict[str, frozenset[str]]  # feature -> event types
    window_ms: dict[str, int]  # window feature -> window length (parsed once)
    # event type -> the (name, feature) pairs it feeds, in declaration order
    user_routes: dict[str, tuple[tuple[str, WindowFeature], ...]] = field(default_factory=dict)
    item_routes: dict[str, tuple[tuple[str, WindowFeature], ...]] = field(default_factory=dict)
    last_n_routes: dict[str, tuple[tuple[str, LastNFeature], ...]] = field(default_factory=dict)
    online: OnlinePlan = field(default_factory=OnlinePlan)

    @classmethod
    def from_spec(cls, spec: Spec) -> "FeaturePlan":
        windows = spec.window_features()
        last_n = {n: f for n, f in spec.features.items() if isinstance(f, LastNFeature)}
        vectors = [f for f in spec.features.values() if isinstance(f, SessionVectorFeature)]
        user_windows = {n: f for n, f in windows.items() if f.entity == "user"}
        item_windows = {n: f for n, f in windows.items() if f.entity == "item"}
        return cls(
            spec=spec,
            user_windows=user_windows,
            item_windows=item_windows,
            last_n=last_n,
            session_vector=vectors[0] if vectors else None,
            events_of={n: frozenset(f.events) for n, f in spec.features.items()},
            window_ms={n: window_ms(f) for n, f in windows.items()},
            user_routes=_routes(user_windows),
            item_routes=_routes(item_windows),
            last_n_routes=_routes(last_n),
            online=OnlinePlan.from_spec(spec),
        )

    @property
    def recent_feature(self) -> str | None:
        """The last_n feature that fills `UserState.recent_items` (the first declared)."""
        return next(iter(self.last_n), None)

    def item_event_types(self) -> frozenset[str]:
        return frozenset().union(*(self.events_of[n] for n in self.item_windows))


F = TypeVar("F", WindowFeature, LastNFeature)


def _routes(features: Mapping[str, F]) -> dict[str, tuple[tuple[str, F], ...]]:
    """event type -> the features it feeds, so folding skips the others unseen."""
    types = {t for f in features.values() for t in f.events}
    return {t: tuple((n, f) for n, f in features.items() if t in f.events) for t in types}


def _fold_windows(
    plan: FeaturePlan,
    routes: Mapping[str, tuple[tuple[str, WindowFeature], ...]],
    windows: dict[str, WindowState],
    event: Event,
    ts_ms: int,
    item: Mapping[str, Any] | None,
    offered: Touched,
) -> None:
    """Fold `event` (at `ts_ms`) into every window feature it applies to, noting in
    `offered` the (feature, group) it was offered to, whether or not the window kept it."""
    key: int | None = None  # the event id's digest, once for all its windows
    for name, feature in routes.get(event.type, ()):
        # The common cases of `group_key` and `field_value` inline (hot path).
        group = NO_GROUP if feature.group_by is None else group_key(feature, item)
        if group is None:
            continue
        state = windows.get(name)
        if state is None:
            state = windows[name] = WindowState(window_ms=plan.window_ms[name], agg=feature.agg)
        value = 1 if feature.field is None else field_value(plan.spec, feature, event, item)
        if key is None:
            key = event_key(event.event_id)
        state.add(ts_ms, key, group, value)
        touched = offered.get(name)
        if touched is None:
            offered[name] = {group}
        else:
            touched.add(group)


def _window_rows(
    actor: str,
    offered: Touched,
    windows: Mapping[str, WindowState],
    written: dict[str, dict[str, float]],
    source: Source,
    rewrite: set[str],
) -> list[FeatureRow]:
    """Rows for the features an event was offered to: each group that was offered an
    event or whose value differs from the last one written (0.0 once it left the window).

    `written` is feature -> group -> last written value. A feature in `rewrite` (set on
    restore from a Bytewax snapshot) gets every known group written the first time it
    is offered an event: the snapshot predates rows written just before a crash, but
    each of those came from an event the replay offers again to the same actor and
    feature, possibly in another order (so maybe outside the window by then, hence
    offered rather than added); after that full rewrite `written` mirrors the store.
    """
    rows: list[FeatureRow] = []
    for name in sorted(offered):
        state = windows[name]
        touched = offered[name]
        before = written.get(name)
        changed = state.take_changed()
        if name in rewrite or before is None or changed is None:
            values = state.values()
            known = before or {}
            groups = set(values) | set(known) | touched
            if name in rewrite:
                rewrite.discard(name)
            else:
                groups = {g for g in groups if g in touched or known.get(g) != values.get(g, 0.0)}
            written[name] = values
        else:
            # `before` mirrors every group's value as of the last call, and only the
            # groups added to or evicted from since can differ: look at those alone.
            groups = changed | touched
            values = state.values_of(groups)
            groups = {g for g in groups if g in touched or before.get(g) != values.get(g, 0.0)}
            for group in changed:
                if group in values:
                    before[group] = values[group]
                else:
                    before.pop(group, None)
        for group in sorted(groups):
            rows.append(
                FeatureRow(
                    user_id=actor,
                    feature=name,
                    value=values.get(group, 0.0),
                    event_ts_ms=state.anchor_ms or 0,
                    group_key=group,
                    source_partition=source[0],
                    source_offset=source[1],
                )
            )
    return rows


WindowsState = dict[str, tuple[int, str, list[Any]]]  # (window_ms, agg, entries)


def _windows_state(windows: Mapping[str, WindowState]) -> WindowsState:
    """Window states as builtins for a snapshot (the aggregates are derived)."""
    return {name: (w.window_ms, w.agg, w.entries) for name, w in windows.items()}


def _windows_restore(state: WindowsState) -> dict[str, WindowState]:
    return {name: WindowState.restore(*w) for name, w in state.items()}


def _windows_of(snap: dict[str, WindowSnapshot]) -> dict[str, WindowState]:
    return {n: WindowState.restore(w.window_ms, w.agg, w.entries) for n, w in snap.items()}


def _written(windows: Mapping[str, WindowState]) -> dict[str, dict[str, float]]:
    """`written` as it stands between two batches: every batch ends with `_window_rows`
    for each feature it touched, which leaves `written[name] == values()`, and nothing
    else changes a window; so snapshots leave it out and a restore recomputes it."""
    return {name: w.values() for name, w in windows.items()}


@dataclass
class ItemProfile:
    """Window features of one item (e.g. views in the last hour, for trending)."""

    windows: dict[str, WindowState] = field(default_factory=dict)
    written: dict[str, dict[str, float]] = field(default_factory=dict)
    rewrite: set[str] = field(default_factory=set)

    def restored(self) -> None:
        """Called after a restore from a snapshot (see `_window_rows`)."""
        self.rewrite = set(self.windows) | set(self.written)

    def snapshot(self) -> bytes:
        """The recovery snapshot: `ItemSnapshot` (`nextbest.features.state`), plain msgpack."""
        return encode_snapshot(("item.1", _windows_state(self.windows), list(self.rewrite)))

    @classmethod
    def from_snapshot(cls, data: bytes) -> "ItemProfile":
        snap = ITEM_SNAPSHOT.decode(data)
        windows = _windows_of(snap.windows)
        return cls(windows, _written(windows), set(snap.rewrite))

    def __getstate__(self) -> tuple[Any, ...]:
        return (_windows_state(self.windows), None, self.rewrite)  # see UserProfile

    def __setstate__(self, state: tuple[Any, ...] | dict[str, Any]) -> None:
        if isinstance(state, dict):  # snapshots pickled before the compact form
            self.__dict__.update(state)
            return
        windows, written, self.rewrite = state
        self.windows = _windows_restore(windows)
        self.written = _written(self.windows) if written is None else written

    def fold(
        self,
        plan: FeaturePlan,
        item_id: str,
        batch: Iterable[tuple[int, int, Event]],
        lookup: ItemLookup,
    ) -> list[FeatureRow]:
        offered: Touched = {}
        source: Source = (-1, -1)
        item = lookup(item_id)
        for partition, offset, event in batch:
            self.add(plan, event, item, offered)
            source = max(source, (partition, offset))
        return self.rows(item_id, offered, source)

    def add(
        self, plan: FeaturePlan, event: Event, item: Mapping[str, Any] | None, offered: Touched
    ) -> None:
        """Fold one event in, noting the window features and groups it was offered to."""
        _fold_windows(plan, plan.item_routes, self.windows, event, event.ts_ms, item, offered)

    def rows(self, item_id: str, offered: Touched, source: Source) -> list[FeatureRow]:
        """The rows for what the events since the last call were offered to."""
        actor = item_actor(item_id)
        return _window_rows(actor, offered, self.windows, self.written, source, self.rewrite)


@dataclass
class UserProfile:
    """Everything the stream knows about one actor (user id or `anon:<id>`)."""

    windows: dict[str, WindowState] = field(default_factory=dict)
    written: dict[str, dict[str, float]] = field(default_factory=dict)
    rewrite: set[str] = field(default_factory=set)
    recent: dict[str, RecentItems] = field(default_factory=dict)
    seen: dict[str, RecentItems] = field(default_factory=dict)
    # (ts_ms, event_id, item_id, event_type), ascending, the newest HISTORY_MAX only
    interactions: list[tuple[int, str, str, str]] = field(default_factory=list)
    interaction_ids: set[str] = field(default_factory=set)
    latest: tuple[int, str] = (-1, "")  # (ts_ms, event_id) of the newest event
    session_id: str | None = None
    online: OnlineState | None = None  # learned from feedback (nextbest.learn.online_model)

    def fold(
        self, plan: FeaturePlan, event: Event, item: Mapping[str, Any] | None, offered: Touched
    ) -> None:
        """Fold one event in, noting the window features and groups it was offered to."""
        ts_ms = event.ts_ms  # a datetime conversion: once per event, not per feature
        _fold_windows(plan, plan.user_routes, self.windows, event, ts_ms, item, offered)
        key = (ts_ms, event.event_id)
        if key > self.latest:
            self.latest = key
            self.session_id = event.context.session_id
        item_id = event.item_id
        if item_id is None:
            return
        for name, feature in plan.last_n_routes.get(event.type, ()):
            recent = self.recent.get(name)
            if recent is None:
                recent = self.recent[name] = RecentItems(feature.n)
            recent.add(ts_ms, item_id)
        seen = self.seen.get(event.type)
        if seen is None:
            seen = self.seen[event.type] = RecentItems(HISTORY_MAX)
        seen.add(ts_ms, item_id)
        self._interact((ts_ms, event.event_id, item_id, event.type))

    def snapshot(self) -> bytes:
        """The recovery snapshot, once per touched key and epoch: `UserSnapshot`
        (`nextbest.features.state`) as plain msgpack, without what `interactions` and
        the windows imply (`written`, `interaction_ids`, the aggregates)."""
        online = self.online
        return encode_snapshot(
            (
                "user.1",
                _windows_state(self.windows),
                list(self.rewrite),
                {name: (r.n, r.items) for name, r in self.recent.items()},
                {kind: (r.n, r.items) for kind, r in self.seen.items()},
                self.interactions,
                self.latest,
                self.session_id,
                online.snapshot() if online is not None else None,
            )
        )

    @classmethod
    def from_snapshot(cls, data: bytes) -> "UserProfile":
        snap = USER_SNAPSHOT.decode(data)
        windows = _windows_of(snap.windows)
        interactions = snap.interactions
        return cls(
            windows=windows,
            written=_written(windows),
            rewrite=set(snap.rewrite),
            recent={name: RecentItems(n, items) for name, (n, items) in snap.recent.items()},
            seen={kind: RecentItems(n, items) for kind, (n, items) in snap.seen.items()},
            interactions=interactions,
            interaction_ids={entry[1] for entry in interactions},
            latest=snap.latest,
            session_id=snap.session_id,
            online=OnlineState.restore(snap.online) if snap.online is not None else None,
        )

    def __getstate__(self) -> tuple[Any, ...]:
        # Pickled once per touched key and epoch: one flat tuple of builtins (about half
        # the cost of pickling the nested objects), without what `interactions` implies.
        return (
            _windows_state(self.windows),
            None,  # `written`: what `_written` derives on restore
            self.rewrite,
            {name: (r.n, r.items) for name, r in self.recent.items()},
            {kind: (r.n, r.items) for kind, r in self.seen.items()},
            self.interactions,
            self.latest,
            self.session_id,
            self.online,
        )

    def __setstate__(self, state: tuple[Any, ...] | dict[str, Any]) -> None:
        if isinstance(state, dict):  # snapshots pickled before the compact form
            state.setdefault("online", None)  # ... and before the online model
            self.__dict__.update(state)
        else:
            windows, written, rewrite, recent, seen, interactions, latest, session, online = state
            self.windows = _windows_restore(windows)
            self.written = _written(self.windows) if written is None else written
            self.rewrite = rewrite
            self.recent = {name: RecentItems(n, items) for name, (n, items) in recent.items()}
            self.seen = {kind: RecentItems(n, items) for kind, (n, items) in seen.items()}
            self.interactions = interactions
            self.latest = latest
            self.session_id = session
            self.online = online
        self.interaction_ids = {entry[1] for entry in self.interactions}

    def _interact(self, entry: tuple[int, str, str, str]) -> None:
        if entry[1] in self.interaction_ids:
            return
        if len(self.interactions) >= HISTORY_MAX and entry < self.interactions[0]:
            return  # older than everything kept: it would be evicted at once
        bisect.insort(self.interactions, entry)
        self.interaction_ids.add(entry[1])
        while len(self.interactions) > HISTORY_MAX:
            self.interaction_ids.discard(self.interactions.pop(0)[1])

    def restored(self) -> None:
        """Called after a restore from a snapshot (see `_window_rows`)."""
        self.rewrite = set(self.windows) | set(self.written)

    def learn(self, plan: FeaturePlan, feedback: Feedback, item: Mapping[str, Any] | None) -> bool:
        """Fold one feedback record into the online model; True when it changed."""
        online = plan.online
        targets = online.targets(feedback, item) if online.enabled else []
        if not targets:
            return False
        if self.online is None:
            self.online = OnlineState()
        self.online.ensure(online.half_lives_ms)
        # A client's ts is unbounded: fold it at most a little past the clock (see
        # nextbest.learn.online_model, "Time"), so one future-dated record cannot freeze the model.
        return self.online.learn(
            feedback.decision_id, targets, feedback.outcome, feedback.ts_ms, now_ms=now_ms()
        )

    def feature_rows(
        self, plan: FeaturePlan, actor: str, offered: Touched, source: Source
    ) -> list[FeatureRow]:
        rows = _window_rows(actor, offered, self.windows, self.written, source, self.rewrite)
        for name, recent in self.recent.items():
            if name == plan.recent_feature:
                continue  # already in UserState.recent_items
            rows.append(
                FeatureRow(
                    user_id=actor,
                    feature=name,
                    value=float(len(recent.items)),
                    event_ts_ms=recent.items[0][0] if recent.items else 0,
                    value_json=recent.ids(),
                    source_partition=source[0],
                    source_offset=source[1],
                )
            )
        return rows

    def user_state(self, plan: FeaturePlan, actor: str, vector: list[float] | None) -> UserState:
        recent_name = plan.recent_feature
        recent = self.recent.get(recent_name) if recent_name else None
        online = self.online
        session = SessionState(
            session_id=self.session_id,
            last_ts_ms=self.latest[0],
            history=[(i, t, ts) for ts, _e, i, t in reversed(self.interactions)],
            seen={kind: items.ids() for kind, items in sorted(self.seen.items())},
            online_model=online.evidence() if online is not None else None,
        )
        newest = self.latest[0]
        if online is not None:
            newest = max(newest, online.anchor_ms)
        return UserState(
            user_id=actor,
            event_ts_ms=max(newest, 0),
            recent_items=recent.ids() if recent is not None else [],
            session=session,
            session_vector=vector,
        )

    def session_vector(
        self, plan: FeaturePlan, vectors: Mapping[str, np.ndarray]
    ) -> list[float] | None:
        feature = plan.session_vector
        if feature is None or not vectors:
            return None
        return session_vector(self.interactions, feature, vectors)
