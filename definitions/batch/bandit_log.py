"""The Delta decision log joined with feedback, as bandit rounds for OPE and uplift.

What is read from a decision row (the layout an exploring API logs; the simulator's
`nextbest.demo.offer_sim.decision_records` writes the same):
- the logged arm: the first shown action (`action_id`, `action_id:item_id` for item
  actions), or `none` when nothing was shown (the control arm of an offer surface);
- its probability: that action's `propensity`, or `features["propensity"]` for `none`.
  Rows without one were logged without exploration and cannot be reweighted: they are
  skipped and counted, never guessed;
- the arms the policy could have chosen: `candidates` entries with an `action_id`
  (their `score`, used by the greedy target), plus the logged arm;
- the context: numeric `features["values"]` (on the `log_features` scale) and
  `features["surface"]`.
Decisions for a user without consent (`features["personalized"]` set, see
`serving.consent`) read nothing of the user, so their empty `values` would pass for a
user without activity: they are skipped and counted (`not_personalized`).
The reward of a decision is 1 when any feedback row for it has an outcome in
`reward_outcomes` (conversion by default), else 0: a conversion counts in the control
arm too, where no action was shown to attribute it to.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from definitions.batch.arrow import pc
from nextbest.learn.ope import NO_ACTION, BanditLog
from nextbest.learn.uplift import feature_matrix
from storage.delta.store import DeltaStore


@dataclass(frozen=True)
class Rounds:
    """Decisions usable for OPE: one row per decision with a logged propensity."""

    decision_ids: list[str]
    surfaces: list[str]
    feature_names: list[str]
    x: np.ndarray  # (n, d)
    values: list[dict[str, Any]]  # raw feature values per row
    arms: list[str]  # arm vocabulary; column j of `available` / `scores`
    actions: np.ndarray  # (n,) index into arms
    propensities: np.ndarray
    rewards: np.ndarray
    available: np.ndarray  # (n, A) bool
    scores: np.ndarray  # (n, A) float, nan where not logged
    decisions: int = 0  # rows in the decision log
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.decision_ids)

    def bandit(self, rows: np.ndarray | None = None) -> BanditLog:
        sel = np.arange(self.n) if rows is None else rows
        return BanditLog(
            self.x[sel],
            self.actions[sel],
            self.propensities[sel],
            self.rewards[sel],
            len(self.arms),
        )


def held_out(decision_ids: Sequence[str], *, seed: int, fraction: float) -> np.ndarray:
    """A stable per-decision split (hash of seed and decision id): the rows a model
    trained on the log never saw, so a policy built from it is evaluated on them only
    (evaluating on its own training rows would credit it with their noise)."""
    cut = int(fraction * 2**64)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{d}".encode(), digest_size=8).digest()) < cut
            for d in decision_ids
        ],
        dtype=bool,
    )


def arm_key(action: dict[str, Any]) -> str:
    item = action.get("item_id")
    return str(action.get("action_id")) if item is None else f"{action.get('action_id')}:{item}"


def _num(v: Any) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    return float(v) if ok else float("nan")


def _load(text: Any, default: Any) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def rewarded_decisions(store: DeltaStore, reward_outcomes: Sequence[str]) -> set[str]:
    if not store.exists("feedback"):
        return set()
    fb = store.read("feedback", columns=["decision_id", "outcome"])
    hit = fb.filter(pc.is_in(fb.column("outcome"), pc.cast(list(reward_outcomes), "string")))
    return set(hit.column("decision_id").to_pylist())


def read_rounds(
    store: DeltaStore, *, reward_outcomes: Sequence[str] = ("conversion",)
) -> Rounds | None:
    """Rounds from the `decisions` and `feedback` tables; None when nothing was logged."""
    if not store.exists("decisions"):
        return None
    table = store.read("decisions", columns=["decision_id", "actions", "candidates", "features"])
    if table.num_rows == 0:
        return None
    rewarded = rewarded_decisions(store, reward_outcomes)
    skipped = {"no_propensity": 0, "unreadable": 0, "not_personalized": 0}
    rows: list[tuple[str, str, dict[str, Any], str, float, dict[str, float]]] = []
    arms: dict[str, int] = {}
    cols = [
        table.column(c).to_pylist() for c in ("decision_id", "actions", "candidates", "features")
    ]
    for did, actions_text, cand_text, feat_text in zip(*cols, strict=True):
        actions = _load(actions_text, None)
        features = _load(feat_text, {})
        if not isinstance(actions, list) or not isinstance(features, dict):
            skipped["unreadable"] += 1
            continue
        if features.get("personalized"):
            skipped["not_personalized"] += 1
            continue
        if actions:
            arm, prop = arm_key(actions[0]), actions[0].get("propensity")
        else:
            arm, prop = NO_ACTION, features.get("propensity")
        if not isinstance(prop, int | float) or not 0 < prop <= 1:
            skipped["no_propensity"] += 1
            continue
        scored: dict[str, float] = {}
        for c in _load(cand_text, []) or []:
            if isinstance(c, dict) and c.get("action_id") is not None:
                scored[arm_key(c)] = _num(c.get("score"))
        scored.setdefault(arm, _num(actions[0].get("score")) if actions else float("nan"))
        for a in (arm, *scored):
            arms.setdefault(a, len(arms))
        raw_values = features.get("values")
        values: dict[str, Any] = raw_values if isinstance(raw_values, dict) else {}
        rows.append((did, str(features.get("surface") or ""), values, arm, float(prop), scored))
    if not rows:
        return Rounds([], [], [], np.zeros((0, 0)), [], list(arms), np.zeros(0, int),
                      np.zeros(0), np.zeros(0), np.zeros((0, 0), bool), np.zeros((0, 0)),
                      decisions=table.num_rows, skipped=skipped)  # fmt: skip
    names = sorted({k for r in rows for k in r[2]})
    value_rows = [r[2] for r in rows]
    available = np.zeros((len(rows), len(arms)), dtype=bool)
    scores = np.full((len(rows), len(arms)), np.nan)
    for i, r in enumerate(rows):
        for a, s in r[5].items():
            available[i, arms[a]] = True
            scores[i, arms[a]] = s
    return Rounds(
        decision_ids=[r[0] for r in rows],
        surfaces=[r[1] for r in rows],
        feature_names=names,
        x=feature_matrix(value_rows, names),
        values=value_rows,
        arms=list(arms),
        actions=np.array([arms[r[3]] for r in rows]),
        propensities=np.array([r[4] for r in rows]),
        rewards=np.array([1.0 if r[0] in rewarded else 0.0 for r in rows]),
        available=available,
        scores=scores,
        decisions=table.num_rows,
        skipped=skipped,
    )
