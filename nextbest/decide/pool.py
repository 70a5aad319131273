"""The candidate pool of one decision: dense numpy arrays over the model's items plus a
small dict for items the model does not know (a cached pick, a trending newcomer).

Why arrays: blending, static eligibility (a mask precomputed per model load) and
ordering then cost a few vector operations whatever the catalog size, and Python only
touches the handful of items actually inspected for the top k. That is what keeps the
decision itself well under a millisecond.
"""

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextbest.learn.model import ItemModel


@dataclass(slots=True)
class Pooled:
    """Blend of one item outside the model's index."""

    score: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    raw: dict[str, float] = field(default_factory=dict)


class Pool:
    def __init__(self, model: ItemModel | None) -> None:
        self.model = model
        n = model.n_items if model is not None else 0
        self.total = np.zeros(n, dtype=np.float32)
        self.parts: dict[str, np.ndarray] = {}
        self.raw: dict[str, np.ndarray] = {}
        self.extra: dict[str, Pooled] = {}

    def __len__(self) -> int:
        return int(np.count_nonzero(self.total)) + len(self.extra)

    def add_dense(self, source: str, weight: float, idx: np.ndarray, raw: np.ndarray) -> bool:
        """Model-indexed candidates; raw scores are normalised by the source's best.
        False when the source brought nothing."""
        if idx.size == 0:
            return False
        best = float(raw.max())
        if best <= 0:
            return False
        contrib = (weight * np.clip(raw / best, 0.0, None)).astype(np.float32)
        self._array(self.parts, source)[idx] += contrib
        self._array(self.raw, source)[idx] = raw
        self.total[idx] += contrib
        return True

    def add(self, source: str, weight: float, found: list[tuple[str, float]]) -> bool:
        """Candidates given by item id (trending, cached, popular, LanceDB)."""
        best = max((s for _, s in found), default=0.0)
        if best <= 0:
            return False
        index = self.model.index if self.model is not None else {}
        dense: list[int] = []
        dense_raw: list[float] = []
        for item, raw in found:
            j = index.get(item)
            if j is not None:
                dense.append(j)
                dense_raw.append(raw)
                continue
            contribution = weight * max(raw / best, 0.0)
            entry = self.extra.get(item)
            if entry is None:
                entry = self.extra[item] = Pooled()
            entry.parts[source] = entry.parts.get(source, 0.0) + contribution
            entry.raw[source] = raw
            entry.score += contribution
        if dense:
            idx = np.asarray(dense, dtype=np.int64)
            raw_arr = np.asarray(dense_raw, dtype=np.float32)
            contrib = (weight * np.clip(raw_arr / best, 0.0, None)).astype(np.float32)
            np.add.at(self._array(self.parts, source), idx, contrib)
            self._array(self.raw, source)[idx] = raw_arr
            np.add.at(self.total, idx, contrib)
        return True

    def contains(self, item: str, j: int | None) -> bool:
        return (j is not None and bool(self.total[j] > 0)) or item in self.extra

    def add_extra(self, item: str, source: str, value: float, raw: float) -> None:
        """One already-blended item (the popular fill), so the decision log shows it."""
        j = self.model.index.get(item) if self.model is not None else None
        if j is None:
            self.extra[item] = Pooled(score=value, parts={source: value}, raw={source: raw})
            return
        self._array(self.parts, source)[j] += value
        self._array(self.raw, source)[j] = raw
        self.total[j] += value

    def _array(self, store: dict[str, np.ndarray], source: str) -> np.ndarray:
        arr = store.get(source)
        if arr is None:
            arr = store[source] = np.zeros(self.total.shape[0], dtype=np.float32)
        return arr

    def ordered(
        self,
        *,
        mask: np.ndarray | None,
        banned: set[str],
        keep_extra: Callable[[str], bool] | None = None,
    ) -> tuple[Iterator[tuple[str, int | None, float]], float | None]:
        """((item_id, model index or None, score) best first, for items with a positive
        blend that pass `mask` and are not banned, extras passing `keep_extra` merged in
        by score; the last (lowest) score, None when empty). The dense part is a C-level
        zip over precomputed lists: no Python frame per item on the request path."""
        ok = self.total > 0
        if mask is not None and mask.shape == ok.shape:
            ok &= mask
        model = self.model
        if model is not None and banned:
            banned_idx = [model.index[i] for i in banned if i in model.index]
            if banned_idx:
                ok[banned_idx] = False
        cand = np.flatnonzero(ok)
        order = cand[np.argsort(-self.total[cand], kind="stable")].tolist()
        ids = model.item_ids if model is not None else []
        scores = self.total[order].tolist() if order else []
        dense = zip(map(ids.__getitem__, order), order, scores, strict=True)
        extras = sorted(
            (
                (item, None, p.score)
                for item, p in self.extra.items()
                if item not in banned and (keep_extra is None or keep_extra(item))
            ),
            key=lambda t: (-t[2], t[0]),
        )
        lows = [v[-1] for v in (scores, [e[2] for e in extras]) if v]
        floor = min(lows) if lows else None
        if not extras:
            return dense, floor
        return heapq.merge(dense, iter(extras), key=lambda t: -t[2]), floor

    def explain(self, item: str, j: int | None) -> Pooled:
        """Per-source contributions and raw scores of one item."""
        if j is None:
            return self.extra.get(item) or Pooled()
        parts = {s: float(a[j]) for s, a in self.parts.items() if a[j] > 0}
        raw = {s: float(self.raw[s][j]) for s in parts}
        return Pooled(score=float(self.total[j]), parts=parts, raw=raw)

    def top(self, n: int) -> dict[str, Any]:
        """The n best candidates, columnar (decision log): `item_id` and `score` lists
        and, per source, each candidate's contribution (0 when it did not propose it).
        Columnar because it is built for every decision: numpy slices, no per-item dicts."""
        nz = np.flatnonzero(self.total > 0)
        keep = nz[np.argsort(-self.total[nz], kind="stable")[:n]] if nz.size else nz
        ids = self.model.item_ids if self.model is not None else []
        out_ids = [ids[j] for j in keep.tolist()]
        scores = _logged(self.total[keep])
        sources = {s: _logged(a[keep]) for s, a in self.parts.items()}
        extras = sorted(self.extra.items(), key=lambda kv: -kv[1].score)[:n]
        for item, p in extras:
            out_ids.append(item)
            scores.append(round(p.score, 6))
            for s in set(sources) | set(p.parts):
                part = round(p.parts.get(s, 0.0), 6)
                sources.setdefault(s, [0.0] * (len(out_ids) - 1)).append(part)
        if extras:
            order = sorted(range(len(scores)), key=lambda r: -scores[r])[:n]
            out_ids = [out_ids[r] for r in order]
            scores = [scores[r] for r in order]
            sources = {s: [v[r] for r in order] for s, v in sources.items()}
        return {"item_id": out_ids, "score": scores, "sources": sources}


def _logged(values: np.ndarray) -> list[float]:
    """Rounded to 6 places like logged action scores: a float32 read as a float64 has a
    17-digit repr, which made the decision log's pool about half of its record."""
    return values.astype(np.float64).round(6).tolist()
