"""Uplift models trained on randomized exposure target the users an offer persuades:
more true incremental conversions than ranking by response rate, and a Qini
coefficient that is positive for uplift scores and about zero for random ones."""

import numpy as np
import pytest

from nextbest.demo.offer_sim import (
    OfferWorld,
    incremental_conversions,
    randomized_exposure,
    sample_users,
)
from nextbest.learn.uplift import (
    UpliftModel,
    auuc,
    fit_logistic,
    fit_uplift,
    qini_coefficient,
    qini_curve,
    top_k,
)

WORLD = OfferWorld()
SEEDS = range(5)
TRAIN, HELD_OUT, K = 6000, 4000, 800  # treat the top 20% of held-out users


@pytest.mark.parametrize("learner", ["x", "t"])
@pytest.mark.parametrize("offer", [0, 1])
def test_uplift_ranking_beats_response_rate_ranking(learner: str, offer: int) -> None:
    for seed in SEEDS:
        users, treated, y = randomized_exposure(WORLD, TRAIN, offer, seed=seed)
        held = sample_users(WORLD, HELD_OUT, seed=1000 + seed)
        model = fit_uplift(users.x, treated, y, learner=learner)  # type: ignore[arg-type]
        by_uplift = incremental_conversions(held, top_k(model.predict_uplift(held.x), K), offer)
        # Response-rate targeting: those most likely to convert when offered it.
        by_response = incremental_conversions(held, top_k(model.predict_treated(held.x), K), offer)
        best = incremental_conversions(held, top_k(held.uplift()[:, offer], K), offer)
        assert by_uplift > 1.1 * by_response, (seed, by_uplift, by_response)
        assert by_uplift > 0.85 * best, (seed, by_uplift, best)


def test_qini_positive_for_uplift_and_near_zero_for_random() -> None:
    rng = np.random.default_rng(0)
    for seed in SEEDS:
        users, treated, y = randomized_exposure(WORLD, TRAIN, 0, seed=seed)
        held, held_t, held_y = randomized_exposure(WORLD, HELD_OUT, 0, seed=2000 + seed)
        model = fit_uplift(users.x, treated, y)
        scores = model.predict_uplift(held.x)
        q_uplift = qini_coefficient(scores, held_t, held_y)
        q_response = qini_coefficient(model.predict_treated(held.x), held_t, held_y)
        q_random = qini_coefficient(rng.random(HELD_OUT), held_t, held_y)
        assert q_uplift > 0.015 and q_uplift > q_response + 0.005
        assert abs(q_random) < 0.3 * q_uplift
        assert qini_coefficient(-scores, held_t, held_y) < -0.015  # worst-first ranks last
        assert auuc(scores, held_t, held_y) > auuc(rng.random(HELD_OUT), held_t, held_y)


def test_qini_curve_endpoints_and_weights() -> None:
    treated = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    y = np.array([1, 0, 0, 1, 1, 0], dtype=float)
    curve = qini_curve(np.arange(6)[::-1], treated, y, n_points=7)
    assert curve.counts.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert curve.qini[0] == 0 and curve.qini[-1] == pytest.approx(2 - 1 * 3 / 3)
    # Uniform weights change nothing; the weighted curve is in weighted units.
    weighted = qini_curve(np.arange(6)[::-1], treated, y, n_points=7, weights=np.full(6, 2.0))
    assert np.allclose(weighted.qini, 2 * curve.qini)


def test_logistic_irls_recovers_coefficients() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20000, 2))
    z = np.hstack([x, np.ones((len(x), 1))])
    beta = np.array([1.5, -0.7, -0.4])
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-z @ beta))).astype(float)
    assert np.allclose(fit_logistic(z, y, l2=1e-6), beta, atol=0.06)


def test_model_round_trips_through_params() -> None:
    users, treated, y = randomized_exposure(WORLD, 2000, 1, seed=4)
    model = fit_uplift(users.x, treated, y, learner="x", basis="linear")
    again = UpliftModel.from_params(dict(model.params()))
    assert np.allclose(again.predict_uplift(users.x), model.predict_uplift(users.x))
    with pytest.raises(ValueError, match="treated and control"):
        fit_uplift(users.x, np.ones(len(y), dtype=bool), y)
