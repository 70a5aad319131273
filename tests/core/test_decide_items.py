"""Pure parts of the catalogue routes: item update validation, the attribute overlay
of `Assets`, re-ranking given candidates and item neighbours (no HTTP, no stores)."""

from typing import Any

import numpy as np
import pytest

from nextbest.decide.candidates import user_view
from nextbest.decide.catalog import validate_item_updates
from nextbest.decide.decision import Assets, DecisionRequest, decide, policy_for_surface
from nextbest.decide.rerank import known_items
from nextbest.decide.similar import similar_in_model
from nextbest.demo.shop import DemoConfig, generate_items
from nextbest.ingest.limits import Limits
from nextbest.learn.model import ItemModel
from nextbest.spec.models import Condition, Spec


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return generate_items(DemoConfig.small())


def _model(items: list[dict[str, Any]]) -> ItemModel:
    """Two clusters of unit vectors: items 0-9 and 10-19; popularity by index."""
    ids = [i["item_id"] for i in items[:20]]
    rng = np.random.default_rng(0)
    base = np.eye(4, dtype=np.float32)
    vectors = np.stack([base[0 if j < 10 else 1] + 0.1 * rng.random(4) for j in range(20)])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    weights = np.zeros((20, 20), dtype=np.float32)
    popularity = np.arange(20, 0, -1, dtype=np.float32)
    return ItemModel("t", ids, weights, vectors, popularity)


def _price_spec(spec: Spec) -> Spec:
    """The demo spec with `item.price lt 100` added to the recommend action."""
    action = spec.actions["recommend"]
    where = [*action.eligibility.where, Condition(attr="item.price", op="lt", value=100)]
    eligibility = action.eligibility.model_copy(update={"where": where})
    actions = {**spec.actions, "recommend": action.model_copy(update={"eligibility": eligibility})}
    return spec.model_copy(update={"actions": actions})


def test_updates_are_validated_one_by_one(spec: Spec) -> None:
    ok, bad = validate_item_updates(
        [
            {"item_id": "a", "attributes": {"price": 3, "in_stock": False}},
            {"item_id": "a", "attributes": {"price": 4.5}},
            {"item_id": "b", "attributes": {"price": True}},
            {"item_id": "c", "attributes": {"price": 1e300 * 10}},
            {"item_id": "d", "attributes": {"title": "x" * 5000}},
            {"item_id": "e", "attributes": {"category": None}},
        ],
        spec,
        Limits(),
    )
    assert ok == {"a": {"price": 4.5, "in_stock": False}, "e": {"category": None}}
    assert [(r.index, r.item_id) for r in bad] == [(2, "b"), (3, "c"), (4, "d")]
    assert bad[0].reason == "attributes.price: must be a number (float)"


def test_with_attributes_recomputes_only_changed_items(
    spec: Spec, items: list[dict[str, Any]]
) -> None:
    priced = _price_spec(spec)
    model = _model(items)
    attrs = {i["item_id"]: {**i, "price": 10.0, "in_stock": True} for i in items[:20]}
    assets = Assets.build(model, attrs, spec=priced)
    assert assets.masks["recommend"].all()
    first, second = model.item_ids[0], model.item_ids[1]
    updated = assets.with_attributes(
        {first: {"price": 500.0}, second: {"in_stock": False}, "new": {"price": 1.0}},
        spec=priced,
    )
    mask = updated.masks["recommend"]
    assert not mask[0] and not mask[1] and mask[2:].all()
    assert assets.masks["recommend"].all()  # the old object is untouched
    assert updated.attributes[first]["price"] == 500.0
    assert updated.attributes[first]["category"] == attrs[first]["category"]
    assert updated.attributes["new"] == {"price": 1.0}
    # The next decision honours the new price.
    surface, _, policy, _ = policy_for_surface(priced, None)
    view = user_view(priced, "u")
    request = DecisionRequest(surface=surface, k=20)
    before = [a.item_id for a in decide(priced, policy, request, view, assets).actions]
    after = [a.item_id for a in decide(priced, policy, request, view, updated).actions]
    assert first in before and first not in after and second not in after


def test_given_candidates_all_rank_most_popular_first(
    spec: Spec, items: list[dict[str, Any]]
) -> None:
    model = _model(items)
    assets = Assets.build(model, {i["item_id"]: i for i in items[:20]}, spec=spec)
    stocked = [i for i in model.item_ids if assets.attributes[i]["in_stock"]]
    given = frozenset(stocked[-3:])
    surface, _, policy, _ = policy_for_surface(spec, None)
    request = DecisionRequest(surface=surface, k=10, candidates=given)
    out = decide(spec, policy, request, user_view(spec, "u"), assets)
    ids = [a.item_id for a in out.actions]
    assert ids == sorted(given, key=model.index.__getitem__)  # popularity falls by index
    scores = [a.score for a in out.actions]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    empty = DecisionRequest(surface=surface, k=10, candidates=frozenset())
    assert decide(spec, policy, empty, user_view(spec, "u"), assets).actions == []
    assert known_items(["x", stocked[0], "x"], model, {}) == ([stocked[0]], ["x"])


def test_similar_in_model_excludes_self_and_ineligible(
    spec: Spec, items: list[dict[str, Any]]
) -> None:
    model = _model(items)
    attrs = {i: {"in_stock": True} for i in model.item_ids}
    attrs[model.item_ids[3]] = {"in_stock": False}
    assets = Assets.build(model, attrs, spec=spec)
    hits = similar_in_model(assets, spec, model.item_ids[0], k=9)
    assert hits is not None and len(hits) == 9
    ids = [i for i, _ in hits]  # the cluster of 10 minus itself and item 3, then another
    assert set(ids[:8]) == set(model.item_ids[1:10]) - {model.item_ids[3]}
    assert ids[8] in model.item_ids[10:]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert similar_in_model(assets, spec, "unknown", k=3) is None
