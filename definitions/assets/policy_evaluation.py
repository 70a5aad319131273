"""Off-policy evaluation of candidate policies on the logged decisions and feedback."""

from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import dagster as dg
import numpy as np

from definitions.assets.logs import decision_log, feedback_log
from definitions.assets.offer_uplift import (
    HOLDOUT,
    UPLIFT_CANDIDATE,
    UPLIFT_POINTER,
    offer_uplift,
    read_uplift,
)
from definitions.batch.artifacts import write_json_file
from definitions.batch.bandit_log import Rounds, held_out, read_rounds
from definitions.resources import NextbestResource
from nextbest.learn.ope import (
    NO_ACTION,
    Estimate,
    cross_fit_rewards,
    evaluate,
    greedy,
    importance_weights,
    on_policy,
)
from nextbest.learn.uplift import OfferUplift

OPE_REPORT = "ope.json"
NOT_ESTIMATED = "not estimated"
"""The gate's verdict when the candidate could not be valued (too few held-out rows, or
too small a share of the held-out offer decisions): only gate `off` serves it."""


def scorable(rounds: Rounds) -> np.ndarray:
    """Rows where every choice was logged with a score (the greedy policy is known)."""
    scored = np.where(rounds.available, np.isfinite(rounds.scores), True)
    return np.asarray(scored.all(axis=1) & rounds.available.any(axis=1), dtype=bool)


def greedy_target(rounds: Rounds, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, target): the logging policy with exploration off — the best-scored arm
    among those it could choose — on `rows` (default: every `scorable` row)."""
    if rows is None:
        rows = np.flatnonzero(scorable(rounds))
    scores = np.where(rounds.available, np.nan_to_num(rounds.scores, nan=-np.inf), -np.inf)
    return rows, greedy(scores[rows])


def offer_decisions(rounds: Rounds, *, seed: int) -> np.ndarray:
    """Mask of the held-out offer decisions (`none` among the choices): the rows a
    candidate offer policy should be evaluated on, the denominator of its coverage."""
    if NO_ACTION not in rounds.arms:
        return np.zeros(rounds.n, bool)
    test = held_out(rounds.decision_ids, seed=seed, fraction=HOLDOUT)
    return rounds.available[:, rounds.arms.index(NO_ACTION)] & test


def uplift_rows(rounds: Rounds, models: Sequence[OfferUplift], *, seed: int) -> np.ndarray:
    """Held-out offer decisions whose choices are only `none` and offers every one of
    `models` knows, each logged with a score (so the current greedy policy is known on
    the same rows). The split hashes the decision id with the seed, so with an
    unchanged seed no uplift model trained here (the served one included) saw them."""
    if NO_ACTION not in rounds.arms:
        return np.zeros(0, int)
    allowed = np.array(
        [a == NO_ACTION or all(a in m.models for m in models) for a in rounds.arms], dtype=bool
    )
    known = ~(rounds.available & ~allowed).any(axis=1)
    return np.flatnonzero(known & scorable(rounds) & offer_decisions(rounds, seed=seed))


def uplift_target(rounds: Rounds, uplift: OfferUplift, rows: np.ndarray) -> np.ndarray:
    """On `rows`: show the available offer with the highest predicted uplift if it is
    > 0, else nothing (what the API's uplift ranking does with exploration off)."""
    if NO_ACTION not in rounds.arms:  # no control arm: `uplift_rows` selected nothing
        return np.zeros((0, len(rounds.arms)))
    gains = np.full((len(rows), len(rounds.arms)), -np.inf)
    gains[:, rounds.arms.index(NO_ACTION)] = 0.0
    predicted = uplift.predict([rounds.values[i] for i in rows])
    for offer, up in predicted.items():
        if offer in rounds.arms:
            j = rounds.arms.index(offer)
            gains[:, j] = np.where(rounds.available[rows, j], up, -np.inf)
    return greedy(gains)


def verdict(low: float, high: float, reference: float) -> str:
    return "better" if low > reference else "worse" if high < reference else "unclear"


def dr_difference(
    rounds: Rounds, rows: np.ndarray, target: np.ndarray, baseline: np.ndarray, *, seed: int
) -> dict[str, float | int]:
    """Doubly robust estimate of value(target) - value(baseline) on the same rows, with
    a 95% normal interval from the paired per-row DR terms: both policies share the
    cross-fitted reward model `evaluate` uses, so the noise they have in common cancels
    and the interval is much tighter than comparing two separate intervals."""
    log = rounds.bandit(rows)
    q = cross_fit_rewards(log, seed=seed)
    logged_q = q[np.arange(log.n), log.actions]

    def terms(policy: np.ndarray) -> np.ndarray:
        w, _ = importance_weights(log, policy)
        return np.sum(policy * q, axis=1) + w * (log.rewards - logged_q)

    d = terms(target) - terms(baseline)
    value = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(log.n))
    z = NormalDist().inv_cdf(0.975)
    return {
        "value": value,
        "low": value - z * se,
        "high": value + z * se,
        "std_error": se,
        "n": log.n,
        "disagree": int(np.count_nonzero(target.argmax(axis=1) != baseline.argmax(axis=1))),
    }


def estimate_targets(
    rounds: Rounds, targets: dict[str, tuple[np.ndarray, np.ndarray]], *, seed: int
) -> dict[str, dict[str, Any]]:
    """Per target: IPS/SNIPS/DR with 95% intervals and the logged policy's value on
    the same rows, plus a verdict that needs DR's lower bound to beat the logged value."""
    out: dict[str, dict[str, Any]] = {}
    for name, (rows, target) in targets.items():
        if len(rows) < 2:
            out[name] = {"rows": len(rows), "status": "too few rows"}
            continue
        log = rounds.bandit(rows)
        estimates: dict[str, Estimate] = {"logged": on_policy(log)}
        estimates.update(evaluate(log, target, seed=seed))
        dr, logged = estimates["dr"], estimates["logged"]
        out[name] = {
            "rows": len(rows),
            "status": "estimated",
            "verdict": verdict(dr.low, dr.high, logged.value),
            **{m: e.as_dict() for m, e in estimates.items()},
        }
    return out


def markdown(report: dict[str, dict[str, Any]]) -> str:
    lines = ["| policy | method | value | 95% interval | ESS | rows |", "|---|---|---|---|---|---|"]
    for name, entry in report.items():
        for method in ("logged", "ips", "snips", "dr"):
            e = entry.get(method)
            if e:
                lines.append(
                    f"| {name} | {method} | {e['value']:.4f} | [{e['low']:.4f}, {e['high']:.4f}]"
                    f" | {e['ess']:.0f} | {e['n']} |"
                )
    return "\n".join(lines)


def gate_report(
    rounds: Rounds,
    report: dict[str, dict[str, Any]],
    targets: dict[str, tuple[np.ndarray, np.ndarray]],
    candidate: OfferUplift,
    served: OfferUplift | None,
    *,
    seed: int,
    coverage: float = 1.0,
    min_coverage: float = 0.0,
) -> dict[str, Any]:
    """What `offer_policy` gates on: the candidate (`uplift`) against the current offer
    policy on the same held-out rows, by the paired DR difference (verdict: its interval
    above / below 0). Current is the served uplift model when there is one, else the
    logged policy with exploration off (`current`: what the API serves greedily; the
    exploring logged policy itself is a weaker rival than anything really served).
    `coverage` is the share of held-out offer decisions the candidate was evaluated on:
    below `min_coverage`, or with too few rows, the verdict is `not estimated`."""
    entry = report.get("uplift", {})
    baseline = "served" if served is not None else "current"
    out: dict[str, Any] = {
        "candidate": candidate.version,
        "served": served.version if served is not None else None,
        "current": "served" if served is not None else "greedy",
        "rows": entry.get("rows", 0),
        "coverage": coverage,
        "min_coverage": min_coverage,
    }
    if entry.get("status") != "estimated":
        return {**out, "verdict": NOT_ESTIMATED, "note": "too few held-out rows to estimate"}
    if coverage < min_coverage:
        note = (
            f"evaluated on {coverage:.0%} of the held-out offer decisions, below the "
            f"required {min_coverage:.0%} (offers the candidate lacks, or unscored choices)"
        )
        return {**out, "verdict": NOT_ESTIMATED, "note": note}
    dr = entry["dr"]
    out["candidate_dr"] = {k: dr[k] for k in ("value", "low", "high")}
    out["logged_value"] = entry["logged"]["value"]
    rows, target = targets["uplift"]
    difference = dr_difference(rounds, rows, target, targets[baseline][1], seed=seed)
    return {
        **out,
        "verdict": verdict(float(difference["low"]), float(difference["high"]), 0.0),
        "current_value": report.get(baseline, {}).get("dr", {}).get("value", float("nan")),
        "difference": difference,
    }


@dg.asset(deps=[offer_uplift, decision_log, feedback_log], group_name="policy", kinds={"numpy"})
def policy_evaluation(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """Off-policy evaluation on the decision log joined with feedback (reward: the
    decision converted). Estimates, with IPS, self-normalized IPS and doubly robust
    (cross-fitted per-action ridge reward model) and 95% intervals, the value of
    policies against the logged (exploring) one on the same decisions: `greedy`
    (exploration off), `uplift` (offers ranked by the *candidate* `offer_uplift` just
    trained, on held-out offer decisions), and on those same rows `current` (the logged
    policy with exploration off) and `served` (the uplift model the API serves now).
    The candidate's verdict against the current policy (the served model, else
    `current`), by a paired DR difference, is what `offer_policy` gates promotion on;
    it is `not estimated` when the candidate covers less than `ope_min_coverage` of the
    held-out offer decisions. The targets rank by predicted uplift alone: the per-user
    online model only reorders offers the uplift model shows (`nextbest.decide.offers`), so
    it is not part of what is valued here. Decisions logged without a propensity are
    skipped and counted. The report is also written to `<home>/models/ope.json`. With
    no decisions yet it succeeds."""
    store = nextbest.delta()
    rounds = read_rounds(store)
    if rounds is None or rounds.n == 0:
        note = "no decisions logged yet" if rounds is None else "no decision has a propensity"
        skipped = rounds.skipped if rounds is not None else {}
        return dg.MaterializeResult(
            metadata={"status": note, "skipped": dg.MetadataValue.json(skipped)}
        )
    seed, models = nextbest.seed, nextbest.models_dir()
    targets = {"greedy": greedy_target(rounds)}
    candidate = read_uplift(models, UPLIFT_CANDIDATE)
    serving = read_uplift(models, UPLIFT_POINTER)
    same = serving is not None and candidate is not None and serving.version == candidate.version
    served = None if same else serving  # a candidate already served has no rival
    uplifts = {"uplift": candidate, "served": served}
    present = [m for m in uplifts.values() if m is not None]
    rows = uplift_rows(rounds, present, seed=seed)
    offer_rows = int(offer_decisions(rounds, seed=seed).sum())
    coverage = len(rows) / offer_rows if offer_rows else 0.0
    for name, model in uplifts.items():
        if model is not None:
            targets[name] = (rows, uplift_target(rounds, model, rows))
    if candidate is not None and served is None:
        targets["current"] = greedy_target(rounds, rows)
    report = estimate_targets(rounds, targets, seed=seed)
    gate = (
        gate_report(
            rounds,
            report,
            targets,
            candidate,
            served,
            seed=seed,
            coverage=coverage,
            min_coverage=nextbest.ope_min_coverage,
        )
        if candidate is not None
        else None
    )
    metadata: dict[str, Any] = {
        "status": "estimated",
        "decisions": rounds.decisions,
        "rounds": rounds.n,
        "skipped_no_propensity": rounds.skipped.get("no_propensity", 0),
        "skipped_unreadable": rounds.skipped.get("unreadable", 0),
        "uplift_model": candidate.version if candidate is not None else "none",
        "served_model": serving.version if serving is not None else "none",
        "report": dg.MetadataValue.md(markdown(report)),
        "estimates": dg.MetadataValue.json(report),
    }
    for name, entry in report.items():
        if entry.get("status") != "estimated":
            continue
        metadata[f"{name}/verdict"] = entry["verdict"]
        for method in ("logged", "ips", "snips", "dr"):
            for field in ("value", "low", "high", "ess"):
                metadata[f"{name}/{method}_{field}"] = dg.MetadataValue.float(
                    float(entry[method][field])
                )
    if gate is not None:
        metadata["gate"] = dg.MetadataValue.json(gate)
        metadata["gate/current"] = gate["current"]
        metadata["gate/verdict"] = gate["verdict"]
        metadata["gate/coverage"] = dg.MetadataValue.float(float(gate["coverage"]))
        for field in ("value", "low", "high"):
            if "difference" in gate:
                metadata[f"gate/difference_{field}"] = dg.MetadataValue.float(
                    float(gate["difference"][field])
                )
    write_json_file(models / OPE_REPORT, {"rounds": rounds.n, "targets": report, "gate": gate})
    context.log.info(f"OPE over {rounds.n} rounds ({rounds.skipped} skipped); gate: {gate}")
    return dg.MaterializeResult(metadata=metadata)
