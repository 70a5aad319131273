"""The pure decision logic (`nextbest.decide.decision`, `nextbest.decide.candidates`,
`nextbest.decide.rules`) on a model trained on the demo shop: no HTTP, no stores."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nextbest.decide import rules
from nextbest.decide.candidates import UserView, history_scores, user_view
from nextbest.decide.decision import Assets, DecisionRequest, Outcome, decide, policy_for_surface
from nextbest.demo.shop import DemoConfig, generate_items, iter_events
from nextbest.learn.model import ItemModel, fit, interaction_matrix
from nextbest.learn.uplift import OfferUplift, Standardizer, UpliftModel
from nextbest.spec.models import Condition, Exploration, Policy, Spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return generate_items(DemoConfig.small())


@pytest.fixture(scope="module")
def model(spec: Spec, items: list[dict[str, Any]]) -> ItemModel:
    ids = [i["item_id"] for i in items]
    events = [
        e for e in iter_events(DemoConfig.small()) if e.item_id and spec.events[e.type].weight
    ]
    x, _ = interaction_matrix(
        [e.actor for e in events],
        [e.item_id or "" for e in events],
        [spec.events[e.type].weight for e in events],
        item_ids=ids,
    )
    groups = [i["category"] for i in items]
    return fit(x, item_ids=ids, groups=groups, params=spec.model, version="t1")


@pytest.fixture(scope="module")
def assets(spec: Spec, model: ItemModel, items: list[dict[str, Any]]) -> Assets:
    return Assets.build(model, {i["item_id"]: i for i in items}, spec=spec)


def _category(items: list[dict[str, Any]], name: str) -> list[str]:
    return [i["item_id"] for i in items if i["category"] == name and i["in_stock"]]


def _viewer(spec: Spec, actor: str, viewed: Sequence[str], **kw: Any) -> UserView:
    history = [[item, "view", 1_000_000 - n * 1000] for n, item in enumerate(viewed)]
    session = {"history": history, "seen": {"view": list(viewed)}, **kw.pop("session", {})}
    return user_view(spec, actor, recent_items=list(viewed), session=session, **kw)


def _run(spec: Spec, assets: Assets, user: UserView, **kw: Any) -> Outcome:
    surface, _, policy, _ = policy_for_surface(spec, kw.pop("surface", None))
    request = DecisionRequest(surface=surface, **kw)
    return decide(spec, policy, request, user, assets)


def test_user_view_sums_event_weights_and_keeps_newest_first(spec: Spec) -> None:
    view = user_view(
        spec,
        "u1",
        session={
            "history": [["a", "purchase", 30], ["b", "view", 20], ["a", "view", 10], ["x"]],
            "seen": {"purchase": ["a"], "view": ["b", "a"]},
        },
    )
    assert view.history == {"a": 6.0, "b": 1.0}  # purchase 5 + view 1
    assert view.recent == [("a", 30), ("b", 20)]
    assert view.seen["purchase"] == ["a"] and view.fresh


def test_history_scores_equal_the_models_dense_score(model: ItemModel, items: list) -> None:
    history = {items[0]["item_id"]: 3.0, items[5]["item_id"]: 1.0, "unknown": 2.0}
    fast = history_scores(model, history)
    assert fast is not None
    np.testing.assert_allclose(fast.scores, model.score(history), rtol=1e-5, atol=1e-6)
    assert history_scores(model, {"unknown": 1.0}) is None


def test_viewing_one_category_brings_that_category(spec: Spec, assets: Assets, items: list) -> None:
    for category in ("hiking", "books"):
        viewed = _category(items, category)[:5]
        out = _run(spec, assets, _viewer(spec, "u1", viewed), k=4)
        assert out.served_from == "realtime"
        cats = [
            next(i["category"] for i in items if i["item_id"] == a.item_id) for a in out.actions
        ]
        assert cats.count(category) >= 3, cats
        assert {"item_model", "vector"} <= set(out.sources)
        assert all(a.reasons and a.action_id == "recommend" for a in out.actions)


def test_candidates_for_the_log_cover_the_chosen_items(
    spec: Spec, assets: Assets, items: list
) -> None:
    hot = [("not-in-model", 99.0)]
    user = _viewer(spec, "u1", _category(items, "toys")[:4])
    surface, _, policy, _ = policy_for_surface(spec, None)
    out = decide(spec, policy, DecisionRequest(surface, k=5), user, assets, trending=hot)
    assert len(out.candidates()["item_id"]) == 50
    logged = out.candidates(1000)
    n = len(logged["item_id"])
    assert n > 50 and len(logged["score"]) == n
    assert logged["score"] == sorted(logged["score"], reverse=True)
    assert {a.item_id for a in out.actions} <= set(logged["item_id"])
    assert all(len(v) == n for v in logged["sources"].values())
    row = logged["item_id"].index("not-in-model")
    assert logged["sources"]["trending"][row] > 0 and logged["sources"]["item_model"][row] == 0


def test_purchased_excluded_and_out_of_stock_never_returned(
    spec: Spec, assets: Assets, items: list
) -> None:
    viewed = _category(items, "hiking")[:6]
    bought = viewed[:3]
    user = _viewer(spec, "u1", viewed, session={"seen": {"purchase": bought, "view": viewed}})
    out = _run(spec, assets, user, k=20, exclude=frozenset({viewed[3]}))
    chosen = [a.item_id for a in out.actions]
    assert chosen and not set(bought) & set(chosen) and viewed[3] not in chosen
    stock = {i["item_id"]: i["in_stock"] for i in items}
    assert all(stock[i] for i in chosen if i is not None)


def test_diversity_caps_items_per_category(spec: Spec, assets: Assets, items: list) -> None:
    out = _run(spec, assets, _viewer(spec, "u1", _category(items, "music")[:8]), k=12)
    cats = [next(i["category"] for i in items if i["item_id"] == a.item_id) for a in out.actions]
    assert len(out.actions) == 12
    assert max(cats.count(c) for c in set(cats)) <= 4  # policy max_per_group


def test_unknown_user_gets_popular_fallback(spec: Spec, assets: Assets) -> None:
    out = _run(spec, assets, UserView(actor="nobody"), k=5)
    assert out.served_from == "fallback" and len(out.actions) == 5
    assert all(a.source == "popular" for a in out.actions)


def test_popular_in_context_follows_an_item_attribute(
    spec: Spec, assets: Assets, items: list
) -> None:
    out = _run(spec, assets, UserView(actor="nobody"), k=3, context={"category": "books"})
    assert [a.item_id for a in out.actions]
    assert all(a.item_id in _category(items, "books") for a in out.actions)


def test_cached_decision_serves_a_user_without_fresh_state(
    spec: Spec, assets: Assets, items: list
) -> None:
    picks = _category(items, "garden")[:3]
    user = UserView(
        actor="u2", cached=[{"item_id": i, "score": 3.0 - n} for n, i in enumerate(picks)]
    )
    out = _run(spec, assets, user, k=3)
    assert out.served_from == "cached"
    assert [a.item_id for a in out.actions] == picks
    assert all(a.source == "cached" for a in out.actions)


def test_degraded_path_skips_realtime_sources(spec: Spec, assets: Assets, items: list) -> None:
    user = _viewer(spec, "u1", _category(items, "hiking")[:5])
    surface, _, policy, _ = policy_for_surface(spec, None)
    out = decide(spec, policy, DecisionRequest(surface, k=5), user, assets, realtime=False)
    assert out.served_from == "fallback" and not {"item_model", "vector"} & set(out.sources)


def test_no_model_still_answers_with_trending(spec: Spec, items: list) -> None:
    bare = Assets.build(None, {i["item_id"]: i for i in items})
    hot = [(i["item_id"], float(50 - n)) for n, i in enumerate(items[:30]) if i["in_stock"]]
    surface, _, policy, _ = policy_for_surface(spec, None)
    user = _viewer(spec, "u1", _category(items, "hiking")[:3])
    out = decide(spec, policy, DecisionRequest(surface, k=4), user, bare, trending=hot)
    assert "item_model: no promoted model loaded" in out.degraded
    assert [a.item_id for a in out.actions] == [i for i, _ in hot[:4]]
    assert out.served_from == "fallback" and out.actions[0].source == "trending"


def test_a_failing_vector_search_degrades_instead_of_failing(spec: Spec, items: list) -> None:
    bare = Assets.build(None, {i["item_id"]: i for i in items})

    def broken(vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        raise ConnectionError("lance unreachable")

    user = user_view(spec, "u1", session_vector=[0.1] * spec.model.dim)
    surface, _, policy, _ = policy_for_surface(spec, None)
    out = decide(spec, policy, DecisionRequest(surface, k=3), user, bare, vector_search=broken)
    assert "vector: ConnectionError" in out.degraded and len(out.actions) == 3


def test_checkout_offers_follow_rules_and_caps(spec: Spec, assets: Assets) -> None:
    features: dict[str, float | None] = {"cart_adds_1h": 2.0, "spend_30d": 10.0, "views_1h": 6.0}
    user = UserView(actor="u3", features=features)
    out = _run(spec, assets, user, surface="checkout", k=5, context={"device": "mobile"})
    assert [a.action_id for a in out.actions] == ["free_shipping", "ten_percent_off"]
    assert all(a.item_id is None and a.title for a in out.actions)
    assert out.served_from == "realtime"
    capped = UserView(actor="u3", features=features, cap_counts={"free_shipping": 1})
    out = _run(spec, assets, capped, surface="checkout", k=5, context={"device": "tv"})
    assert out.actions == []  # free shipping capped, 10% off needs mobile/desktop
    out = _run(spec, assets, UserView(actor="u4"), surface="checkout", k=5)
    assert out.actions == [] and out.served_from == "fallback"


def test_cached_offer_gets_the_cached_weight(spec: Spec, assets: Assets) -> None:
    user = UserView(
        actor="u3",
        features={"cart_adds_1h": 1.0, "views_1h": 9.0},
        cached=[{"action_id": "ten_percent_off"}],
    )
    out = _run(spec, assets, user, surface="checkout", k=2, context={"device": "desktop"})
    assert [a.action_id for a in out.actions] == ["ten_percent_off", "free_shipping"]
    assert out.actions[0].source == "cached" and math.isclose(out.actions[0].score, 1.3)


def test_unknown_surface_falls_back_to_the_default_policy(spec: Spec) -> None:
    assert policy_for_surface(spec, "nope")[:2] == ("default", "default")
    assert policy_for_surface(spec, "nope")[3] is False
    assert policy_for_surface(spec, "checkout")[:2] == ("checkout", "checkout")


@pytest.mark.parametrize(
    ("op", "left", "right", "expected"),
    [
        ("eq", True, True, True),
        ("ne", None, 1, True),
        ("lt", None, 1, False),
        ("gte", 5.0, 5, True),
        ("lt", "a", 1, False),
        ("in", "mobile", ["mobile", "desktop"], True),
        ("not_in", None, ["mobile"], True),
        ("in", None, ["mobile"], False),
    ],
)
def test_compare(op: str, left: Any, right: Any, expected: bool) -> None:
    assert rules.compare(op, left, right) is expected


def test_missing_counting_feature_is_zero_and_others_none(spec: Spec) -> None:
    assert rules.user_value(spec, "cart_adds_1h", {}) == 0.0
    assert rules.user_value(spec, "mean_rating_30d", {}) is None
    ok, reasons = rules.check(
        spec,
        [Condition(attr="user.spend_30d", op="lt", value=50)],
        item=None,
        user={},
        context={},
    )
    assert ok and reasons == ["user.spend_30d lt 50 (is 0.0)"]


# --- exploration with logged propensities, uplift ranking ------------------------------


def _exploring(spec: Spec, surface: str | None, strategy: str, epsilon: float) -> Policy:
    _, _, policy, _ = policy_for_surface(spec, surface)
    return policy.model_copy(
        update={"exploration": Exploration(strategy=strategy, epsilon=epsilon)}  # type: ignore[arg-type]
    )


def _shopper(spec: Spec, **features: float) -> UserView:
    values = {"cart_adds_1h": 1.0, "views_1h": 7.0, "spend_30d": 10.0, **features}
    return user_view(spec, "u-shop", features=values)


def test_epsilon_greedy_logs_exact_propensities(spec: Spec, assets: Assets, items: list) -> None:
    eps = 0.2
    policy = _exploring(spec, None, "epsilon_greedy", eps)
    user = _viewer(spec, "u1", _category(items, "hiking")[:5])
    explored = 0
    for seed in range(60):
        out = decide(spec, policy, DecisionRequest("default", k=5, seed=seed), user, assets)
        arms = out.arms
        n = len(arms)
        assert n == 20 and math.isclose(sum(a["propensity"] for a in arms), 1.0)
        assert math.isclose(arms[0]["propensity"], 1 - eps + eps / n)
        assert all(math.isclose(a["propensity"], eps / n) for a in arms[1:])
        first = out.actions[0]
        logged = next(a for a in arms if a["item_id"] == first.item_id)
        assert all(a.propensity == logged["propensity"] for a in out.actions)  # the slate's
        assert len(out.actions) == 5 and len({a.item_id for a in out.actions}) == 5
        if first.item_id != arms[0]["item_id"]:
            explored += 1
            assert any(r.startswith("exploration: epsilon_greedy explored") for r in first.reasons)
    assert 3 <= explored <= 25  # about eps * (n - 1) / n of 60


def test_no_exploration_logs_propensity_one(spec: Spec, assets: Assets, items: list) -> None:
    user = _viewer(spec, "u1", _category(items, "books")[:5])
    outs = [_run(spec, assets, user, k=4, seed=seed) for seed in range(5)]
    assert all(o.actions == outs[0].actions for o in outs)  # nothing random without it
    out = outs[0]
    assert all(a.propensity == 1.0 for a in out.actions)
    assert [a["propensity"] for a in out.arms] == [1.0] + [0.0] * (len(out.arms) - 1)
    assert out.arms[0]["item_id"] == out.actions[0].item_id


def test_same_seed_replays_the_same_choice(spec: Spec, assets: Assets, items: list) -> None:
    user = _viewer(spec, "u1", _category(items, "toys")[:4])
    for strategy in ("epsilon_greedy", "thompson"):
        policy = _exploring(spec, None, strategy, 0.5)
        firsts = set()
        for seed in (11, 12, 13, 14, 15, 16, 17, 18):
            request = DecisionRequest("default", k=4, seed=seed)
            a, b = (decide(spec, policy, request, user, assets) for _ in range(2))
            assert a.actions == b.actions and a.arms == b.arms
            assert math.isclose(sum(x["propensity"] for x in a.arms), 1.0)
            chosen = next(x for x in a.arms if x["item_id"] == a.actions[0].item_id)
            assert chosen["propensity"] > 0 and a.actions[0].propensity == chosen["propensity"]
            firsts.add(a.actions[0].item_id)
        assert len(firsts) > 1, strategy  # different decision ids do explore


def test_exploring_offer_surface_shows_one_arm_or_none(spec: Spec, assets: Assets) -> None:
    eps = 0.6
    policy = _exploring(spec, "checkout", "epsilon_greedy", eps)
    shown: dict[str, int] = {}
    for seed in range(80):
        request = DecisionRequest("checkout", k=3, context={"device": "mobile"}, seed=seed)
        out = decide(spec, policy, request, _shopper(spec), assets)
        arms = {a["action_id"]: a["propensity"] for a in out.arms}
        assert set(arms) == {"free_shipping", "ten_percent_off", "none"}
        assert math.isclose(sum(arms.values()), 1.0)
        assert math.isclose(arms["free_shipping"], 1 - eps + eps / 3)  # priority 0.5 wins
        assert out.propensity_none is not None and math.isclose(out.propensity_none, eps / 3)
        assert len(out.actions) <= 1
        name = out.actions[0].action_id if out.actions else "none"
        if out.actions:
            assert out.actions[0].propensity == arms[name]
        shown[name] = shown.get(name, 0) + 1
    assert set(shown) == {"free_shipping", "ten_percent_off", "none"}


def _uplift(effects: dict[str, float], names: Sequence[str]) -> OfferUplift:
    """Offer uplift models with a constant effect: control converts at 10%, treated at
    sigmoid(logit(0.1) + effect)."""
    d = len(names)
    std = Standardizer(np.zeros(d), np.ones(d))
    base = math.log(0.1 / 0.9)
    models = {}
    for offer, effect in effects.items():
        coef = np.zeros((2, d + 1))
        coef[0, -1], coef[1, -1] = base, base + effect
        models[offer] = UpliftModel("t", "linear", std, coef, 0.5)
    return OfferUplift(tuple(names), models, "u-test")


def test_offers_ranked_by_uplift_when_a_model_exists(spec: Spec, assets: Assets) -> None:
    request = DecisionRequest("checkout", k=3, context={"device": "mobile"})
    _, _, policy, _ = policy_for_surface(spec, "checkout")
    user = _shopper(spec)
    by_priority = decide(spec, policy, request, user, assets)
    assert [a.action_id for a in by_priority.actions] == ["free_shipping", "ten_percent_off"]
    assert all(
        "ranking: priority (no uplift model loaded)" in a.reasons for a in by_priority.actions
    )

    uplift = _uplift({"free_shipping": 0.1, "ten_percent_off": 1.0}, ["views_1h", "spend_30d"])
    out = decide(spec, policy, request, user, assets, uplift=uplift)
    assert [a.action_id for a in out.actions] == ["ten_percent_off", "free_shipping"]
    predicted = uplift.predict([user.values])
    for a in out.actions:
        assert a.source == "uplift" and math.isclose(
            a.score, predicted[a.action_id][0], abs_tol=1e-6
        )
        assert any(r.startswith("uplift: predicted +") for r in a.reasons)
    assert "uplift" in out.sources

    hurts = _uplift({"free_shipping": -0.5, "ten_percent_off": 0.4}, ["views_1h"])
    out = decide(spec, policy, request, user, assets, uplift=hurts)
    assert [a.action_id for a in out.actions] == ["ten_percent_off"]  # costs conversions: hidden
    assert {a["action_id"] for a in out.arms} == {"free_shipping", "ten_percent_off", "none"}
