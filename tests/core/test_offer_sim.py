"""The offer simulator's truth is self-consistent: hidden types match their
probabilities, exact policy values match realized outcomes, the exploring logger
records valid propensities, and its decision log has the layout the assets read."""

from datetime import UTC, datetime

import numpy as np
import pytest

from nextbest.demo.offer_sim import (
    FEATURES,
    TYPES,
    OfferWorld,
    action_probabilities,
    decision_records,
    incremental_conversions,
    logging_scores,
    policy_value,
    sample_users,
    simulate_log,
    type_shares,
    uplift_policy,
)
from nextbest.learn.ope import NO_ACTION
from nextbest.learn.uplift import top_k
from storage.delta.schemas import decisions_to_table, feedback_to_table

WORLD = OfferWorld()


def test_hidden_types_follow_their_probabilities_and_definitions() -> None:
    users = sample_users(WORLD, 40000, seed=1)
    for offer in range(len(WORLD.offers)):
        probs = users.type_probabilities(offer)
        assert np.allclose(probs.sum(axis=1), 1.0)
        shares = type_shares(users, [offer])
        for k, name in enumerate(TYPES):
            assert shares[name] == pytest.approx(probs[:, k].mean(), abs=0.01)
        # Every type is present in a meaningful share: the ranking problem is real.
        assert min(shares.values()) > 0.05
        t = users.types[:, offer]
        none, offered = (
            users.outcomes(np.zeros(users.n, int)),
            users.outcomes(np.full(users.n, offer + 1)),
        )
        assert np.all(offered[t == 0] == 1) and np.all(none[t == 0] == 0)  # persuadable
        assert np.all(offered[t == 1] == 1) and np.all(none[t == 1] == 1)  # sure thing
        assert np.all(offered[t == 2] == 0) and np.all(none[t == 2] == 0)  # lost cause
        assert np.all(offered[t == 3] == 0) and np.all(none[t == 3] == 1)  # do not disturb
    # Heavy spenders are put off by offers; most others are helped on average.
    spend = users.raw[:, FEATURES.index("spend_30d")]
    heavy = spend > np.quantile(spend, 0.9)
    assert users.uplift()[heavy, 0].mean() < 0 < users.uplift()[~heavy, 0].mean()
    # Response rate and uplift disagree: the top by response rate holds more users who
    # convert anyway (sure thing) or are put off (do not disturb) than the top by uplift.
    probs = users.type_probabilities(0)
    by_response = top_k(users.expected_rewards()[:, 1], 8000)
    by_uplift = top_k(users.uplift()[:, 0], 8000)
    wasted = probs[:, [1, 3]].sum(axis=1)
    assert wasted[by_response].mean() > wasted[by_uplift].mean() + 0.1


def test_exact_values_match_realized_outcomes() -> None:
    users = sample_users(WORLD, 50000, seed=2)
    policy = uplift_policy(users.uplift())
    realized = users.outcomes(policy.argmax(axis=1)).mean()
    assert policy_value(users, policy) == pytest.approx(realized, abs=0.01)
    treat = np.zeros(users.n, bool)
    treat[:20000] = True
    caused = (
        users.outcomes(np.where(treat, 1, 0)).sum() - users.outcomes(np.zeros(users.n, int)).sum()
    )
    assert incremental_conversions(users, treat, 0) == pytest.approx(caused, rel=0.1)
    assert policy_value(users, policy) > policy_value(users, np.eye(3)[np.zeros(users.n, int)])


def test_logging_policies_record_valid_propensities() -> None:
    users = sample_users(WORLD, 3000, seed=3)
    scores = logging_scores(WORLD, users)
    eps = action_probabilities(scores, "epsilon_greedy", epsilon=0.3)
    assert np.allclose(eps.sum(axis=1), 1) and eps.min() == pytest.approx(0.1)
    assert np.allclose(eps.max(axis=1), 0.8)
    ts = action_probabilities(scores, "thompson", epsilon=0.1, noise=0.1, seed=1)
    assert np.allclose(ts.sum(axis=1), 1) and ts.min() >= 0.1 / 3 - 1e-12
    assert np.mean(ts.argmax(axis=1) == scores.argmax(axis=1)) > 0.95  # exploits mostly
    log = simulate_log(WORLD, 20000, seed=4, epsilon=0.3)
    assert np.bincount(log.actions, minlength=3).min() > 2000  # every arm explored
    chosen_greedy = log.actions == log.scores.argmax(axis=1)
    assert chosen_greedy.mean() == pytest.approx(0.8, abs=0.02)
    again = simulate_log(WORLD, 20000, seed=4, epsilon=0.3)
    assert np.array_equal(again.actions, log.actions)  # seeded: the same log every time


def test_decision_records_have_the_logged_layout() -> None:
    log = simulate_log(WORLD, 200, seed=5, epsilon=0.5)
    decisions, feedback = decision_records(log, start=datetime(2025, 3, 1, tzinfo=UTC))
    assert len(decisions) == 200 and decisions_to_table(decisions).num_rows == 200
    assert feedback_to_table(feedback).num_rows == len(feedback)
    conversions = {f["decision_id"] for f in feedback if f["outcome"] == "conversion"}
    assert len(conversions) == int(log.rewards.sum())
    for i, d in enumerate(decisions):
        arm = WORLD.arms[int(log.actions[i])]
        if arm == NO_ACTION:
            assert d["actions"] == [] and d["features"]["propensity"] == log.probs[i, 0]
        else:
            assert d["actions"][0]["action_id"] == arm
            assert d["actions"][0]["propensity"] == pytest.approx(log.propensities[i])
        assert [c["action_id"] for c in d["candidates"]] == list(WORLD.arms)
        assert set(d["features"]["values"]) == set(FEATURES)
