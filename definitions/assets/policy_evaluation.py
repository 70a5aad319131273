"""Off-policy evaluation of candidate policies on the logged decisions and feedback."""

from typing import Any

import dagster as dg
import numpy as np

from definitions.artifacts import write_json_file
from definitions.assets.offer_uplift import HOLDOUT, offer_uplift, read_uplift
from definitions.bandit_log import Rounds, held_out, read_rounds
from definitions.resources import NextbestResource
from nextbest.ope import NO_ACTION, Estimate, evaluate, greedy, on_policy
from nextbest.uplift import OfferUplift

OPE_REPORT = "ope.json"


def greedy_target(rounds: Rounds) -> tuple[np.ndarray, np.ndarray]:
    """(rows, target): the logging policy with exploration off — the best-scored arm
    among those it could choose — on rows where every choice was logged with a score."""
    scored = np.where(rounds.available, np.isfinite(rounds.scores), True)
    rows = np.flatnonzero(scored.all(axis=1) & rounds.available.any(axis=1))
    scores = np.where(rounds.available, np.nan_to_num(rounds.scores, nan=-np.inf), -np.inf)
    return rows, greedy(scores[rows])


def uplift_target(
    rounds: Rounds, uplift: OfferUplift, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, target): on held-out decisions (never trained on) whose choices are only
    offers the model knows and `none`, show the available offer with the highest
    predicted uplift if it is > 0, else nothing."""
    known = {NO_ACTION, *uplift.models}
    allowed = np.array([a in known for a in rounds.arms])
    test = held_out(rounds.decision_ids, seed=seed, fraction=HOLDOUT)
    rows = np.flatnonzero(~(rounds.available & ~allowed).any(axis=1) & test)
    gains = np.full((len(rows), len(rounds.arms)), -np.inf)
    if NO_ACTION in rounds.arms:
        gains[:, rounds.arms.index(NO_ACTION)] = 0.0
    else:
        return np.zeros(0, int), np.zeros((0, len(rounds.arms)))
    predicted = uplift.predict([rounds.values[i] for i in rows])
    for offer, up in predicted.items():
        if offer in rounds.arms:
            j = rounds.arms.index(offer)
            gains[:, j] = np.where(rounds.available[rows, j], up, -np.inf)
    return rows, greedy(gains)


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
        verdict = (
            "better" if dr.low > logged.value else "worse" if dr.high < logged.value else "unclear"
        )
        out[name] = {
            "rows": len(rows),
            "status": "estimated",
            "verdict": verdict,
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


@dg.asset(deps=[offer_uplift], group_name="policy", kinds={"numpy"})
def policy_evaluation(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """Off-policy evaluation on the decision log joined with feedback (reward: the
    decision converted). Estimates, with IPS, self-normalized IPS and doubly robust
    (cross-fitted per-action ridge reward model) and 95% intervals, the value of the
    candidate policies against the logged (exploring) one: `greedy` (exploration off)
    and `uplift` (offers ranked by `offer_uplift`'s predicted uplift, on the decisions
    it held out). Each row of the report compares against the logged policy's value on
    the same decisions. Decisions logged
    without a propensity are skipped and counted. The report is also written to
    `<home>/models/ope.json` for promotion gates. With no decisions yet it succeeds."""
    store = nextbest.delta()
    rounds = read_rounds(store)
    if rounds is None or rounds.n == 0:
        note = "no decisions logged yet" if rounds is None else "no decision has a propensity"
        skipped = rounds.skipped if rounds is not None else {}
        return dg.MaterializeResult(
            metadata={"status": note, "skipped": dg.MetadataValue.json(skipped)}
        )
    targets = {"greedy": greedy_target(rounds)}
    uplift = read_uplift(nextbest.models_dir())
    if uplift is not None:
        targets["uplift"] = uplift_target(rounds, uplift, seed=nextbest.seed)
    report = estimate_targets(rounds, targets, seed=nextbest.seed)
    metadata: dict[str, Any] = {
        "status": "estimated",
        "decisions": rounds.decisions,
        "rounds": rounds.n,
        "skipped_no_propensity": rounds.skipped.get("no_propensity", 0),
        "skipped_unreadable": rounds.skipped.get("unreadable", 0),
        "uplift_model": uplift.version if uplift is not None else "none",
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
    write_json_file(nextbest.models_dir() / OPE_REPORT, {"rounds": rounds.n, "targets": report})
    context.log.info(f"OPE over {rounds.n} rounds ({rounds.skipped} skipped)")
    return dg.MaterializeResult(metadata=metadata)
