"""Item neighbours (Gorse's "similar items"): cosine over the promoted model's item
vectors, held in memory, filtered by the catalogue rules.

The catalogue rules are the `item.*` conditions of the spec's item actions (e.g. "in
stock"): an item a decision could never show is not offered as a neighbour either.
With a model loaded they are the precomputed masks of `Assets`, so a lookup is one
matrix-vector product and an argpartition.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from nextbest.decide import rules
from nextbest.decide.candidates import top_indices
from nextbest.decide.decision import Assets
from nextbest.spec.models import Condition, Spec


def catalogue_rules(spec: Spec) -> list[Condition]:
    """The `item.*` conditions of every item action."""
    return [
        c
        for a in spec.actions.values()
        if a.kind == "item"
        for c in rules.item_rules(a.eligibility.where)
    ]


def passes(spec: Spec, attrs: Mapping[str, Any] | None) -> bool:
    """Does an item with these attributes pass the catalogue rules? Items the catalogue
    does not describe pass only when there are no rules."""
    where = catalogue_rules(spec)
    if not where:
        return True
    return attrs is not None and all(
        rules.compare(c.op, attrs.get(c.attr[5:]), c.value) for c in where
    )


def similar_in_model(
    assets: Assets, spec: Spec, item_id: str, *, k: int
) -> list[tuple[str, float]] | None:
    """The k nearest items to `item_id` (itself excluded) that pass the catalogue rules,
    best first; None when the model is missing or does not know the item."""
    model = assets.model
    if model is None or not model.vectors.size:
        return None
    j = model.index.get(item_id)
    if j is None:
        return None
    scores = (model.vectors @ model.vectors[j]).astype(np.float32)
    ok = np.ones(model.n_items, dtype=bool)
    ok[j] = False
    for name, mask in assets.masks.items():
        if spec.actions[name].kind == "item" and mask.shape == ok.shape:
            ok &= mask
    if not assets.masks and catalogue_rules(spec) and assets.attributes:
        ok &= np.fromiter(
            (passes(spec, assets.attributes.get(i)) for i in model.item_ids),
            dtype=bool,
            count=model.n_items,
        )
    # Shift so every allowed item scores > 0 for top_indices; unshift on the way out.
    shifted = np.where(ok, scores + 2.0, 0.0).astype(np.float32)
    idx, vals = top_indices(shifted, k)
    order = np.argsort(-vals, kind="stable")
    return [(model.item_ids[int(idx[o])], float(vals[o]) - 2.0) for o in order]


def keep_passing(
    spec: Spec,
    attributes: Mapping[str, Mapping[str, Any]],
    hits: Iterable[tuple[str, float]],
    *,
    item_id: str,
    k: int,
) -> list[tuple[str, float]]:
    """Hits from an out-of-memory search (LanceDB) filtered like `similar_in_model`,
    with the in-memory attributes (which include updates made over HTTP)."""
    out: list[tuple[str, float]] = []
    for item, score in hits:
        if item != item_id and passes(spec, attributes.get(item)):
            out.append((item, score))
            if len(out) == k:
                break
    return out
