"""Re-ranking a candidate list the caller supplies (`candidates` on /v1/decide,
Metarank's `/rank`): the same policy, restricted to those items.

The pool is gathered as usual (every source scores the whole catalogue with a few
vector operations, so restricting afterwards costs nothing extra), then only the
given items may pass: a boolean mask over the model's items, set membership for the
others. Given items no source proposed still rank, after the scored ones, by
popularity (`fill`), so every eligible candidate can be returned. Exclusions, item
rules, diversity and exploration apply unchanged.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from nextbest.decide.pool import Pool
from nextbest.learn.model import ItemModel

Ranked = tuple[str, int | None, float]


def candidate_mask(model: ItemModel | None, allowed: frozenset[str]) -> np.ndarray | None:
    """Which model items are among `allowed` (None without a model)."""
    if model is None:
        return None
    mask = np.zeros(model.n_items, dtype=bool)
    idx = [j for j in map(model.index.get, allowed) if j is not None]
    if idx:
        mask[np.asarray(idx, dtype=np.int64)] = True
    return mask


def known_items(
    ids: list[str], model: ItemModel | None, attributes: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """(ids the API knows: in the model or the catalogue, ids it does not), in order."""
    index = model.index if model is not None else {}
    known: list[str] = []
    unknown: list[str] = []
    for item in dict.fromkeys(ids):
        (known if item in index or item in attributes else unknown).append(item)
    return known, unknown


class Floor:
    """Passes a ranked stream through, remembering the lowest score it yielded."""

    def __init__(self, start: float | None) -> None:
        self.low = start

    def watch(self, stream: Iterator[Ranked]) -> Iterator[Ranked]:
        for entry in stream:
            self.low = entry[2] if self.low is None else min(self.low, entry[2])
            yield entry


def fill(
    allowed: frozenset[str],
    pool: Pool,
    floor: Floor,
    eligible: Callable[[str, int | None], bool],
) -> Iterator[Ranked]:
    """The given items no source proposed, most popular first, scored below everything
    ranked before them (positive, decreasing) and added to the pool so the decision
    log and the reasons show them as `popular`."""
    model = pool.model
    index = model.index if model is not None else {}
    popularity = model.popularity if model is not None else None
    rest: list[tuple[float, str, int | None]] = []
    for item in allowed:
        j = index.get(item)
        if pool.contains(item, j) or not eligible(item, j):
            continue
        pop = float(popularity[j]) if popularity is not None and j is not None else 0.0
        rest.append((pop, item, j))
    rest.sort(key=lambda t: (-t[0], t[1]))
    top = (floor.low if floor.low is not None and floor.low > 0 else 1.0) * 0.5
    n = len(rest)
    for rank, (pop, item, j) in enumerate(rest):
        value = top * (n - rank) / n
        pool.add_extra(item, "popular", value, pop)
        yield item, j, value
