"""Offline ranking metrics and the per-user stratified split of the published protocol.

Pure functions over plain Python / numpy data so the Dagster evaluation asset, the
`nextbest eval` command and the benchmarks compute exactly the same numbers. The
protocol: split each user's interactions 75/25 at random, recommend the top k items
with the user's training items removed, and average over users with at least one
test item. MAP@k divides by min(k, |relevant|) so a perfect list scores 1.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _hits(recommended: Sequence[str], relevant: Iterable[str], k: int) -> list[bool]:
    rel = set(relevant)
    return [item in rel for item in list(recommended)[:k]]


def precision_at_k(recommended: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """Share of the k slots holding a relevant item (a short list is not padded up)."""
    if k <= 0:
        raise ValueError("k must be >= 1")
    return sum(_hits(recommended, relevant, k)) / k


def recall_at_k(recommended: Sequence[str], relevant: Iterable[str], k: int) -> float:
    rel = set(relevant)
    if not rel:
        return 0.0
    return sum(_hits(recommended, rel, k)) / len(rel)


def ndcg_at_k(recommended: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """Binary-relevance nDCG: DCG = sum 1/log2(rank + 1) over hits, over the ideal DCG."""
    rel = set(relevant)
    if not rel:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, hit in enumerate(_hits(recommended, rel, k)) if hit)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
    return dcg / ideal


def average_precision_at_k(recommended: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """AP@k = sum over hit ranks r of precision@r, divided by min(k, |relevant|)."""
    rel = set(relevant)
    if not rel:
        return 0.0
    total, hits = 0.0, 0
    for i, hit in enumerate(_hits(recommended, rel, k)):
        if hit:
            hits += 1
            total += hits / (i + 1)
    return total / min(k, len(rel))


def hit_rate_at_k(recommended: Sequence[str], relevant: Iterable[str], k: int) -> float:
    return 1.0 if any(_hits(recommended, relevant, k)) else 0.0


def coverage(recommendations: Iterable[Sequence[str]], n_items: int, k: int) -> float:
    """Share of the catalog appearing in at least one top-k list."""
    if n_items <= 0:
        return 0.0
    shown: set[str] = set()
    for rec in recommendations:
        shown.update(list(rec)[:k])
    return len(shown) / n_items


def ranking_metrics(
    recommendations: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Iterable[str]],
    *,
    k: int,
    n_items: int,
) -> dict[str, float]:
    """Mean precision/recall/nDCG/MAP@k over users with a relevant item, plus coverage.

    Users without recommendations count as empty lists (all metrics 0), so a model
    cannot look better by skipping users it cannot score.
    """
    users = [u for u, rel in relevant.items() if set(rel)]
    out: dict[str, float] = {
        f"ndcg@{k}": 0.0,
        f"precision@{k}": 0.0,
        f"recall@{k}": 0.0,
        f"map@{k}": 0.0,
        f"coverage@{k}": coverage(recommendations.values(), n_items, k),
        "users": float(len(users)),
    }
    if not users:
        return out
    for user in users:
        rec, rel = list(recommendations.get(user, ())), set(relevant[user])
        out[f"ndcg@{k}"] += ndcg_at_k(rec, rel, k)
        out[f"precision@{k}"] += precision_at_k(rec, rel, k)
        out[f"recall@{k}"] += recall_at_k(rec, rel, k)
        out[f"map@{k}"] += average_precision_at_k(rec, rel, k)
    for name in (f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map@{k}"):
        out[name] /= len(users)
    return out


def split_test_counts(sizes: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test interactions per user: floor(n * fraction), at least 1 once n >= 2, so
    every user keeps at least one training interaction."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n_test = np.floor(sizes * test_fraction).astype(np.int64)
    n_test = np.where((sizes >= 2) & (n_test == 0), 1, n_test)
    return np.minimum(n_test, np.maximum(sizes - 1, 0))


def stratified_split(
    users: Sequence[Any] | np.ndarray, *, test_fraction: float = 0.25, seed: int = 0
) -> np.ndarray:
    """Boolean test mask over interactions: a random `test_fraction` of each user's rows.

    Stratified per user (every user with >= 2 interactions is in both sides) and
    deterministic for a seed, whatever the row order within a user.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    keys = np.asarray(users)
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    _, codes, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    noise = rng.random(n)
    order = np.lexsort((noise, codes))  # by user, random within user
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    mask[:] = rank < split_test_counts(sizes, test_fraction)[codes]
    return mask
