"""`Pool.ordered` against the per-item generator chain it replaced (kept here as the
reference): same items, same order, same scores and the same lowest score, on many
random pools mixing model items, extras, ties, masks and bans."""

import heapq
import random
from collections.abc import Callable, Iterator

import numpy as np

from nextbest.decide.pool import Pool
from nextbest.learn.model import ItemModel

Ranked = tuple[str, int | None, float]


def reference(
    pool: Pool, mask: np.ndarray | None, banned: set[str], keep: Callable[[str], bool]
) -> tuple[list[Ranked], float]:
    ok = pool.total > 0
    if mask is not None and mask.shape == ok.shape:
        ok &= mask
    model = pool.model
    assert model is not None
    banned_idx = [model.index[i] for i in banned if i in model.index]
    if banned_idx:
        ok[banned_idx] = False
    cand = np.flatnonzero(ok)
    order = cand[np.argsort(-pool.total[cand], kind="stable")]

    def dense() -> Iterator[tuple[float, str, int | None]]:
        for j in order.tolist():
            yield float(pool.total[j]), model.item_ids[j], j

    extras = sorted(
        ((p.score, item, None) for item, p in pool.extra.items() if item not in banned),
        key=lambda t: (-t[0], t[1]),
    )
    out: list[Ranked] = []
    floor = 1.0
    for score, item, j in heapq.merge(dense(), iter(extras), key=lambda t: -t[0]):
        if j is not None or keep(item):
            floor = score
            out.append((item, j, score))
    return out, floor


def keeper(hidden: set[str]) -> Callable[[str], bool]:
    return lambda item: item not in hidden


def test_ordered_matches_the_generator_chain_it_replaced() -> None:
    rng = random.Random(7)
    for case in range(300):
        n = rng.randint(0, 40)
        ids = [f"i{j}" for j in range(n)]
        model = ItemModel(
            version="t",
            item_ids=ids,
            weights=np.zeros((n, n), np.float32),
            vectors=np.zeros((n, 2), np.float32),
            popularity=np.zeros(n, np.float32),
        )
        pool = Pool(model)
        levels = [0.25, 0.5, 1.0, rng.random()]  # few distinct values: many ties
        for source in ("item_model", "vector", "trending"):
            if n and rng.random() < 0.8:
                idx = np.asarray(rng.sample(range(n), rng.randint(1, n)), np.int64)
                raw = np.asarray([rng.choice(levels) for _ in idx], np.float32)
                pool.add_dense(source, rng.choice([0.5, 1.0]), idx, raw)
            found = [
                (f"x{rng.randint(0, 15)}", rng.choice(levels)) for _ in range(rng.randint(0, 6))
            ]
            pool.add(source, 1.0, found)
        mask = (
            np.asarray([rng.random() < 0.7 for _ in range(n)], bool) if rng.random() < 0.5 else None
        )
        banned = (
            {rng.choice([*ids, "x1", "x2", "x3"]) for _ in range(rng.randint(0, 4))} if n else set()
        )
        hidden = {f"x{rng.randint(0, 15)}" for _ in range(rng.randint(0, 3))}

        want, want_floor = reference(pool, mask, banned, keeper(hidden))
        stream, low = pool.ordered(mask=mask, banned=banned, keep_extra=keeper(hidden))
        assert list(stream) == want, case
        assert (1.0 if low is None else low) == want_floor, case
        assert (low is None) == (not want), case
