"""The `offer_uplift`, `policy_evaluation` and `offer_policy` assets: from an empty home
they succeed saying there is no data; on a simulated exploring decision log in Delta
they skip rows without propensities, train uplift models with a positive held-out
Qini, and their OPE intervals cover the simulator's true values of the candidate
policies. The OPE gate serves a candidate only when its paired DR difference from the
current policy (the logged one with exploration off, then the served model) is above
0: an inverted, truly worse candidate is rejected and the API keeps serving what it
served; a candidate that could not be estimated (too few rows, too little coverage) is
served by gate `off` alone; a pointer from before the registry passes its check."""

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import dagster as dg
import numpy as np
import pytest

from definitions.assets.offer_policy import gate_decision, read_registry
from definitions.assets.offer_uplift import (
    UPLIFT_CANDIDATE,
    UPLIFT_POINTER,
    read_uplift,
    save_candidate,
)
from definitions.assets.policy_evaluation import NOT_ESTIMATED, gate_report
from definitions.batch.bandit_log import Rounds, held_out, read_rounds
from definitions.runs import instance_for, materialize
from nextbest.demo.offer_sim import OfferLog, OfferWorld, decision_records, simulate_log
from nextbest.learn.ope import NO_ACTION
from nextbest.learn.uplift import OfferUplift
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.runtime import ServingRuntime
from storage.delta.store import DeltaStore, decisions_to_table, feedback_to_table

SELECT = "key:offer_uplift or key:policy_evaluation or key:offer_policy"
GATE = "key:policy_evaluation or key:offer_policy"
N, MISSING = 8000, 100
GATE_N = 16_000
"""The gate test's log: the learned candidate beats the greedy current policy by ~0.035
in truth, which the paired DR interval separates from 0 only with ~4800 held-out rows."""


def _metadata(settings: Settings, asset: str) -> dict[str, Any]:
    with instance_for(settings) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _check(settings: Settings, name: str) -> tuple[bool, dict[str, Any]]:
    """(passed, metadata) of the latest evaluation of `offer_policy`'s check `name`."""
    key = dg.AssetCheckKey(dg.AssetKey("offer_policy"), name)
    with instance_for(settings) as instance:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        evaluation = record.evaluation
        assert evaluation is not None
        return evaluation.passed, {k: v.value for k, v in evaluation.metadata.items()}


def _write_log(
    settings: Settings, *, missing: int, n: int = N
) -> tuple[OfferWorld, OfferLog, DeltaStore]:
    """An exploring (epsilon 0.5) response-rate policy's log in Delta; the first
    `missing` decisions are logged without propensities."""
    world = OfferWorld()  # offers named like the demo spec's checkout offers
    log = simulate_log(world, n, seed=11, epsilon=0.5)
    decisions, feedback = decision_records(log, start=datetime(2025, 3, 1, tzinfo=UTC))
    for d in decisions[:missing]:  # logged before exploration existed: no propensity
        d["features"].pop("propensity", None)
        for a in d["actions"]:
            a.pop("propensity")
    store = DeltaStore.from_settings(settings)
    store.append("decisions", decisions_to_table(decisions), app_id="sim", batch_version=0)
    store.append("feedback", feedback_to_table(feedback), app_id="sim", batch_version=0)
    return world, log, store


def _truth(model: OfferUplift, rounds: Rounds, log: OfferLog) -> tuple[float, float, float]:
    """True values of ranking offers by `model`, of the (exploring) logging policy and
    of that policy with exploration off, all on the decisions the assets hold out (the
    split `offer_uplift` and OPE use)."""
    kept = np.array([int(d.rsplit("-d", 1)[1]) for d in rounds.decision_ids])
    expected = log.users.expected_rewards()[kept]
    test = held_out(rounds.decision_ids, seed=0, fraction=0.3)
    predicted = model.predict([v for v, t in zip(rounds.values, test, strict=True) if t])
    gains = np.column_stack([np.zeros(int(test.sum())), *(predicted[o] for o in log.world.offers)])
    chosen = expected[test][np.arange(int(test.sum())), gains.argmax(axis=1)]
    logged = np.sum(log.probs[kept][test] * expected[test], axis=1)
    greedy = expected[test][np.arange(int(test.sum())), log.scores[kept][test].argmax(axis=1)]
    return float(np.mean(chosen)), float(np.mean(logged)), float(np.mean(greedy))


def _inverted(model: OfferUplift, version: str) -> OfferUplift:
    """The same X-learners with the sign of every predicted uplift flipped (both effect
    models negated): a policy that shows each offer to the users it puts off."""
    assert all(m.learner == "x" for m in model.models.values())
    flipped = {
        o: replace(m, coef=np.vstack([m.coef[:2], -m.coef[2:]])) for o, m in model.models.items()
    }
    return OfferUplift(model.feature_names, flipped, version)


def test_empty_home_succeeds_with_no_data(settings: Settings) -> None:
    assert materialize(settings, select=SELECT) is True
    assert _metadata(settings, "offer_uplift")["status"] == "no decisions logged yet"
    assert _metadata(settings, "policy_evaluation")["status"] == "no decisions logged yet"
    assert _metadata(settings, "offer_policy")["status"] == "no candidate trained yet"
    assert not (settings.home_dir / "models" / UPLIFT_POINTER).exists()
    DeltaStore.from_settings(settings).ensure_tables()  # empty tables: still no data
    assert materialize(settings, select=SELECT) is True
    assert _metadata(settings, "policy_evaluation")["status"] == "no decisions logged yet"


def test_assets_on_a_simulated_exploring_log(settings: Settings) -> None:
    world, log, store = _write_log(settings, missing=MISSING)

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
    model = read_uplift(settings.home_dir / "models", UPLIFT_CANDIDATE)
    assert model is not None and set(model.models) == set(world.offers)
    uplift_truth, held_logged, _ = _truth(model, rounds, log)
    assert uplift_truth > held_logged + 0.02  # the learned uplift policy really is better
    assert abs(ope["uplift/logged_value"] - held_logged) < 0.04

    assert abs(ope["greedy/logged_value"] - logged_truth) < 0.03
    for name, truth in (("greedy", greedy_truth), ("uplift", uplift_truth)):
        # One log, one draw: DR's 95% interval must cover; every estimator must land
        # within 1.5 half-widths (the across-seed coverage is tests/core/test_ope.py's job).
        assert ope[f"{name}/dr_low"] <= truth <= ope[f"{name}/dr_high"], name
        for method in ("ips", "snips", "dr"):
            low, high = ope[f"{name}/{method}_low"], ope[f"{name}/{method}_high"]
            value = ope[f"{name}/{method}_value"]
            assert abs(value - truth) < 0.75 * (high - low), (name, method, low, truth, high)
    assert ope["uplift/verdict"] in ("better", "unclear")
    assert set(rounds.arms) == {NO_ACTION, *world.offers}


@pytest.mark.parametrize(
    ("gate", "verdict", "promote"),
    [
        ("better", "better", True), ("better", "unclear", False), ("better", "worse", False),
        ("not_worse", "better", True), ("not_worse", "unclear", True),
        ("not_worse", "worse", False), ("off", "worse", True), ("off", "not evaluated", True),
        ("better", "not evaluated", False), ("not_worse", "not evaluated", False),
        ("off", NOT_ESTIMATED, True), ("better", NOT_ESTIMATED, False),
        ("not_worse", NOT_ESTIMATED, False),
    ],
)  # fmt: skip
def test_gate_decision(gate: Any, verdict: str, promote: bool) -> None:
    assert gate_decision(gate, verdict)[0] is promote


def test_a_candidate_never_estimated_is_not_promoted_as_not_worse() -> None:
    """Too few held-out rows, or too small a share of the held-out offer decisions:
    `not estimated`, which `not_worse` (unlike an overlapping interval) does not pass."""
    candidate = OfferUplift((), {}, "u-new")
    no_rounds = cast(Rounds, None)  # never read: nothing gets estimated
    too_few = {"uplift": {"rows": 0, "status": "too few rows"}}
    none = gate_report(no_rounds, too_few, {}, candidate, None, seed=0)
    assert none["verdict"] == NOT_ESTIMATED and "too few" in none["note"]
    assert none["current"] == "greedy" and "difference" not in none
    estimated = {"uplift": {"rows": 500, "status": "estimated", "verdict": "better"}}
    thin = gate_report(
        no_rounds, estimated, {}, candidate, None, seed=0, coverage=0.3, min_coverage=0.5
    )
    assert thin["verdict"] == NOT_ESTIMATED and "30% of the held-out offer" in thin["note"]
    for gate in (none, thin):
        promote, why = gate_decision("not_worse", gate["verdict"])
        assert not promote and why.startswith("not estimated: ")
        assert gate_decision("off", gate["verdict"])[0]


def _pointer(models: Path) -> str:
    return (models / UPLIFT_POINTER).read_text()


def test_ope_gate_serves_only_a_better_offer_policy(settings: Settings) -> None:
    """Candidate flow on one simulated log: an inverted candidate is rejected against
    the logged policy with exploration off; the trained one beats that and is served;
    an inverted one is then rejected against the served model (the pointer keeps its
    bytes and the API its model); a copy of the served model is unclear, so only
    `not_worse` serves it; gate `off` serves even the inverted one."""
    _, log, store = _write_log(settings, missing=0, n=GATE_N)
    rounds = read_rounds(store)
    assert rounds is not None
    models = settings.home_dir / "models"

    assert materialize(settings, select="key:offer_uplift") is True
    trained = read_uplift(models, UPLIFT_CANDIDATE)
    assert trained is not None and not (models / UPLIFT_POINTER).exists()
    good_truth, logged_truth, greedy_truth = _truth(trained, rounds, log)
    bad = _inverted(trained, "u-inverted-1")
    bad_truth, _, _ = _truth(bad, rounds, log)
    # The truth the gate must see: the exploring log undersells the current policy.
    assert bad_truth < logged_truth - 0.05 < greedy_truth - 0.08 < good_truth - 0.1

    # 0. An `uplift.json` from before the registry: legacy-served, the check passes.
    info = json.loads((models / UPLIFT_CANDIDATE).read_text())
    legacy = {k: info[k] for k in ("version", "artifact_path", "offers", "basis")}
    (models / UPLIFT_POINTER).write_text(json.dumps(legacy))
    assert materialize(settings, select="key:offer_policy") is True
    passed, why = _check(settings, "offer_policy_registered")
    assert passed and why["served"] == trained.version and why["registry_promoted"] == "None"
    assert "predates the registry" in why["warning"]
    (models / UPLIFT_POINTER).unlink()

    # 1. Nothing served yet: an inverted candidate against the greedy current policy.
    save_candidate(models, bad)
    assert materialize(settings, select=GATE) is True
    ope, gate = _metadata(settings, "policy_evaluation"), _metadata(settings, "offer_policy")
    assert ope["gate/current"] == "greedy" and ope["gate/verdict"] == "worse"
    assert ope["gate/coverage"] == 1.0 and ope["gate/difference_high"] < 0
    assert ope["current/dr_low"] <= greedy_truth <= ope["current/dr_high"]
    assert gate["status"] == "rejected"
    assert gate["compared_with"] == "logged policy, exploration off"
    assert gate["verdict"] == "worse" and "worse than the current policy" in gate["reason"]
    assert gate["candidate_dr_high"] < gate["current_value"] == ope["current/dr_value"]
    assert gate["served_version"] == "" and not (models / UPLIFT_POINTER).exists()

    # 2. Retrain: the learned candidate beats the greedy current policy and is served,
    # by the paired DR difference (the difference of the two DR estimates on the rows).
    assert materialize(settings, select=SELECT) is True
    candidate = read_uplift(models, UPLIFT_CANDIDATE)
    assert candidate is not None and candidate.version != trained.version
    good_truth, _, _ = _truth(candidate, rounds, log)
    ope, gate = _metadata(settings, "policy_evaluation"), _metadata(settings, "offer_policy")
    assert ope["gate/verdict"] == "better" and ope["gate/difference_low"] > 0
    assert ope["uplift/dr_value"] - ope["current/dr_value"] == pytest.approx(
        ope["gate/difference_value"], abs=1e-9
    )
    # One log, one draw: each estimate within 1.5 half-widths of its truth (the
    # across-seed coverage of the intervals is tests/core/test_ope.py's job).
    for key, truth in (("gate/difference", good_truth - greedy_truth), ("uplift/dr", good_truth)):
        low, high, value = (ope[f"{key}_{f}"] for f in ("low", "high", "value"))
        assert abs(value - truth) < 0.75 * (high - low), (key, low, truth, high)
    assert gate["status"] == "promoted" and gate["served_version"] == candidate.version
    served = read_uplift(models)
    assert served is not None and served.version == candidate.version
    registry = read_registry(models)
    assert registry["served"]["version"] == candidate.version
    assert [e["status"] for e in registry["history"]] == ["rejected", "promoted"]
    assert registry["history"][0]["evaluation"]["candidate_dr"]["high"] < greedy_truth
    assert _check(settings, "offer_policy_registered") == (
        True,
        {
            "served": candidate.version,
            "registry_promoted": candidate.version,
            "artifact_loads": True,
        },
    )

    runtime = ServingRuntime.open(settings, load_spec(settings.spec), require_keys=False)
    try:
        assert runtime.uplift is not None and runtime.uplift.version == candidate.version

        # 3. An inverted candidate against the served model: rejected, nothing changes.
        before = _pointer(models)
        save_candidate(models, _inverted(candidate, "u-inverted-2"))
        assert materialize(settings, select=GATE) is True
        ope, gate = _metadata(settings, "policy_evaluation"), _metadata(settings, "offer_policy")
        assert ope["gate/current"] == "served" and ope["served_model"] == candidate.version
        assert ope["gate/difference_high"] < 0 and ope["gate/verdict"] == "worse"
        # The paired difference is the difference of the two DR estimates on those rows.
        assert ope["uplift/dr_value"] - ope["served/dr_value"] == pytest.approx(
            ope["gate/difference_value"], abs=1e-9
        )
        assert gate["status"] == "rejected" and gate["verdict"] == "worse"
        assert gate["compared_with"] == f"served {candidate.version}"
        assert gate["served_version"] == candidate.version and _pointer(models) == before
        assert runtime.reload_uplift() is False and runtime.uplift.version == candidate.version

        # 4. The served model under a new version: no better, no worse.
        save_candidate(models, OfferUplift(candidate.feature_names, candidate.models, "u-copy"))
        assert materialize(settings, select=GATE) is True
        assert _metadata(settings, "policy_evaluation")["gate/verdict"] == "unclear"
        assert _metadata(settings, "offer_policy")["status"] == "rejected"
        assert materialize(settings, select=GATE, ope_gate="not_worse") is True
        assert _metadata(settings, "offer_policy")["served_version"] == "u-copy"
        assert runtime.reload_uplift() is True and runtime.uplift.version == "u-copy"

        # 5. A candidate knowing one offer covers none of the held-out decisions (both
        # offers were choices in each): not estimated, so not even `not_worse` serves it.
        one = {"free_shipping": candidate.models["free_shipping"]}
        save_candidate(models, OfferUplift(candidate.feature_names, one, "u-partial"))
        assert materialize(settings, select=GATE, ope_gate="not_worse") is True
        gate = _metadata(settings, "offer_policy")
        assert gate["status"] == "rejected" and gate["verdict"] == NOT_ESTIMATED
        assert gate["coverage"] == 0.0 and gate["served_version"] == "u-copy"

        # 6. Gate off: the inverted candidate is served although it is worse.
        save_candidate(models, _inverted(candidate, "u-inverted-3"))
        assert materialize(settings, select=GATE, ope_gate="off") is True
        gate = _metadata(settings, "offer_policy")
        assert gate["status"] == "promoted" and gate["verdict"] == "worse"
        assert gate["reason"].startswith("gate off")
        assert runtime.reload_uplift() is True and runtime.uplift.version == "u-inverted-3"
    finally:
        runtime.close()
    registry = read_registry(models)
    assert registry["served"]["version"] == "u-inverted-3"
    assert [(e["version"], e["status"]) for e in registry["history"]][2:] == [
        ("u-inverted-2", "rejected"), ("u-copy", "rejected"), ("u-copy", "promoted"),
        ("u-partial", "rejected"), ("u-inverted-3", "promoted"),
    ]  # fmt: skip

    # A pointer written around the gate fails the `offer_policy_registered` check.
    pointer = json.loads(_pointer(models))
    (models / UPLIFT_POINTER).write_text(json.dumps({**pointer, "version": "u-by-hand"}))
    assert materialize(settings, select="key:offer_policy") is False
    assert _metadata(settings, "offer_policy")["verdict"] == "not evaluated"
    passed, why = _check(settings, "offer_policy_registered")
    assert not passed and why["served"] == "u-by-hand" and why["artifact_loads"] is True
    assert why["registry_promoted"] == "u-inverted-3"
