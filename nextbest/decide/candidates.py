"""Candidate sources of a decision, pure and in memory.

Each source turns what the API already holds (the promoted `ItemModel`, item vectors,
trending counts, the user's cached decision) into `(item_id, raw score)` pairs; the
ranking in `nextbest.decide.decision` normalises and blends them with the policy's weights.

Why the vector source prefers the model's own item vectors over the stored session
vector: every training run's SVD has its own basis (rotations, sign flips), so a
session vector the stream built from an older run's vectors is not comparable with
the promoted model's vectors. The mean of the user's recent items, taken in the
promoted model's space, always is. The stored session vector is used only with a
LanceDB search, whose item vectors come from the same Dagster run the stream reads.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextbest.features.state import SessionState
from nextbest.learn.model import ItemModel
from nextbest.learn.online_model import OnlineView
from nextbest.spec.models import SessionVectorFeature, Spec

VectorSearch = Callable[[np.ndarray, int], list[tuple[str, float]]]
"""Out-of-memory nearest-item search (LanceDB) used when no model is loaded."""

DEFAULT_HALF_LIFE_MS = 30 * 60 * 1000


@dataclass(frozen=True, slots=True)
class UserView:
    """What the decision knows about one user, read from the online store."""

    actor: str
    history: dict[str, float] = field(default_factory=dict)
    recent: list[tuple[str, int]] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=dict)
    session_vector: np.ndarray | None = None
    features: dict[str, float | None] = field(default_factory=dict)
    cached: list[dict[str, Any]] = field(default_factory=list)
    cached_version: str | None = None
    cap_counts: dict[str, int] = field(default_factory=dict)
    values: dict[str, float | None] = field(default_factory=dict)
    """Every online feature value, grouped ones as `name[group]`: the inputs of the
    uplift model and what the decision log records in `features["values"]`."""
    online: OnlineView | None = None
    """The user's online model (`SessionState.online_model`), learned from feedback."""

    @property
    def fresh(self) -> bool:
        """True when the stream has seen this user do something."""
        return bool(self.history) or self.session_vector is not None


def user_view(
    spec: Spec,
    actor: str,
    *,
    recent_items: Sequence[Any] = (),
    session: SessionState | Mapping[str, Any] | None = None,
    session_vector: Sequence[float] | None = None,
    features: Mapping[str, float | None] | None = None,
    cached: Sequence[Mapping[str, Any]] = (),
    cached_version: str | None = None,
    cap_counts: Mapping[str, int] | None = None,
    values: Mapping[str, float | None] | None = None,
    as_of_ms: int | None = None,
) -> UserView:
    """Build a `UserView` from the stream's typed state (`nextbest.features.state`,
    docs/architecture.md#user-state; a plain dict is read as a version-0 row): `history`
    ([item_id, event_type, ts_ms], newest first) becomes {item: sum of event weights};
    `online_model` is read as of `as_of_ms` (its feedback decays until then)."""
    state = SessionState.load(session)
    events = spec.events
    history: dict[str, float] = {}
    recent: dict[str, int] = {}
    for item, kind, ts_ms in state.history:
        declared = events.get(kind)
        if declared is None or declared.weight <= 0:
            continue
        history[item] = history.get(item, 0.0) + declared.weight
        if item not in recent:
            recent[item] = ts_ms
    if not history:  # no session history: the last_n feature still says what they touched
        for item in recent_items:
            if isinstance(item, str):
                history.setdefault(item, 1.0)
                recent.setdefault(item, 0)
    seen = state.seen
    vector = None if session_vector is None else np.asarray(session_vector, dtype=np.float32)
    return UserView(
        actor=actor,
        history=history,
        recent=list(recent.items()),
        seen=seen,
        session_vector=vector,
        features=dict(features or {}),
        cached=[dict(a) for a in cached],
        cached_version=cached_version,
        cap_counts=dict(cap_counts or {}),
        values=dict(values) if values is not None else dict(features or {}),
        online=OnlineView.parse(state.online_model, as_of_ms=as_of_ms),
    )


@dataclass(frozen=True, slots=True)
class HistoryScores:
    """Item-model scores for one history, kept so the chosen items can be explained."""

    scores: np.ndarray
    items: list[str]
    x: np.ndarray
    rows: Any  # weights[idx]: dense ndarray or CSR rows

    def because(
        self, model: ItemModel, item_ids: list[str], *, top: int = 2
    ) -> dict[str, list[str]]:
        """Per item, the history items that contributed most to its score (one
        vectorised pass over the chosen items)."""
        cols = [model.index[i] for i in item_ids if i in model.index]
        if not cols:
            return {}
        block = self.rows[:, cols]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        contrib = self.x[:, None] * block  # (history, chosen)
        take = min(top, contrib.shape[0])
        best = np.argsort(-contrib, axis=0)[:take]
        out: dict[str, list[str]] = {}
        chosen = [i for i in item_ids if i in model.index]
        for c, item in enumerate(chosen):
            out[item] = [self.items[h] for h in best[:, c].tolist() if contrib[h, c] > 0]
        return out


def history_scores(model: ItemModel, history: Mapping[str, float]) -> HistoryScores | None:
    """`ItemModel.score` computed from the history's rows only: O(|history| x items)
    instead of a dense (items x items) product, which is what keeps it sub-millisecond."""
    index = model.index
    known = [(index[i], i, w) for i, w in history.items() if w > 0 and i in index]
    if not known:
        return None
    idx = np.fromiter((k[0] for k in known), dtype=np.int64, count=len(known))
    x = np.log1p(np.fromiter((k[2] for k in known), dtype=np.float32, count=len(known)))
    rows = model.weights[idx]
    if isinstance(rows, np.ndarray):
        scores = x @ rows
    else:
        scores = np.asarray(rows.T @ x).ravel().astype(np.float32)
    return HistoryScores(scores=scores, items=[k[1] for k in known], x=x, rows=rows)


def top_indices(scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `limit` best positive scores (unordered)."""
    n = scores.shape[0]
    limit = min(limit, n)
    if limit <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    idx = np.argpartition(-scores, limit - 1)[:limit] if limit < n else np.arange(n)
    vals = scores[idx]
    keep = vals > 0
    return idx[keep], vals[keep]


def top_positive(model: ItemModel, scores: np.ndarray, limit: int) -> list[tuple[str, float]]:
    """The `limit` best items with a positive score, best first."""
    idx, vals = top_indices(scores, limit)
    order = np.argsort(-vals, kind="stable")
    return [(model.item_ids[j], float(vals[o])) for o, j in zip(order, idx[order], strict=True)]


def half_life_ms(spec: Spec) -> float:
    for feature in spec.features.values():
        if isinstance(feature, SessionVectorFeature):
            return feature.half_life.seconds * 1000
    return DEFAULT_HALF_LIFE_MS


def recent_query(model: ItemModel, user: UserView, *, half_life: float) -> np.ndarray | None:
    """Time-decayed mean of the user's recent items in the model's vector space.
    Items without a timestamp (from `recent_items` only) decay by position."""
    index = model.index
    known = [(index[i], ts, pos) for pos, (i, ts) in enumerate(user.recent[:50]) if i in index]
    if not known:
        return None
    n = len(known)
    idx = np.fromiter((k[0] for k in known), dtype=np.int64, count=n)
    ts = np.fromiter((k[1] for k in known), dtype=np.float64, count=n)
    pos = np.fromiter((k[2] for k in known), dtype=np.float64, count=n)
    age = np.where(ts > 0, ts.max() - ts, pos * half_life / 4)
    w = np.exp2(-np.maximum(age, 0) / half_life).astype(np.float32)
    query = w @ model.vectors[idx] / w.sum()
    norm = float(np.linalg.norm(query))
    return None if norm <= 0 else (query / norm).astype(np.float32)


def vector_dense(
    model: ItemModel, user: UserView, *, limit: int, half_life: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Nearest items to the user's recent items, in memory (cosine: vectors are unit)."""
    if not model.vectors.size:
        return None
    query = recent_query(model, user, half_life=half_life)
    if query is None:
        return None
    return top_indices(model.vectors @ query, limit)


def vector_search_candidates(
    user: UserView, *, limit: int, search: VectorSearch
) -> list[tuple[str, float]]:
    """LanceDB search with the stream's session vector (no model loaded)."""
    if user.session_vector is None:
        return []
    return [(i, s) for i, s in search(user.session_vector, limit) if s > 0]


def cached_candidates(user: UserView, *, limit: int) -> list[tuple[str, float]]:
    """The batch side's precomputed items; rank-based when they carry no score."""
    out: list[tuple[str, float]] = []
    n = len(user.cached)
    for rank, action in enumerate(user.cached[:limit]):
        item = action.get("item_id")
        if not isinstance(item, str):
            continue
        score = action.get("score")
        value = float(score) if isinstance(score, int | float) and score > 0 else (n - rank) / n
        out.append((item, value))
    return out


def popular_in_context(
    popular: Sequence[tuple[str, float]],
    attributes: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any],
    *,
    attribute_names: Sequence[str],
    limit: int,
) -> list[tuple[str, float]]:
    """Popular items restricted to the request's context when it names an item
    attribute (e.g. `{"category": "shoes"}` on a category page); unrestricted when
    that leaves nothing."""
    wanted = {k: v for k, v in context.items() if k in attribute_names and v is not None}
    if wanted:
        matching = [
            (item, score)
            for item, score in popular
            if all((attributes.get(item) or {}).get(k) == v for k, v in wanted.items())
        ]
        if matching:
            return matching[:limit]
    return list(popular[:limit])
