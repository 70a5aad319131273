"""Self-tuning retraining: choose `l2`, `half_life` and the model kind on a time-aware
validation split carved from the training history, then train the winner on all of it.

Why: a fixed 30-day half-life throws away most of a history spanning months, and a
fixed `l2` fits one data size. The validation set is the newest part of the history
(each user's newest events, or everything after a global time cut), so a half-life
wins only if it predicts what users did next. Work is shared across candidates: one
matrix per half-life, and for EASE one eigendecomposition of its Gram matrix serves
every `l2` (G = V diag(w) V^T gives P = (G + l2 I)^-1 = V diag(1/(w + l2)) V^T).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from nextbest.learn.metrics import split_test_counts
from nextbest.learn.model import fit, train_item_knn
from nextbest.spec.models import Duration
from nextbest.spec.models import Model as ModelParams

K = 10
EXTEND_L2 = 3
"""At most this many l2 values beyond the grid (each 3x the last) while the largest wins."""
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Events:
    """Weighted item events as integer codes: the input of the search."""

    users: np.ndarray  # int64 row code per event
    items: np.ndarray  # int64 column (index into the item universe) per event
    weights: np.ndarray  # float64
    ts_ms: np.ndarray  # int64
    n_users: int
    n_items: int

    @classmethod
    def encode(
        cls,
        users: Sequence[Any] | np.ndarray,
        items: Sequence[Any] | np.ndarray,
        weights: Sequence[float] | np.ndarray,
        ts_ms: Sequence[int] | np.ndarray,
        *,
        item_ids: Sequence[str],
    ) -> "Events":
        """Events on items outside `item_ids` or with weight <= 0 are dropped."""
        index = {item: j for j, item in enumerate(item_ids)}
        cols = np.fromiter((index.get(i, -1) for i in items), np.int64, count=len(items))
        w = np.asarray(weights, np.float64)
        keep = (cols >= 0) & (w > 0)
        _, codes = np.unique(np.asarray(users, dtype=object)[keep], return_inverse=True)
        return cls(
            users=codes.astype(np.int64).ravel(),
            items=cols[keep],
            weights=w[keep],
            ts_ms=np.asarray(ts_ms, np.int64)[keep],
            n_users=int(codes.max()) + 1 if codes.size else 0,
            n_items=len(item_ids),
        )

    def select(self, mask: np.ndarray) -> "Events":
        return Events(
            self.users[mask], self.items[mask], self.weights[mask], self.ts_ms[mask],
            self.n_users, self.n_items,
        )  # fmt: skip


def half_life_ms(half_life: str | None) -> float | None:
    return None if half_life is None else Duration(half_life).seconds * 1000


def matrix(ev: Events, *, half_life_ms: float | None, now_ms: int | None = None) -> sp.csr_matrix:
    """(user x item) CSR of summed, time-decayed weights with log1p, exactly as gold
    interactions + `interaction_matrix` build it, but vectorised (one per candidate)."""
    w = ev.weights
    if half_life_ms is not None and len(w):
        now = int(ev.ts_ms.max()) if now_ms is None else now_ms
        w = w * np.power(0.5, np.maximum(0, now - ev.ts_ms) / half_life_ms)
    x = sp.csr_matrix((w, (ev.users, ev.items)), shape=(ev.n_users, ev.n_items))
    x.sum_duplicates()
    x.data = np.log1p(x.data)
    return x


def time_split(ev: Events, *, fraction: float = 0.2, how: str = "user") -> np.ndarray:
    """Boolean validation mask over events. "user": each user's newest `fraction` of
    events (at least one once a user has two); "global": every event at or after the
    (1 - fraction) quantile of time. Ties in time break by input order."""
    n = len(ev.ts_ms)
    if n == 0:
        return np.zeros(0, bool)
    if how == "global":
        cut = np.quantile(ev.ts_ms, 1.0 - fraction)
        return ev.ts_ms >= cut
    if how != "user":
        raise ValueError(f"split must be 'user' or 'global', got {how!r}")
    order = np.lexsort((np.arange(n), ev.ts_ms, ev.users))  # by user, then time
    sizes = np.bincount(ev.users, minlength=ev.n_users)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    n_val = split_test_counts(sizes, fraction)
    return rank >= (sizes - n_val)[ev.users]


@dataclass
class Candidate:
    kind: str
    half_life: str | None
    l2: float | None
    ndcg: float = 0.0
    seconds: float = 0.0

    @property
    def label(self) -> str:
        hl = self.half_life or "none"
        return f"{self.kind} half_life={hl}" + (f" l2={self.l2:g}" if self.l2 else "")

    def as_row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "half_life": self.half_life or "none",
            "l2": self.l2,
            "ndcg@10": round(self.ndcg, 5),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TuneResult:
    """Every candidate's validation nDCG@10, the winner, and the spec's own setting."""

    candidates: list[Candidate]
    best: Candidate
    baseline: Candidate | None
    params: ModelParams
    validation_users: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float | None:
        """Validation nDCG@10 of the winner minus the spec's setting (None if unscored)."""
        return None if self.baseline is None else self.best.ndcg - self.baseline.ndcg

    def summary(self) -> dict[str, Any]:
        return {
            "chosen": {"kind": self.best.kind, "half_life": self.best.half_life or "none",
                       "l2": self.best.l2},
            "validation_ndcg@10": round(self.best.ndcg, 5),
            "spec_validation_ndcg@10": None if self.baseline is None
            else round(self.baseline.ndcg, 5),
            "validation_gain": None if self.gain is None else round(self.gain, 5),
            "validation_users": self.validation_users,
            "notes": self.notes,
            "candidates": len(self.candidates),
            "tuning_seconds": round(self.seconds, 3),
        }  # fmt: skip


def ndcg_of_scores(scores: np.ndarray, seen: sp.csr_matrix, targets: sp.csr_matrix) -> float:
    """Mean binary nDCG@10 of score rows with seen items removed, against target rows."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    r, c = seen.nonzero()
    scores[r, c] = -np.inf
    k = min(K, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, axis=1)
    top = np.take_along_axis(top, np.argsort(-part, axis=1, kind="stable"), axis=1)
    hits = np.asarray(targets[np.arange(scores.shape[0])[:, None], top].todense()) > 0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discounts).sum(axis=1)
    n_rel = np.minimum(np.diff(targets.indptr), k)
    ideal = np.cumsum(discounts)[np.maximum(n_rel - 1, 0)]
    return float(np.mean(np.where(n_rel > 0, dcg / ideal, 0.0))) if len(dcg) else 0.0


def _ease_scores(eig: tuple[np.ndarray, np.ndarray], xv: np.ndarray, l2: float) -> np.ndarray:
    """Scores X_h @ B for EASE at `l2` from G's eigendecomposition; the diagonal of B
    is irrelevant (seen items are masked), so B = -P / diag(P) column-wise suffices."""
    w, v = eig
    d = 1.0 / (w + l2)
    diag_p = (v * v) @ d
    return -((xv * d) @ v.T) / diag_p


def _candidate_grid(params: ModelParams, n_items: int) -> tuple[list, list, list[str], list[str]]:
    tune = params.tune
    assert tune is not None
    half_lives = list(dict.fromkeys([*tune.half_life, params.half_life]))
    l2s = sorted(set([*tune.l2, params.l2]))
    kinds = list(dict.fromkeys([*tune.kinds, params.kind]))
    notes = []
    if "ease" in kinds and n_items > params.max_dense_items:
        kinds = [k for k in kinds if k != "ease"] or ["item_knn"]
        notes.append(f"ease skipped: {n_items} items > max_dense_items")
    return half_lives, l2s, kinds, notes


@dataclass(frozen=True)
class Split:
    """A time-aware split: the training events, and the validation users with the items
    they had seen (masked) and the new items they touched later (the targets)."""

    train: Events
    users: np.ndarray
    seen: sp.csr_matrix
    targets: sp.csr_matrix
    now_ms: int


def most_used_items(ev: Events, mask: np.ndarray, max_items: int) -> tuple[Events, np.ndarray]:
    """`ev` restricted to the `max_items` items with most events under `mask` (columns
    renumbered), and the mask for the kept events."""
    counts = np.bincount(ev.items[mask], minlength=ev.n_items)
    keep = np.sort(np.argsort(-counts, kind="stable")[:max_items])
    column = np.full(ev.n_items, -1, np.int64)
    column[keep] = np.arange(len(keep))
    kept = column[ev.items] >= 0
    sub = Events(ev.users[kept], column[ev.items[kept]], ev.weights[kept], ev.ts_ms[kept],
                 ev.n_users, len(keep))  # fmt: skip
    return sub, kept


def split(
    ev: Events,
    *,
    fraction: float,
    how: str,
    max_users: int,
    max_items: int | None = None,
    seed: int = 0,
) -> Split:
    """The split, on at most `max_items` items (the most used in training: the search's
    cost grows with items cubed, the choice of l2/half-life hardly does)."""
    val = time_split(ev, fraction=fraction, how=how)
    if max_items is not None and ev.n_items > max_items:
        ev, kept = most_used_items(ev, ~val, max_items)
        val = val[kept]
    train = ev.select(~val)
    shape = (ev.n_users, ev.n_items)
    seen = sp.csr_matrix((np.ones(len(train.users)), (train.users, train.items)), shape=shape)
    later = sp.csr_matrix((np.ones(int(val.sum())), (ev.users[val], ev.items[val])), shape=shape)
    seen.sum_duplicates()
    later.sum_duplicates()
    targets = sp.csr_matrix(later - later.multiply(seen > 0))
    targets.eliminate_zeros()
    users = np.flatnonzero((np.diff(targets.indptr) > 0) & (np.diff(seen.indptr) > 0))
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    now = int(train.ts_ms.max()) if len(train.ts_ms) else 0
    return Split(train, users, seen[users], targets[users], now)


def holdout_ndcg(
    ev: Events,
    params: ModelParams,
    *,
    fraction: float = 0.2,
    how: str = "global",
    max_users: int = 100_000,
    seed: int = 0,
) -> tuple[float, int]:
    """nDCG@10 of the model `params` describe (decay, kind, l2 as `fit` trains it) when
    trained on the older part of `ev` and asked for the newer part; and the user count."""
    s = split(ev, fraction=fraction, how=how, max_users=max_users, seed=seed)
    if len(s.users) == 0:
        return 0.0, 0
    x = matrix(s.train, half_life_ms=params.half_life_ms, now_ms=s.now_ms)
    ids = [str(j) for j in range(ev.n_items)]
    model = fit(
        x, item_ids=ids, groups=[None] * ev.n_items, params=params, version="holdout", vectors=False
    )
    product = x[s.users] @ model.weights
    scores = product.toarray() if sp.issparse(product) else np.asarray(product)  # type: ignore[union-attr]
    return ndcg_of_scores(scores, s.seen, s.targets), len(s.users)


def tune(ev: Events, params: ModelParams, *, seed: int = 0) -> TuneResult:
    """Search the spec's space (`params.tune`) on a time-aware split of `ev`; returns the
    winner as full params (kind/l2/half_life replaced) plus every candidate's score."""
    started = time.perf_counter()
    cfg = params.tune
    if cfg is None:
        raise ValueError("tuning is off for this spec (model.tune: false)")
    half_lives, l2s, kinds, notes = _candidate_grid(params, ev.n_items)
    s = split(ev, fraction=cfg.validation_fraction, how=cfg.split, max_users=cfg.max_users,
              max_items=cfg.max_items, seed=seed)  # fmt: skip
    if ev.n_items > cfg.max_items:
        notes.append(f"searched on the {cfg.max_items} most used of {ev.n_items} items")
    if len(s.users) == 0:
        notes.append("no validation users: kept the spec's setting")
        base = Candidate(params.kind, params.half_life, params.l2)
        return TuneResult([], base, None, params, 0, time.perf_counter() - started, notes)
    results: list[Candidate] = []
    for hl in half_lives:
        t0 = time.perf_counter()
        x = matrix(s.train, half_life_ms=half_life_ms(hl), now_ms=s.now_ms)
        xh = x[s.users]
        if "ease" in kinds:
            eig = np.linalg.eigh((x.T @ x).toarray())
            xv = np.asarray(xh @ eig[1])
            shared = time.perf_counter() - t0
            grid = list(l2s)
            for l2 in grid:  # grows while the best l2 is the largest (an extra l2 is cheap)
                t1 = time.perf_counter()
                ndcg = ndcg_of_scores(_ease_scores(eig, xv, l2), s.seen, s.targets)
                took = time.perf_counter() - t1 + shared / len(l2s)
                results.append(Candidate("ease", hl, l2, ndcg, took))
                mine = [c for c in results if c.kind == "ease" and c.half_life == hl]
                top = max(mine, key=lambda c: c.ndcg)
                if l2 == grid[-1] and top.l2 == l2 and len(grid) < len(l2s) + EXTEND_L2:
                    grid.append(l2 * 3)
        if "item_knn" in kinds:
            t1 = time.perf_counter()
            b = train_item_knn(x, neighbours=params.neighbours)
            ndcg = ndcg_of_scores(np.asarray((xh @ b).toarray()), s.seen, s.targets)
            results.append(Candidate("item_knn", hl, None, ndcg, time.perf_counter() - t1))
    best = max(results, key=lambda c: c.ndcg)  # first of equals: the grid's order
    spec_key = (params.kind, params.half_life, params.l2 if params.kind == "ease" else None)
    baseline = next((c for c in results if (c.kind, c.half_life, c.l2) == spec_key), None)
    chosen = params.model_copy(
        update={
            "kind": best.kind,
            "l2": best.l2 if best.l2 is not None else params.l2,
            "half_life": best.half_life,
        }
    )
    return TuneResult(
        results, best, baseline, chosen, len(s.users), time.perf_counter() - started, notes
    )
