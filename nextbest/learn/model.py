"""The default recommender: EASE (closed-form item-item model), sparse item-kNN beyond
`max_dense_items`, truncated-SVD item vectors for retrieval, attribute-based vectors
for cold-start items.

Scoring takes the user's weighted history at request time, so the real-time path uses
what the user did a second ago with weights learned last night. Training (Dagster) and
serving (the API) share this class; the artifact is one `.npz` file.
"""

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from nextbest.learn.text import text_vectors
from nextbest.spec.models import Model as ModelParams


def interaction_matrix(
    users: Sequence[str],
    items: Sequence[str],
    weights: Sequence[float],
    *,
    item_ids: Sequence[str],
    ts_ms: Sequence[int] | None = None,
    now_ms: int | None = None,
    half_life_ms: float | None = None,
) -> tuple[sp.csr_matrix, list[str]]:
    """(user x item) CSR of summed, optionally time-decayed weights; rows follow the
    order users first appear. log1p damps users who repeat one item many times."""
    index = {item: j for j, item in enumerate(item_ids)}
    user_index: dict[str, int] = {}
    rows, cols, vals = [], [], []
    decay = ts_ms is not None and now_ms is not None and half_life_ms
    for n, (user, item, w) in enumerate(zip(users, items, weights, strict=True)):
        j = index.get(item)
        if j is None or w <= 0:
            continue
        if decay:
            assert ts_ms is not None and now_ms is not None and half_life_ms is not None
            w = w * 0.5 ** (max(0, now_ms - ts_ms[n]) / half_life_ms)
        rows.append(user_index.setdefault(user, len(user_index)))
        cols.append(j)
        vals.append(w)
    shape = (len(user_index), len(item_ids))
    matrix = sp.csr_matrix((np.asarray(vals, np.float64), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data = np.log1p(matrix.data)
    return matrix, list(user_index)


def train_ease(x: sp.csr_matrix, *, l2: float) -> np.ndarray:
    """Steck 2019: B = I - P / diag(P), P = (X'X + l2 I)^-1, diagonal forced to zero."""
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def train_item_knn(x: sp.csr_matrix, *, neighbours: int, block: int = 2048) -> sp.csr_matrix:
    """Cosine item-item similarity keeping the top `neighbours` per item, in column
    blocks so memory stays O(items x block) whatever the catalog size."""
    xc = sp.csc_matrix(x, dtype=np.float32)
    norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel()) + 1e-9
    xn = sp.csc_matrix(xc.multiply(1.0 / norms))
    n = int(xn.shape[1])  # type: ignore[index]
    keep = min(neighbours, max(n - 1, 1))
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = (xn.T @ xn[:, start:stop]).toarray()
        for c in range(stop - start):
            sims[start + c, c] = 0.0
        top = np.argpartition(-sims, keep - 1, axis=0)[:keep] if n > 1 else np.zeros((1, 0), int)
        for c in range(stop - start):
            idx = top[:, c]
            v = sims[idx, c]
            mask = v > 0
            rows.extend(idx[mask])
            cols.extend(np.full(mask.sum(), start + c))
            vals.extend(v[mask])
    return sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n, n))


def item_factors(x: sp.csr_matrix, *, dim: int, seed: int = 0) -> np.ndarray:
    """Truncated SVD item vectors (V * sqrt(S)), L2-normalised for cosine search."""
    n_users, n_items = (int(d) for d in x.shape)  # type: ignore[union-attr]
    k = min(dim, min(n_users, n_items) - 1)
    out = np.zeros((n_items, dim), np.float32)
    if k >= 1 and x.nnz:
        rng = np.random.default_rng(seed)
        v0 = rng.standard_normal(min(n_users, n_items))
        _, s, vt = svds(x.astype(np.float64), k=k, v0=v0)  # type: ignore[misc]
        out[:, :k] = (np.asarray(vt).T * np.sqrt(np.asarray(s))).astype(np.float32)
    return _normalise(out)


def _normalise(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.where(norms > 0, m / np.maximum(norms, 1e-12), m).astype(np.float32)


def cold_start_vectors(
    vectors: np.ndarray,
    known: np.ndarray,
    groups: Sequence[str | None],
    *,
    filled: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Items with no interactions get the mean vector of known items sharing their
    group (e.g. category), else the mean of all known items. Rows in `filled` already
    hold a vector from their text: when their group has known items too, the two are
    averaged, since the group places the item in its neighbourhood and the text tells
    it apart inside it (demo simulator, 10 nearest known items of a held-out item: same
    category 0.94 blended vs 0.69 text alone; same product noun 0.29 vs 0.18 group
    alone). Returns the vectors and the mask of filled rows that were blended."""
    out = vectors.copy()
    blended = np.zeros(len(vectors), bool)
    if not known.any():
        return out, blended
    by_group: dict[str | None, list[int]] = {}
    for j, g in enumerate(groups):
        if known[j]:
            by_group.setdefault(g, []).append(j)
    overall = vectors[known].mean(axis=0)
    for j in np.flatnonzero(~known).tolist():
        members = by_group.get(groups[j])
        if filled is not None and filled[j]:
            if members and groups[j] is not None:
                mean = vectors[np.asarray(members)].mean(axis=0)
                out[j] = vectors[j] + mean / max(float(np.linalg.norm(mean)), 1e-12)
                blended[j] = True
            continue
        out[j] = vectors[np.asarray(members)].mean(axis=0) if members else overall
    return _normalise(out), blended


@dataclass
class ItemModel:
    """A trained model: item-item weights, item vectors, popularity, and provenance."""

    version: str
    item_ids: list[str]
    weights: np.ndarray | sp.csr_matrix
    vectors: np.ndarray
    popularity: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: j for j, item in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def history_vector(self, history: Mapping[str, float]) -> np.ndarray:
        x = np.zeros(self.n_items, np.float32)
        for item, w in history.items():
            j = self.index.get(item)
            if j is not None and w > 0:
                x[j] += math.log1p(w)
        return x

    def score(self, history: Mapping[str, float]) -> np.ndarray:
        """Scores for every item given the user's (fresh) weighted history."""
        x = self.history_vector(history)
        if not x.any():
            return np.zeros(self.n_items, np.float32)
        if isinstance(self.weights, np.ndarray):
            return x @ self.weights
        return np.asarray(self.weights.T @ x).ravel().astype(np.float32)

    def recommend(
        self, history: Mapping[str, float], *, k: int, exclude: Iterable[str] = ()
    ) -> list[tuple[str, float]]:
        scores = self.score(history)
        banned = {self.index[i] for i in exclude if i in self.index}
        banned |= {self.index[i] for i in history if i in self.index}
        return self.top(scores, k=k, banned=banned)

    def popular(self, *, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        banned = {self.index[i] for i in exclude if i in self.index}
        return self.top(self.popularity.astype(np.float32), k=k, banned=banned)

    def top(self, scores: np.ndarray, *, k: int, banned: set[int]) -> list[tuple[str, float]]:
        scores = scores.copy()
        if banned:
            scores[list(banned)] = -np.inf
        k = min(k, self.n_items)
        if k <= 0:
            return []
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        return [(self.item_ids[j], float(scores[j])) for j in idx if np.isfinite(scores[j])]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dense = isinstance(self.weights, np.ndarray)
        arrays: dict[str, Any] = {
            "item_ids": np.asarray(self.item_ids, dtype=object).astype(str),
            "vectors": self.vectors,
            "popularity": self.popularity,
            "meta": np.asarray(json.dumps({"version": self.version, "params": self.params})),
        }
        if dense:
            arrays["weights"] = self.weights
        else:
            w = sp.csr_matrix(self.weights)
            arrays.update(w_data=w.data, w_indices=w.indices, w_indptr=w.indptr)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ItemModel":
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            ids = [str(i) for i in data["item_ids"]]
            if "weights" in data:
                weights: np.ndarray | sp.csr_matrix = data["weights"]
            else:
                n = len(ids)
                weights = sp.csr_matrix(
                    (data["w_data"], data["w_indices"], data["w_indptr"]), shape=(n, n)
                )
            return cls(
                version=meta["version"],
                item_ids=ids,
                weights=weights,
                vectors=data["vectors"],
                popularity=data["popularity"],
                params=meta["params"],
            )


def fit(
    x: sp.csr_matrix,
    *,
    item_ids: Sequence[str],
    groups: Sequence[str | None],
    params: ModelParams,
    version: str,
    vectors: bool = True,
    texts: Sequence[str | None] | None = None,
) -> ItemModel:
    """Train on a (user x item) matrix; EASE while the catalog fits `max_dense_items`,
    sparse item-kNN beyond so memory stays bounded. `vectors=False` skips the item
    vectors (a truncated SVD) for models that only score, such as the evaluation's.
    Items nobody interacted with get vectors from their `texts` (the item's `text: true`
    attributes, see `nextbest.learn.text`) blended with their group's mean, from the
    group's mean alone when they have no text."""
    n_items = len(item_ids)
    if params.kind == "ease" and n_items <= params.max_dense_items:
        weights: np.ndarray | sp.csr_matrix = train_ease(x, l2=params.l2)
        kind = "ease"
    else:
        weights = train_item_knn(x, neighbours=params.neighbours)
        kind = "item_knn"
    popularity = np.diff(sp.csc_matrix(x).indptr).astype(np.float32)  # users per item
    cold: dict[str, int] = {}
    if vectors:
        known = popularity > 0
        item_vectors = item_factors(x, dim=params.dim)
        filled = np.zeros(n_items, bool)
        if texts is not None:
            item_vectors, filled = text_vectors(item_vectors, known, texts)
        item_vectors, blended = cold_start_vectors(item_vectors, known, groups, filled=filled)
        cold = {
            "from_text": int(filled.sum()),
            "text_and_group": int(blended.sum()),
            "from_group": int((~known & ~filled).sum()),
        }
    else:
        item_vectors = np.zeros((n_items, params.dim), np.float32)
    return ItemModel(
        version=version,
        item_ids=list(item_ids),
        weights=weights,
        vectors=item_vectors,
        popularity=popularity,
        params={**params.model_dump(mode="json"), "trained_kind": kind, "cold_start": cold},
    )
