"""The `offer_uplift` and `policy_evaluation` assets: from an empty home they succeed
saying there is no data; on a simulated exploring decision log in Delta they skip rows
without propensities, train uplift models with a positive held-out Qini, and their OPE
intervals cover the simulator's true values of the candidate policies."""

from datetime import UTC, datetime
from typing import Any

import dagster as dg
import numpy as np

from definitions.assets.offer_uplift import read_uplift
from definitions.bandit_log import held_out, read_rounds
from definitions.runs import instance_for, materialize
from nextbest.offer_sim import OfferWorld, decision_records, simulate_log
from nextbest.ope import NO_ACTION
from nextbest.settings import Settings
from storage.delta import DeltaStore, decisions_to_table, feedback_to_table

SELECT = "key:offer_uplift or key:policy_evaluation"
N, MISSING = 8000, 100


def _metadata(settings: Settings, asset: str) -> dict[str, Any]:
    with instance_for(settings) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_empty_home_succeeds_with_no_data(settings: Settings) -> None:
    assert materialize(settings, select=SELECT) is True
    assert _metadata(settings, "offer_uplift")["status"] == "no decisions logged yet"
    assert _metadata(settings, "policy_evaluation")["status"] == "no decisions logged yet"
    DeltaStore.from_settings(settings).ensure_tables()  # empty tables: still no data
    assert materialize(settings, select=SELECT) is True
    assert _metadata(settings, "policy_evaluation")["status"] == "no decisions logged yet"


def test_assets_on_a_simulated_exploring_log(settings: Settings) -> None:
    world = OfferWorld()  # offers named like the demo spec's checkout offers
    log = simulate_log(world, N, seed=11, epsilon=0.5)
    decisions, feedback = decision_records(log, start=datetime(2025, 3, 1, tzinfo=UTC))
    for d in decisions[:MISSING]:  # logged before exploration existed: no propensity
        d["features"].pop("propensity", None)
        for a in d["actions"]:
            a.pop("propensity")
    store = DeltaStore.from_settings(settings)
    store.append("decisions", decisions_to_table(decisions), app_id="sim", batch_version=0)
    store.append("feedback", feedback_to_table(feedback), app_id="sim", batch_version=0)

    assert materialize(settings, select=SELECT) is True
    up = _metadata(settings, "offer_uplift")
    assert up["status"] == "trained" and up["rounds"] == N - MISSING
    for offer in world.offers:
        assert up[f"{offer}/qini"] > 0.005
        assert up[f"{offer}/qini"] > up[f"{offer}/qini_response"]

    ope = _metadata(settings, "policy_evaluation")
    assert ope["skipped_no_propensity"] == MISSING and ope["rounds"] == N - MISSING
    rounds = read_rounds(store)
    assert rounds is not None
    # Delta returns rows in file order: align with the simulator by decision id.
    kept = np.array([int(d.rsplit("-d", 1)[1]) for d in rounds.decision_ids])
    assert sorted(kept.tolist()) == list(range(MISSING, N))
    expected = log.users.expected_rewards()[kept]
    logged_truth = float(np.mean(np.sum(log.probs[kept] * expected, axis=1)))
    greedy_truth = float(np.mean(expected[np.arange(len(kept)), log.scores[kept].argmax(axis=1)]))

    # The uplift target as the asset builds it (on held-out decisions), valued with the
    # hidden truth.
    model = read_uplift(settings.home_dir / "models")
    assert model is not None and set(model.models) == set(world.offers)
    test = held_out(rounds.decision_ids, seed=0, fraction=0.3)  # the split offer_uplift used
    predicted = model.predict([v for v, t in zip(rounds.values, test, strict=True) if t])
    gains = np.column_stack([np.zeros(int(test.sum())), *(predicted[o] for o in world.offers)])
    chosen = expected[test][np.arange(int(test.sum())), gains.argmax(axis=1)]
    uplift_truth = float(np.mean(chosen))
    held_logged = float(np.mean(np.sum(log.probs[kept][test] * expected[test], axis=1)))
    assert uplift_truth > held_logged + 0.02  # the learned uplift policy really is better
    assert abs(ope["uplift/logged_value"] - held_logged) < 0.04

    assert abs(ope["greedy/logged_value"] - logged_truth) < 0.03
    for name, truth in (("greedy", greedy_truth), ("uplift", uplift_truth)):
        # One log, one draw: DR's 95% interval must cover; every estimator must land
        # within 1.5 half-widths (the across-seed coverage is tests/test_ope.py's job).
        assert ope[f"{name}/dr_low"] <= truth <= ope[f"{name}/dr_high"], name
        for method in ("ips", "snips", "dr"):
            low, high = ope[f"{name}/{method}_low"], ope[f"{name}/{method}_high"]
            value = ope[f"{name}/{method}_value"]
            assert abs(value - truth) < 0.75 * (high - low), (name, method, low, truth, high)
    assert ope["uplift/verdict"] in ("better", "unclear")
    assert set(rounds.arms) == {NO_ACTION, *world.offers}
