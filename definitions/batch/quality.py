"""How good a model is: the split protocol and the temporal replay, without I/O.

Shared by the `model_evaluation` asset and `nextbest eval`. Both train with
`nextbest.learn.model.fit` (the production trainer) on data the model must not have seen,
then score with the matrix form of `ItemModel.score`, so an offline number describes
the model that serving loads.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from definitions.batch.history import Interactions, aggregate_pairs, decayed
from nextbest.learn.metrics import hit_rate_at_k, ranking_metrics, stratified_split
from nextbest.learn.model import ItemModel, fit, interaction_matrix
from nextbest.spec.models import Model as ModelParams

SCORE_BATCH = 2048


def scored_top_k(
    model: ItemModel, x: sp.csr_matrix, *, k: int, allowed: np.ndarray | None = None
) -> list[list[tuple[str, float]]]:
    """Top-k (item, score) per row of a (users x items) history matrix, with the row's
    own items and items outside `allowed` removed. Ties (e.g. a history of unknown
    items scores all zero) break towards popular items."""
    out: list[list[tuple[str, float]]] = []
    k = min(k, model.n_items)
    pop = model.popularity.astype(np.float32)
    tie = 1e-6 * pop / pop.max() if pop.size and pop.max() > 0 else np.zeros_like(pop)
    for start in range(0, x.shape[0], SCORE_BATCH):  # type: ignore[index]
        block = sp.csr_matrix(x[start : start + SCORE_BATCH])
        product = block @ model.weights
        dense = product.toarray() if sp.issparse(product) else product  # type: ignore[union-attr]
        scores = np.asarray(dense, dtype=np.float32) + tie
        rows, cols = block.nonzero()
        scores[rows, cols] = -np.inf
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        out.extend(_top(scores, k, model.item_ids))
    return out


def top_k_rows(model: ItemModel, x: sp.csr_matrix, *, k: int) -> list[list[str]]:
    return [[i for i, _ in row] for row in scored_top_k(model, x, k=k)]


def popular_rows(popularity: np.ndarray, x: sp.csr_matrix, item_ids: Sequence[str], *, k: int):
    """The popularity baseline: the most popular items each user has not seen."""
    out: list[list[str]] = []
    for start in range(0, x.shape[0], SCORE_BATCH):  # type: ignore[index]
        block = sp.csr_matrix(x[start : start + SCORE_BATCH])
        scores = np.tile(popularity.astype(np.float32), (block.shape[0], 1))  # type: ignore[index]
        rows, cols = block.nonzero()
        scores[rows, cols] = -np.inf
        out.extend([[i for i, _ in row] for row in _top(scores, min(k, len(item_ids)), item_ids)])
    return out


def _top(scores: np.ndarray, k: int, item_ids: Sequence[str]) -> list[list[tuple[str, float]]]:
    if k <= 0 or scores.shape[1] == 0:
        return [[] for _ in range(scores.shape[0])]
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    part = np.take_along_axis(part, order, axis=1)
    return [
        [(str(item_ids[j]), float(s)) for j, s in zip(row, srow, strict=True) if np.isfinite(s)]
        for row, srow in zip(idx.tolist(), part.tolist(), strict=True)
    ]


def promotion_decision(
    new_ndcg: float, current_ndcg: float | None, *, tolerance: float
) -> tuple[bool, str]:
    """Promote unless nDCG@10 drops by more than `tolerance` below the promoted model."""
    if current_ndcg is None:
        return True, "no promoted model yet"
    floor = current_ndcg - tolerance
    if new_ndcg >= floor:
        return True, f"ndcg@10 {new_ndcg:.4f} >= {current_ndcg:.4f} - {tolerance:g}"
    return False, f"ndcg@10 {new_ndcg:.4f} < {current_ndcg:.4f} - {tolerance:g} (regression)"


def evaluate_split(
    users: np.ndarray,
    items: np.ndarray,
    weights: np.ndarray,
    *,
    item_ids: Sequence[str],
    groups: Sequence[str | None],
    params: ModelParams,
    k: int = 10,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, float]:
    """Random stratified split of (user, item) pairs per user; train on 75%, rank the
    catalog minus each user's training items, score against the held-out 25%."""
    test = stratified_split(users, test_fraction=test_fraction, seed=seed)
    train = ~test
    x, row_users = interaction_matrix(
        users[train].tolist(), items[train].tolist(), weights[train].tolist(), item_ids=item_ids
    )
    model = fit(
        x, item_ids=item_ids, groups=groups, params=params, version="evaluation", vectors=False
    )
    relevant: dict[str, set[str]] = {}
    for user, item in zip(users[test].tolist(), items[test].tolist(), strict=True):
        relevant.setdefault(user, set()).add(item)
    row_of = {u: i for i, u in enumerate(row_users)}
    evaluated = [u for u in relevant if u in row_of]
    sub = sp.csr_matrix(x[[row_of[u] for u in evaluated]]) if evaluated else x[:0]
    recs = dict(zip(evaluated, top_k_rows(model, sub, k=k), strict=True))
    pops = dict(zip(evaluated, popular_rows(model.popularity, sub, item_ids, k=k), strict=True))
    metrics = ranking_metrics(recs, relevant, k=k, n_items=len(item_ids))
    baseline = ranking_metrics(pops, relevant, k=k, n_items=len(item_ids))
    metrics["popular_ndcg@10" if k == 10 else f"popular_ndcg@{k}"] = baseline[f"ndcg@{k}"]
    metrics["train_pairs"] = float(train.sum())
    metrics["test_pairs"] = float(test.sum())
    return metrics


def temporal_replay(
    events: Interactions,
    *,
    item_ids: Sequence[str],
    groups: Sequence[str | None],
    params: ModelParams,
    k: int = 10,
    cutoff_quantile: float = 0.8,
    max_events: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Train before a cut-off, then walk the later events in time order: was the item of
    each event in the top-k (a) cached at the cut-off, (b) computed from the user's
    history up to that event? Events on items already in the user's history, or
    unknown to the model, are not targets (both sides would exclude them).
    """
    n = len(events)
    if n < 10:
        return {"replay_events": 0, f"hr@{k}_cached": 0.0, f"hr@{k}_realtime": 0.0}
    order = np.argsort(events.ts_ms, kind="stable")
    ev = events.select(order)
    cut = int(np.quantile(ev.ts_ms, cutoff_quantile))
    before = ev.ts_ms < cut
    half_life_ms = params.half_life_ms
    pairs = aggregate_pairs(
        ev.actors[before],
        ev.items[before],
        decayed(ev.weights[before], ev.ts_ms[before], now_ms=cut, half_life_ms=half_life_ms),
        ev.ts_ms[before],
    )
    x, _ = interaction_matrix(
        pairs.column("user_id").to_pylist(),
        pairs.column("item_id").to_pylist(),
        pairs.column("weight").to_pylist(),
        item_ids=item_ids,
    )
    model = fit(x, item_ids=item_ids, groups=groups, params=params, version="replay", vectors=False)
    at_cut: dict[str, dict[str, float]] = {}
    for user, item, w in _rows(ev, before):
        hist = at_cut.setdefault(user, {})
        hist[item] = hist.get(item, 0.0) + w
    after = np.flatnonzero(~before)
    rng = np.random.default_rng(seed)
    pick = rng.random(len(after)) < min(1.0, max_events / max(len(after), 1))
    popular = [i for i, _ in model.popular(k=k)]
    # Walk the events once, keeping what each target's two rankings need; rank them all
    # at once afterwards (one sparse product instead of a dense one per event).
    bases: dict[str, dict[str, float]] = {}
    snapshots: list[dict[str, float]] = []
    targets_of: list[tuple[str, str]] = []
    live: dict[str, dict[str, float]] = {}
    for j, i in enumerate(after.tolist()):
        user, item, w = ev.actors[i], ev.items[i], float(ev.weights[i])
        hist = live.get(user)
        if hist is None:
            hist = live[user] = dict(at_cut.get(user, {}))
        if pick[j] and item not in hist and item in model.index:
            if user not in bases:
                bases[user] = at_cut.get(user, {})
            snapshots.append(dict(hist))
            targets_of.append((user, item))
        hist[item] = hist.get(item, 0.0) + w
    cached = dict(zip(bases, _rank_histories(model, list(bases.values()), popular, k), strict=True))
    now = _rank_histories(model, snapshots, popular, k)
    targets = len(targets_of)
    hits_cached = sum(int(hit_rate_at_k(cached[u], {i}, k)) for u, i in targets_of)
    hits_live = sum(
        int(hit_rate_at_k(r, {i}, k)) for r, (_, i) in zip(now, targets_of, strict=True)
    )
    return {
        "replay_events": targets,
        "replay_cutoff_ms": cut,
        f"hr@{k}_cached": hits_cached / targets if targets else 0.0,
        f"hr@{k}_realtime": hits_live / targets if targets else 0.0,
    }


def _rank_histories(
    model: ItemModel, histories: Sequence[Mapping[str, float]], popular: list[str], k: int
) -> list[list[str]]:
    """`model.recommend(history, k=k)` for each history (popular items for an empty
    one), as one sparse product: the rows are `ItemModel.history_vector`s."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for r, hist in enumerate(histories):
        for item, w in hist.items():
            j = model.index.get(item)
            if j is not None and w > 0:
                rows.append(r)
                cols.append(j)
                vals.append(math.log1p(w))
    shape = (len(histories), model.n_items)
    x = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=shape)
    ranked = top_k_rows(model, x, k=k)
    return [r if hist else popular for r, hist in zip(ranked, histories, strict=True)]


def _rows(ev: Interactions, mask: np.ndarray):
    return zip(
        ev.actors[mask].tolist(), ev.items[mask].tolist(), ev.weights[mask].tolist(), strict=True
    )


def markdown_report(metrics: Mapping[str, Any]) -> str:
    """A metrics table with text bars: a plot that needs no plotting library."""
    lines = ["| metric | value | |", "|---|---:|---|"]
    for name, value in metrics.items():
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            bar = "█" * round(value * 40)
            lines.append(f"| {name} | {value:.4f} | `{bar}` |")
        else:
            lines.append(f"| {name} | {value} | |")
    return "\n".join(lines)
