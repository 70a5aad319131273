"""Uplift models for the spec's offers, trained on logged (explored) offer exposures.

Training writes a *candidate* (`uplift_candidate.json`); the API serves `uplift.json`,
which only `offer_policy` writes, after off-policy evaluation of the candidate.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from definitions.assets.logs import decision_log, feedback_log
from definitions.batch.artifacts import read_json_file, write_json_file
from definitions.batch.bandit_log import Rounds, held_out, read_rounds
from definitions.resources import NextbestResource
from nextbest.learn.ope import NO_ACTION
from nextbest.learn.uplift import (
    Basis,
    OfferUplift,
    UpliftModel,
    auuc,
    fit_uplift,
    qini_coefficient,
)
from nextbest.spec.models import Spec
from storage.artifacts import ArtifactStore, as_artifacts

UPLIFT_POINTER = "uplift.json"
"""The served offer policy (read by the API); written by `offer_policy` only."""
UPLIFT_CANDIDATE = "uplift_candidate.json"
"""The latest trained uplift models, waiting for the OPE gate."""
HOLDOUT = 0.3
MIN_ARM_ROWS = 30
"""Fewer treated or control rows than this for an offer: no model for it."""


def offer_names(spec: Spec) -> list[str]:
    return [name for name, a in spec.actions.items() if a.kind != "item"]


def read_uplift(
    models_dir: ArtifactStore | Path, pointer: str = UPLIFT_POINTER
) -> OfferUplift | None:
    """The uplift models a pointer names (the served ones by default), or None when
    there is no pointer or its artifact is gone. The version is the pointer's."""
    models_dir = as_artifacts(models_dir)
    info = read_json_file(models_dir / pointer)
    if info is None or not models_dir.available(str(info["artifact_path"])):
        return None
    loaded = models_dir.load(str(info["artifact_path"]), OfferUplift.load)
    return OfferUplift(loaded.feature_names, loaded.models, str(info["version"]))


def save_candidate(models_dir: ArtifactStore | Path, bundle: OfferUplift, **info: Any) -> str:
    """Save `bundle` under `uplift/<version>.npz` and point `uplift_candidate.json` at it."""
    models_dir = as_artifacts(models_dir)
    path = models_dir.save(f"uplift/{bundle.version}.npz", bundle.save)
    write_json_file(
        models_dir / UPLIFT_CANDIDATE,
        {
            **info,
            "version": bundle.version,
            "artifact_path": str(path),
            "trained_at": datetime.now(UTC).isoformat(),
        },
    )
    return path


def exposure(rounds: Rounds, offer: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows where `offer` was shown (treated) or nothing was (control) while `offer`
    was among the choices; and the treated mask over those rows."""
    if offer not in rounds.arms:
        return np.zeros(0, int), np.zeros(0, bool)
    j = rounds.arms.index(offer)
    logged = np.asarray(rounds.arms, dtype=object)[rounds.actions]
    control = logged == NO_ACTION
    rows = np.flatnonzero(rounds.available[:, j] & ((rounds.actions == j) | control))
    return rows, rounds.actions[rows] == j


def train_offer(
    rounds: Rounds, offer: str, *, seed: int, basis: Basis
) -> tuple[UpliftModel | None, dict[str, Any]]:
    """X-learner on the offer's exposures outside the `held_out` split, weighted by the
    inverse logged propensity so explored exposure counts as randomized; Qini/AUUC of
    the uplift score vs the response-rate score on the held-out rest."""
    rows, treated = exposure(rounds, offer)
    stats: dict[str, Any] = {"treated": int(treated.sum()), "control": int((~treated).sum())}
    if min(stats["treated"], stats["control"]) < MIN_ARM_ROWS:
        stats["status"] = f"skipped: fewer than {MIN_ARM_ROWS} treated or control rows"
        return None, stats
    x, y, w = rounds.x[rows], rounds.rewards[rows], 1.0 / rounds.propensities[rows]
    test = held_out([rounds.decision_ids[i] for i in rows], seed=seed, fraction=HOLDOUT)
    train = ~test
    if treated[train].all() or not treated[train].any():
        stats["status"] = "skipped: the training split has one arm only"
        return None, stats
    model = fit_uplift(
        x[train], treated[train], y[train], learner="x", basis=basis, weights=w[train]
    )
    scores = model.predict_uplift(x[test])
    t, yt, wt = treated[test], y[test], w[test]
    stats.update(
        status="trained",
        held_out=int(test.sum()),
        qini=qini_coefficient(scores, t, yt, weights=wt),
        auuc=auuc(scores, t, yt, weights=wt),
        qini_response=qini_coefficient(model.predict_treated(x[test]), t, yt, weights=wt),
        mean_uplift=float(np.mean(scores)),
    )
    return model, stats


@dg.asset(deps=[decision_log, feedback_log], group_name="policy", kinds={"numpy"})
def offer_uplift(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """Uplift models for non-item actions (offers): for each offer, an X-learner over
    the logged user features of decisions that showed it (treated) or showed nothing
    (control), weighted by inverse logged propensity. Reports Qini and AUUC on a
    held-out split, next to the Qini of ranking by response rate, so the uplift ranking
    has to beat it. Saved under `<home>/models/uplift/` as a candidate
    (`uplift_candidate.json`): `policy_evaluation` values it off-policy and
    `offer_policy` serves it only if it passes the gate. With no logged offer exposures
    yet it succeeds and says so."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    rounds = read_rounds(store)
    if rounds is None or rounds.n == 0:
        note = "no decisions logged yet" if rounds is None else "no decision has a propensity"
        skipped = rounds.skipped if rounds is not None else {}
        return dg.MaterializeResult(
            metadata={"status": note, "skipped": dg.MetadataValue.json(skipped)}
        )
    basis: Basis = "quadratic" if len(rounds.feature_names) <= 12 else "linear"
    models: dict[str, UpliftModel] = {}
    report: dict[str, dict[str, Any]] = {}
    for offer in offer_names(spec):
        model, stats = train_offer(rounds, offer, seed=nextbest.seed, basis=basis)
        report[offer] = stats
        if model is not None:
            models[offer] = model
        context.log.info(f"{offer}: {stats}")
    metadata: dict[str, Any] = {
        "decisions": rounds.decisions,
        "rounds": rounds.n,
        "skipped": dg.MetadataValue.json(rounds.skipped),
        "features": ", ".join(rounds.feature_names),
        "offers": dg.MetadataValue.json(report),
    }
    for offer, stats in report.items():
        for key in ("qini", "auuc", "qini_response"):
            if key in stats:
                metadata[f"{offer}/{key}"] = dg.MetadataValue.float(float(stats[key]))
    if not models:
        metadata["status"] = "no offer has enough treated and control exposures yet"
        return dg.MaterializeResult(metadata=metadata)
    version = datetime.now(UTC).strftime("u%Y%m%dT%H%M%S%f")
    bundle = OfferUplift(tuple(rounds.feature_names), models, version)
    path = save_candidate(nextbest.models_dir(), bundle, offers=report, basis=basis)
    metadata.update(
        status="trained",
        version=version,
        pointer=UPLIFT_CANDIDATE,
        artifact_path=dg.MetadataValue.path(str(path)),
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))
