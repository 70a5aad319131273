"""The per-user online model (`nextbest.learn.online_model`): the Beta-Bernoulli update
with decay, its idempotence, the spec setting, and how the decide path uses it for
offers and item groups. Pure: no stores, no HTTP."""

import itertools
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from nextbest.decide.candidates import UserView, user_view
from nextbest.decide.decision import Assets, DecisionRequest, decide, policy_for_surface
from nextbest.decide.slate import GroupBoosts
from nextbest.learn.online_model import (
    FORGOTTEN,
    MAX_SKEW_MS,
    MEMORY,
    Feedback,
    OnlinePlan,
    OnlineState,
    OnlineView,
    action_target,
    group_target,
)
from nextbest.learn.uplift import OfferUplift, Standardizer, UpliftModel
from nextbest.spec.models import OnlineModel, Policy, Spec

ROOT = Path(__file__).resolve().parents[2]
H = 7 * 86_400_000  # the default half-life, in ms
T0 = 1_740_000_000_000
DEFAULTS = OnlineModel()
OFFER = action_target("free_shipping")


def _state(*records: tuple[str, str, str, int], half_lives: tuple[int, ...] = (H,)) -> OnlineState:
    state = OnlineState()
    state.ensure(half_lives)
    for decision, target, outcome, ts in records:
        state.learn(decision, [target], outcome, ts)
    return state


def _view(state: OnlineState, as_of_ms: int | None = None) -> OnlineView:
    view = OnlineView.parse(state.to_json(), as_of_ms=as_of_ms)
    assert view is not None
    return view


def _mean(state: OnlineState, target: str = OFFER, **kw: Any) -> float:
    found = _view(state, kw.pop("as_of_ms", None)).adjust(target, "x", OnlineModel(**kw))
    assert found is not None
    return found.mean


def test_dismissals_lower_clicks_raise_and_ignored_impressions_nudge() -> None:
    # Prior Beta(1, 1); same-instant evidence is not decayed.
    assert _mean(_state(("d1", OFFER, "dismiss", T0))) == pytest.approx(1 / 3)
    two = _state(("d1", OFFER, "dismiss", T0), ("d2", OFFER, "dismiss", T0))
    found = _view(two).adjust(OFFER, "free_shipping", DEFAULTS)
    assert found is not None
    assert found.mean == pytest.approx(1 / 4) and found.term == pytest.approx(-0.25)
    assert found.reason.startswith("online model: free_shipping dismissed 2x; posterior 0.250")
    assert _mean(_state(("d1", OFFER, "click", T0))) == pytest.approx(2 / 3)
    assert _mean(_state(("d1", OFFER, "conversion", T0))) == pytest.approx(2 / 3)
    assert _mean(_state(("d1", OFFER, "impression", T0))) == pytest.approx(1 / 2.25)
    assert _mean(_state(("d1", OFFER, "impression", T0)), ignored_weight=0) == 0.5
    assert _mean(two, prior=20) == pytest.approx(10 / 22)  # a stronger prior moves less
    assert _view(two).adjust(action_target("other"), "other", DEFAULTS) is None


def test_each_exposure_counts_once_with_its_strongest_outcome_in_any_order() -> None:
    records = [
        ("d1", OFFER, "impression", T0),
        ("d1", OFFER, "click", T0 + 5_000),
        ("d1", OFFER, "click", T0 + 5_000),  # a client retry
        ("d1", OFFER, "dismiss", T0 + 9_000),  # weaker than the click: no change
        ("d2", OFFER, "impression", T0 + 60_000),
        ("d3", OFFER, "dismiss", T0 + 120_000),
        ("d3", OFFER, "impression", T0 + 110_000),
    ]
    results = []
    for order in itertools.permutations(records):
        state = _state(*order)
        assert state.counts[OFFER] == [1, 1, 1]  # taken, dismissed, ignored
        results.append(_mean(state, as_of_ms=T0 + 200_000))  # anchors may differ
    assert results == pytest.approx([results[0]] * len(results), rel=1e-8)  # JSON rounding
    assert results[0] == pytest.approx((1 + 1) / (2 + 1 + 1 + 0.25), rel=1e-4)
    state = _state(*records)
    assert not state.learn("d1", [OFFER], "click", T0 + 5_000)  # nothing to change
    assert not state.learn("d9", [OFFER], "purchase", T0)  # not an outcome


def test_evidence_decays_with_the_half_life_towards_the_prior() -> None:
    state = _state(("d1", OFFER, "click", T0), ("d2", OFFER, "dismiss", T0 + H))
    assert state.anchor_ms == T0 + H
    assert state.sums[H][OFFER] == pytest.approx([0.5, 1.0, 0.0])
    # Read one more half-life later: everything halves again.
    assert _mean(state, as_of_ms=T0 + 2 * H) == pytest.approx((1 + 0.25) / (2 + 0.25 + 0.5))
    much_later = _view(state, as_of_ms=T0 + 60 * H).adjust(OFFER, "x", DEFAULTS)
    assert much_later is not None and abs(much_later.term) < 1e-9
    # The reader never decays backwards (a clock behind the newest feedback).
    assert _mean(state, as_of_ms=T0) == _mean(state)


def test_the_term_is_bounded_and_the_memory_too() -> None:
    state = _state(*((f"d{n}", OFFER, "dismiss", T0 + n) for n in range(MEMORY + 50)))
    assert len(state.exposures) == MEMORY and state.counts[OFFER] == [0, MEMORY + 50, 0]
    for weight in (1.0, 3.0):
        found = _view(state).adjust(OFFER, "x", OnlineModel(weight=weight))
        assert found is not None and -weight / 2 < found.term < -weight / 2 * 0.9
    # A replay of a forgotten exposure is dropped, not counted again.
    before = list(state.sums[H][OFFER])
    assert not state.learn("d0", [OFFER], "dismiss", T0)
    assert not state.learn("d10", [OFFER], "click", T0 + 10)
    assert state.sums[H][OFFER] == before and state.counts[OFFER][1] == MEMORY + 50


def test_a_late_outcome_of_a_forgotten_exposure_is_not_a_second_exposure() -> None:
    state = _state(*((f"d{n}", OFFER, "impression", T0 + n * 1000) for n in range(MEMORY + 50)))
    assert ("d10", OFFER) not in state.exposures and state.counts[OFFER] == [0, 0, MEMORY + 50]
    before = list(state.sums[H][OFFER])
    # d10's conversion carries its own, later ts (after the floor): still d10's exposure.
    assert not state.learn("d10", [OFFER], "conversion", T0 + 400 * 1000)
    assert state.counts[OFFER] == [0, 0, MEMORY + 50] and state.sums[H][OFFER] == before
    assert state.learn("d-new", [OFFER], "conversion", T0 + 400 * 1000)  # a new one counts
    # The digests are bounded too, and a snapshot from before them still restores.
    big = _state(*((f"e{n}", OFFER, "impression", T0 + n) for n in range(MEMORY + FORGOTTEN + 9)))
    assert len(big.forgotten) == FORGOTTEN and len(big.exposures) == MEMORY
    old = pickle.loads(pickle.dumps(state))
    del old.__dict__["forgotten"]
    restored = pickle.loads(pickle.dumps(old))
    assert restored.forgotten == {} and restored.learn("d-other", [OFFER], "click", T0 + 10**6)


def test_a_future_dated_record_is_folded_at_the_clock_and_cannot_freeze_the_model() -> None:
    now, day = T0, 86_400_000
    state = _state()
    state.learn("d-future", [OFFER], "click", now + 365 * day, now_ms=now)  # a bad client clock
    assert state.anchor_ms == now + MAX_SKEW_MS
    for i in range(20):  # the user really dismisses the offer 20 times today
        state.learn(f"d{i}", [OFFER], "dismiss", now + i, now_ms=now + i)
    found = _view(state, as_of_ms=now + day).adjust(OFFER, "x", DEFAULTS)
    assert found is not None and found.term < -0.4
    # Honest timestamps (within the skew) are folded as given.
    state.learn("d-late", [OFFER], "click", now + 2 * day, now_ms=now + 2 * day - MAX_SKEW_MS)
    assert state.anchor_ms == now + 2 * day


def test_a_new_half_life_is_rebuilt_from_the_remembered_exposures() -> None:
    records = [("d1", OFFER, "click", T0), ("d2", "category=toys", "dismiss", T0 + H // 3)]
    both = _state(*records, half_lives=(H, H // 7))
    later = _state(*records)
    later.ensure((H, H // 7))
    for h in (H, H // 7):
        for target, sums in both.sums[h].items():
            assert later.sums[h][target] == pytest.approx(sums)
    later.ensure((H // 7,))
    assert set(later.sums) == {H // 7}


def test_plan_from_the_demo_spec_and_feedback_targets(spec: Spec) -> None:
    plan = OnlinePlan.from_spec(spec)
    assert plan.enabled and plan.half_lives_ms == (H,)
    assert plan.actions == {"free_shipping", "ten_percent_off"}
    assert plan.group_attrs == ("category",)
    fb = Feedback("d1", "u1", "dismiss", "free_shipping", None, T0)
    assert plan.targets(fb, None) == [OFFER]
    assert plan.targets(fb._replace(action_id="made_up"), None) == []
    item = fb._replace(action_id="recommend", item_id="i1")
    assert plan.targets(item, {"category": "toys", "price": 3.0}) == [
        group_target("category", "toys")
    ]
    assert plan.targets(item, None) == []  # not in the catalog
    off = {
        n: p.model_copy(update={"online_model": OnlineModel(enabled=False)})
        for n, p in spec.policies.items()
    }
    assert not OnlinePlan.from_spec(spec.model_copy(update={"policies": off})).enabled


def test_feedback_rows_without_a_user_or_target_teach_nothing() -> None:
    from datetime import UTC, datetime

    row = {"decision_id": "d1", "user_id": "u1", "outcome": "dismiss", "action_id": "a"}
    ts = datetime.fromtimestamp(T0 / 1000, tz=UTC)
    assert Feedback.from_row({**row, "ts": ts}) == Feedback("d1", "u1", "dismiss", "a", None, T0)
    for bad in ({"user_id": None}, {"action_id": None}, {"outcome": "other"}, {"ts": None}):
        assert Feedback.from_row({**row, "ts": ts, **bad}) is None


def test_spec_setting_is_validated() -> None:
    base = {"actions": ["a"], "candidates": [{"source": "popular"}]}
    policy = Policy.model_validate(
        {**base, "online_model": {"weight": 0.5, "half_life": "1d", "prior": 4}}
    )
    assert policy.online_model.half_life.seconds == 86400 and policy.online_model.enabled
    for bad in (
        {"weight": -1},
        {"half_life": "7x"},
        {"prior": 0},
        {"ignored_weight": 2},
        {"learning_rate": 1},
    ):
        with pytest.raises(ValidationError):
            Policy.model_validate({**base, "online_model": bad})


def test_stored_json_round_trips_and_garbage_is_ignored(spec: Spec) -> None:
    state = _state(("d1", OFFER, "dismiss", T0))
    view = user_view(spec, "u1", session={"online_model": state.to_json()}, as_of_ms=T0 + 1)
    assert view.online is not None and view.online.counts[OFFER] == (0, 1, 0)
    for raw in (None, "x", {}, {"half_lives": {"x": {}}}, {"half_lives": {"1": {"t": [1]}}}):
        assert OnlineView.parse(raw) is None
        assert user_view(spec, "u1", session={"online_model": raw}).online is None


def _offers(spec: Spec, user: UserView, policy: Policy | None = None) -> list[Any]:
    surface, _, found, _ = policy_for_surface(spec, "checkout")
    request = DecisionRequest(surface, k=5, context={"device": "mobile"})
    return decide(spec, policy or found, request, user, Assets()).actions


def test_dismissed_offer_falls_below_the_next_one(spec: Spec) -> None:
    features: dict[str, float | None] = {"cart_adds_1h": 1.0, "views_1h": 6.0}
    before = _offers(spec, UserView("u1", features=features))
    assert [a.action_id for a in before] == ["free_shipping", "ten_percent_off"]

    once = _state(("d1", OFFER, "dismiss", T0))
    twice = _state(("d1", OFFER, "dismiss", T0), ("d2", OFFER, "dismiss", T0 + 1))
    after_one = _offers(spec, UserView("u1", features=features, online=_view(once)))
    assert [a.action_id for a in after_one] == ["free_shipping", "ten_percent_off"]
    assert after_one[0].score == pytest.approx(0.5 - 1 / 6, abs=1e-6)
    after = _offers(spec, UserView("u1", features=features, online=_view(twice)))
    assert [a.action_id for a in after] == ["ten_percent_off", "free_shipping"]
    assert after[1].score == pytest.approx(0.25) and after[0].score == pytest.approx(0.3)
    assert any(r.startswith("online model: free_shipping dismissed 2x") for r in after[1].reasons)
    assert not any("online model" in r for r in after[0].reasons)

    _, _, checkout, _ = policy_for_surface(spec, "checkout")
    off = checkout.model_copy(update={"online_model": OnlineModel(enabled=False)})
    unchanged = _offers(spec, UserView("u1", features=features, online=_view(twice)), off)
    assert [a.action_id for a in unchanged] == ["free_shipping", "ten_percent_off"]


def test_item_groups_the_user_dismissed_sink_and_clicked_ones_rise(spec: Spec) -> None:
    cats = ["toys", "books", "garden"]
    attributes = {f"i{n:02d}": {"category": cats[n % 3], "in_stock": True} for n in range(30)}
    trending = [(f"i{n:02d}", 100.0 - n) for n in range(30)]  # i00 (toys) best
    assets = Assets.build(None, attributes, spec=spec)
    surface, _, policy, _ = policy_for_surface(spec, None)
    request = DecisionRequest(surface, k=4)

    def top(user: UserView) -> list[Any]:
        return decide(spec, policy, request, user, assets, trending=trending).actions

    base = top(UserView("u1"))
    assert [attributes[a.item_id or ""]["category"] for a in base][:3] == cats
    state = _state(
        ("d1", "category=toys", "dismiss", T0),
        ("d2", "category=toys", "dismiss", T0),
        ("d3", "category=garden", "click", T0),
    )
    out = top(UserView("u1", online=_view(state)))
    got = [attributes[a.item_id or ""]["category"] for a in out]
    assert "toys" not in got and got[0] == "garden"
    assert [a.score for a in out] == sorted((a.score for a in out), reverse=True)
    assert any("online model: category=garden clicked/converted 1x" in r for r in out[0].reasons)


def test_rerank_equals_a_full_sort_by_adjusted_score() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(0, 30)
        scores = sorted((rng.random() * 2 for _ in range(n)), reverse=True)
        ranked = [(f"i{k}", k, s) for k, s in enumerate(scores)]
        groups = {f"i{k}": {"g": rng.choice("abc")} for k in range(n)}
        state = _state(
            *(
                (f"d{k}", f"g={rng.choice('abc')}", rng.choice(["click", "dismiss"]), T0)
                for k in range(rng.randint(1, 6))
            )
        )
        boosts = GroupBoosts("g", groups, _view(state).groups("g", DEFAULTS))
        got = list(boosts.rerank(iter(ranked)))
        terms = {i: (found.term if (found := boosts.of(i)) else 0.0) for i, _, _ in ranked}
        want = sorted(((i, j, s + terms[i]) for i, j, s in ranked), key=lambda e: -e[2])
        assert [e[2] for e in got] == pytest.approx([e[2] for e in want])
        assert sorted(e[0] for e in got) == sorted(e[0] for e in ranked)
        assert list(GroupBoosts("g", groups, {}).rerank(iter(ranked))) == ranked


def _uplift(effects: dict[str, float]) -> OfferUplift:
    """Constant-effect uplift models over no feature: control converts at 10%."""
    base, models = math.log(0.1 / 0.9), {}
    for offer, effect in effects.items():
        coef = np.array([[base], [base + effect]])
        models[offer] = UpliftModel("t", "linear", Standardizer(np.zeros(0), np.ones(0)), coef, 0.5)
    return OfferUplift((), models, "u-test")


def test_on_uplift_scores_the_online_model_reorders_but_never_hides(spec: Spec) -> None:
    """Uplift ~0.04 and ~0.03: an additive term (-0.056 for one ignored impression)
    would hide both. In uplift units the online model only reorders the offers the
    uplift model shows (what the OPE gate evaluated): none is hidden."""
    features: dict[str, float | None] = {"cart_adds_1h": 1.0, "views_1h": 6.0}
    surface, _, policy, _ = policy_for_surface(spec, "checkout")
    request = DecisionRequest(surface, k=5, context={"device": "mobile"})
    uplift = _uplift({"free_shipping": 0.4, "ten_percent_off": 0.3})

    def offers(state: OnlineState | None) -> list[Any]:
        user = UserView("u1", features=features, online=_view(state) if state else None)
        return decide(spec, policy, request, user, Assets(), uplift=uplift).actions

    base = offers(None)
    assert [a.action_id for a in base] == ["free_shipping", "ten_percent_off"]
    up = {a.action_id: a.score for a in base}
    assert 0.02 < up["ten_percent_off"] < up["free_shipping"] < 0.056
    once = offers(_state(("d1", OFFER, "impression", T0)))
    assert [a.action_id for a in once] == ["free_shipping", "ten_percent_off"]
    assert once[0].score == pytest.approx(up["free_shipping"] * math.exp(1 / 2.25 - 0.5), abs=2e-6)
    dismissed = offers(_state(*((f"d{n}", OFFER, "dismiss", T0) for n in range(20))))
    assert [a.action_id for a in dismissed] == ["ten_percent_off", "free_shipping"]
    assert 0 < dismissed[1].score < up["ten_percent_off"] and dismissed[1].source == "uplift"
    assert "uplift x0.6" in dismissed[1].reasons[-1]
