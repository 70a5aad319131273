"""Cold-start vectors from item text (`nextbest.learn.text`), on small hand-made data
and on the demo simulator, whose titles carry the item's category (its nouns)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from nextbest.decide.candidates import UserView, user_view, vector_dense
from nextbest.decide.decision import Assets, DecisionRequest, decide, policy_for_surface
from nextbest.demo.shop import DemoConfig, generate_items, iter_events
from nextbest.demo.world import CATALOG
from nextbest.learn.model import ItemModel, fit, interaction_matrix
from nextbest.learn.text import join_text, text_factors, text_vectors, tfidf
from nextbest.spec.models import Spec

HELD_OUT = 0.1


def test_tfidf_relates_inflections_and_leaves_empty_texts_empty() -> None:
    m = tfidf(["running sneakers", "white sneaker", "garden hose", None, "", "green hose"])
    sims = (m @ m.T).toarray()
    assert sims[0, 1] > 0.1  # shared character n-grams of sneaker/sneakers
    assert sims[0, 2] == 0.0 and sims[2, 5] > 0.1
    assert m[3].nnz == 0 and m[4].nnz == 0
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms[[0, 1, 2, 5]], 1.0, rtol=1e-5)
    again = tfidf(["running sneakers", "white sneaker", "garden hose", None, "", "green hose"])
    assert abs(m - again).max() == 0  # deterministic: no salted hashing


def test_text_factors_keep_at_most_dim_columns() -> None:
    m = tfidf([f"item {w} number" for w in ("red", "blue", "red", "green", "blue", "green")])
    f = text_factors(m, dim=64)
    assert f.shape[0] == 6 and 1 <= f.shape[1] < 64
    assert text_factors(tfidf([None, None]), dim=8).shape == (2, 0)


def test_a_cold_item_takes_the_vector_its_text_points_to() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    texts: list[str | None] = []
    rows = []
    for n in range(20):
        topic, base = ("tent backpack", a) if n % 2 == 0 else ("frying pan kettle", b)
        texts.append(f"{topic} {n}")
        rows.append(base + 0.1 * rng.standard_normal(8))
    texts += ["big tent 99", "copper kettle 98", None]
    vectors = np.vstack([*rows, np.zeros((3, 8))]).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    known = np.array([True] * 20 + [False] * 3)
    out, filled = text_vectors(vectors, known, texts)
    assert filled.tolist() == [False] * 20 + [True, True, False]
    np.testing.assert_array_equal(out[:20], vectors[:20])
    assert float(out[20] @ a) > float(out[20] @ b) and float(out[21] @ b) > float(out[21] @ a)
    assert not out[22].any()  # no text: left for the group-mean fallback


def test_join_text_skips_missing_attributes() -> None:
    assert join_text({"title": "Pro tent", "blurb": None}, ["title", "blurb"]) == "Pro tent"
    assert join_text({"title": ""}, ["title"]) is None and join_text(None, ["title"]) is None


# --- on the simulator -------------------------------------------------------------


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return generate_items(DemoConfig.small())


@pytest.fixture(scope="module")
def held(items: list[dict[str, Any]]) -> set[str]:
    """A tenth of the catalog never appears in the events: new items with only a title."""
    ids = [i["item_id"] for i in items]
    rng = np.random.default_rng(7)
    return set(rng.choice(ids, size=int(len(ids) * HELD_OUT), replace=False).tolist())


def _fit(spec: Spec, items: list[dict[str, Any]], held: set[str], **kw: Any) -> ItemModel:
    ids = [i["item_id"] for i in items]
    events = [
        e
        for e in iter_events(DemoConfig.small())
        if e.item_id and spec.events[e.type].weight and e.item_id not in held
    ]
    x, _ = interaction_matrix(
        [e.actor for e in events],
        [e.item_id or "" for e in events],
        [spec.events[e.type].weight for e in events],
        item_ids=ids,
    )
    return fit(x, item_ids=ids, params=spec.model, version="t", **kw)


@pytest.fixture(scope="module")
def text_model(spec: Spec, items: list[dict[str, Any]], held: set[str]) -> ItemModel:
    """Trained without the category: what the text alone recovers."""
    texts = [i["title"] for i in items]
    return _fit(spec, items, held, groups=[None] * len(items), texts=texts)


def same_category_rate(model: ItemModel, items: Sequence[dict[str, Any]], held: set[str]) -> float:
    """Share of each held-out item's 10 nearest known items that share its category."""
    cats = np.array([i["category"] for i in items])
    known = np.array([i["item_id"] not in held for i in items]) & (model.popularity > 0)
    v = model.vectors
    rates = []
    for j in np.flatnonzero(~known):
        sims = v[known] @ v[j]
        top = np.argsort(-sims)[:10]
        rates.append(float((cats[known][top] == cats[j]).mean()))
    return float(np.mean(rates))


def test_held_out_items_land_near_their_category(
    spec: Spec, items: list[dict[str, Any]], held: set[str], text_model: ItemModel
) -> None:
    n_cold = int((text_model.popularity == 0).sum())  # the held-out ones and any nobody chose
    assert n_cold >= len(held)
    assert text_model.params["cold_start"] == {
        "from_text": n_cold,
        "text_and_group": 0,
        "from_group": 0,
    }
    cats = [i["category"] for i in items]
    chance = float(np.mean([(np.array(cats) == c).mean() for c in cats]))
    with_text = same_category_rate(text_model, items, held)
    # without text or group every new item gets the same overall-mean vector
    blind = _fit(spec, items, held, groups=[None] * len(items))
    assert blind.params["cold_start"] == {
        "from_text": 0,
        "text_and_group": 0,
        "from_group": n_cold,
    }
    without = same_category_rate(blind, items, held)
    assert with_text > 0.5 and with_text > 4 * chance, (with_text, chance)
    assert with_text > without + 0.3, (with_text, without)


def test_text_fills_only_what_it_can_and_the_group_mean_the_rest(
    spec: Spec, items: list[dict[str, Any]], held: set[str]
) -> None:
    texts = [None if i["item_id"] in held and n % 2 else i["title"] for n, i in enumerate(items)]
    model = _fit(spec, items, held, groups=[i["category"] for i in items], texts=texts)
    cold = model.params["cold_start"]
    assert cold["from_text"] + cold["from_group"] == int((model.popularity == 0).sum())
    assert cold["from_text"] > 0 and cold["text_and_group"] == cold["from_text"]
    assert cold["from_group"] > 0
    assert np.all(np.linalg.norm(model.vectors, axis=1) > 0.99)


def same_noun_rate(model: ItemModel, items: Sequence[dict[str, Any]], held: set[str]) -> float:
    """Like `same_category_rate` for the product noun ("Pro chef knife 12": chef knife),
    a finer topic than the category that only the title knows."""
    nouns = np.array([" ".join(i["title"].split()[1:-1]) for i in items])
    known = np.array([i["item_id"] not in held for i in items]) & (model.popularity > 0)
    rates = []
    for j in np.flatnonzero(~known):
        top = np.argsort(-(model.vectors[known] @ model.vectors[j]))[:10]
        rates.append(float((nouns[known][top] == nouns[j]).mean()))
    return float(np.mean(rates))


def test_text_and_category_together_beat_the_category_mean_inside_the_category(
    spec: Spec, items: list[dict[str, Any]], held: set[str]
) -> None:
    """The category mean puts every new item of a category at the same point; blended
    with the text, new items keep their category and move towards their own product."""
    groups = [i["category"] for i in items]
    both = _fit(spec, items, held, groups=groups, texts=[i["title"] for i in items])
    group_only = _fit(spec, items, held, groups=groups)
    assert same_category_rate(both, items, held) > 0.85
    assert same_noun_rate(both, items, held) > same_noun_rate(group_only, items, held) + 0.05


def _viewer(spec: Spec, viewed: Sequence[str]) -> UserView:
    history = [[item, "view", 1_000_000 - n * 1000] for n, item in enumerate(viewed)]
    session = {"history": history, "seen": {"view": list(viewed)}}
    return user_view(spec, "u1", recent_items=list(viewed), session=session)


def test_a_new_item_is_retrieved_for_users_whose_history_matches_its_title(
    spec: Spec, items: list[dict[str, Any]], held: set[str], text_model: ItemModel
) -> None:
    """A user who viewed items of one category: the vector source retrieves the new
    item of that category, and the decision's pool ranks it above new items of other
    categories whose titles share no word with it (which only the text can tell apart:
    no interactions, no category). "Coastal boots" (shoes) is not unrelated to hiking."""
    by_id = {i["item_id"]: i for i in items}
    assets = Assets.build(text_model, by_id, spec=spec)
    surface, _, policy, _ = policy_for_surface(spec, None)
    checked = 0
    for category in ("hiking", "books", "kitchen", "electronics"):
        new = [i for i in held if by_id[i]["category"] == category]
        words = {w for noun in CATALOG[category][2] for w in noun.split()}
        other = [
            i
            for i in held
            if by_id[i]["category"] != category and not words & set(by_id[i]["title"].split())
        ]
        viewed = [
            i["item_id"]
            for i in items
            if i["category"] == category and i["item_id"] not in held and i["in_stock"]
        ][:5]
        if not new or not viewed:
            continue
        user = _viewer(spec, viewed)
        hits = vector_dense(text_model, user, limit=20, half_life=3_600_000.0)
        assert hits is not None
        retrieved = {text_model.item_ids[j] for j in hits[0]}
        assert retrieved & set(new), (category, [by_id[i]["title"] for i in new])
        out = decide(spec, policy, DecisionRequest(surface, k=10), user, assets)
        pool = out.candidates(n=len(items))
        ranked = list(pool["item_id"])
        new_ranks = [ranked.index(i) for i in new if i in ranked]
        other_ranks = [ranked.index(i) for i in other if i in ranked]
        assert new_ranks, (category, "no new item in the pool")
        assert other_ranks and min(new_ranks) < min(other_ranks), category
        checked += 1
    assert checked >= 3
