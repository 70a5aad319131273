"""Non-item actions (offers, content) and the surface -> policy mapping.

An offer is eligible when every `where` condition of the spec holds for the user's
online features and the request context and its cap for the period is not reached.

Ranking: when an uplift model (`nextbest.learn.uplift.OfferUplift`, trained by the Dagster
`offer_uplift` asset) knows the offer, its score is the predicted uplift (the
conversions showing it causes) and an offer predicted to cost conversions (uplift
<= 0) is not shown; otherwise the score is the spec's `priority`, plus the policy's
cached weight when the batch side chose it for this user. Offers the model does not
know keep their priority score next to the uplift scores of the others (the scales
differ; train the model on every offer of a surface to avoid mixing them).

Online model (policy `online_model`, `nextbest.learn.online_model`): between retrains the
user's own feedback moves each offer by weight x (posterior mean - prior mean), at
most weight/2 either way, with a reason saying what the user did (e.g. dismissed it
twice). On uplift scores it acts in uplift units instead: the predicted uplift is
scaled by e^term (e^-term below 0), at most e^(weight/2) either way, so the online model
reorders the offers the uplift model would show but never decides whether one is
shown (it cannot carry a score across 0): that stays the call of the uplift model the
OPE gate evaluated, and a single ignored impression cannot suppress an offer.

Exploration (`choose_offers`): the arms are the eligible offers plus `none` (show
nothing, score 0: the control arm uplift is learned against). Without exploration
every showable offer is shown, as before; with it, one arm per decision is drawn by
`nextbest.decide.exploration.explore` and shown alone (or nothing), which is the randomized
exposure the uplift model and off-policy evaluation need.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from nextbest.decide import rules
from nextbest.decide.candidates import UserView
from nextbest.decide.exploration import explore
from nextbest.learn.online_model import action_target
from nextbest.learn.uplift import OfferUplift
from nextbest.spec.models import Policy, Spec

NO_ACTION = "none"  # nextbest.learn.ope.NO_ACTION, the arm definitions.batch.bandit_log reads
NONE_SCORE = 0.0


@dataclass(frozen=True, slots=True)
class Action:
    action_id: str
    item_id: str | None
    score: float
    source: str
    reasons: list[str]
    title: str | None = None
    propensity: float = 1.0
    """Probability the exploring policy chose this action (1.0 without exploration;
    for item slates the probability of the slate's first item, see nextbest.decide.decision)."""


def decide_offers(
    spec: Spec,
    policy: Policy,
    surface: str,
    context: Mapping[str, Any],
    user: UserView,
    names: list[str],
    *,
    uplift: OfferUplift | None = None,
) -> list[Action]:
    """Eligible non-item actions, best first: scored by predicted uplift when `uplift`
    knows them, else priority (+ the cached source's weight when the batch side chose
    it). Offers with a predicted uplift <= 0 are returned too (exploration may show
    them); `showable` tells which a greedy policy shows."""
    cached_weight = max((c.weight for c in policy.candidates if c.source == "cached"), default=0.0)
    cached_ids = {a.get("action_id") for a in user.cached}
    out: list[Action] = []
    for name in names:
        action = spec.actions[name]
        if surface not in action.surfaces:
            continue
        ok, reasons = rules.check(
            spec, action.eligibility.where, item=None, user=user.features, context=context
        )
        if not ok:
            continue
        if action.cap is not None:
            used = user.cap_counts.get(name, 0)
            if used >= action.cap.max:
                continue
            reasons.append(f"cap: shown {used} of {action.cap.max} per {action.cap.per}")
        out.append(
            _scored(name, action.priority, reasons, action.title, name in cached_ids, cached_weight)
        )
    if uplift is not None and out:
        out = _by_uplift(out, uplift, user)
    elif out:
        for a in out:
            a.reasons.append("ranking: priority (no uplift model loaded)")
    return sorted(_online(out, policy, user), key=lambda a: -a.score)


def _online(offers: list[Action], policy: Policy, user: UserView) -> list[Action]:
    """Each offer the user gave feedback on, moved by their online model."""
    settings = policy.online_model
    online = user.online
    if online is None or not settings.enabled:
        return offers
    out: list[Action] = []
    for a in offers:
        found = online.adjust(action_target(a.action_id), a.action_id, settings)
        if found is None:
            out.append(a)
            continue
        if a.source == "uplift":
            score = _scaled(a.score, found.term)
            reason = f"{found.reason}; uplift x{score / a.score:.3f}" if a.score else found.reason
        else:
            score, reason = round(a.score + found.term, 6), found.reason
        out.append(replace(a, score=score, reasons=[*a.reasons, reason]))
    return out


def _scaled(uplift: float, term: float) -> float:
    """`uplift` moved by an online term in uplift units: times e^term (e^-term below 0),
    so never across 0, where showing the offer is decided."""
    if uplift == 0:
        return 0.0
    scaled = abs(uplift) * math.exp(term if uplift > 0 else -term)
    return math.copysign(max(round(scaled, 6), 1e-6), uplift)


def _scored(
    name: str, priority: float, reasons: list[str], title: str | None, cached: bool, weight: float
) -> Action:
    score, source = priority, "rules"
    if cached and weight > 0:
        score += weight
        source = "cached"
        reasons.append("cached: chosen by the batch side")
    return Action(name, None, round(score, 6), source, reasons, title=title)


def _by_uplift(offers: list[Action], uplift: OfferUplift, user: UserView) -> list[Action]:
    known = [a for a in offers if a.action_id in uplift.models]
    if not known:
        for a in offers:
            a.reasons.append(f"ranking: priority (uplift model {uplift.version} lacks this offer)")
        return offers
    predicted = uplift.predict([user.values])
    out: list[Action] = []
    for a in offers:
        up = predicted.get(a.action_id)
        if up is None:
            a.reasons.append(f"ranking: priority (uplift model {uplift.version} lacks this offer)")
            out.append(a)
            continue
        u = float(up[0])
        reasons = [
            *a.reasons,
            f"uplift: predicted {u:+.4f} conversion probability when shown "
            f"(model {uplift.version})",
        ]
        out.append(Action(a.action_id, None, round(u, 6), "uplift", reasons, title=a.title))
    return out


def showable(action: Action) -> bool:
    """What a greedy policy shows: every eligible offer, except those the uplift model
    predicts to cost conversions."""
    return action.source != "uplift" or action.score > NONE_SCORE


def choose_offers(
    policy: Policy, offers: list[Action], *, seed: int
) -> tuple[list[Action], list[dict[str, Any]], float]:
    """(shown offers, every arm with its score and propensity for the decision log,
    probability of showing nothing). `offers` come best first from `decide_offers`."""
    greedy = next((j for j, a in enumerate(offers) if showable(a)), len(offers))
    scores = [a.score for a in offers] + [NONE_SCORE]
    exploration = policy.exploration
    chosen, probs = explore(
        scores, greedy, exploration.strategy, epsilon=exploration.epsilon, seed=seed
    )
    arms: list[dict[str, Any]] = [
        {"action_id": a.action_id, "item_id": None, "score": a.score, "propensity": p}
        for a, p in zip(offers, probs, strict=False)
    ]
    arms.append(
        {"action_id": NO_ACTION, "item_id": None, "score": NONE_SCORE, "propensity": probs[-1]}
    )
    if exploration.strategy == "none":
        return [a for a in offers if showable(a)], arms, probs[-1]
    if chosen == len(offers):
        return [], arms, probs[-1]
    a = offers[chosen]
    how = "greedy choice" if chosen == greedy else "explored"
    note = f"exploration: {exploration.strategy} {how} (p={probs[chosen]:.4f})"
    shown = Action(a.action_id, None, a.score, a.source, [*a.reasons, note], a.title, probs[chosen])
    return [shown], arms, probs[-1]


def policy_for_surface(spec: Spec, surface: str | None) -> tuple[str, str, Policy, bool]:
    """(surface, policy name, policy, known): unknown surfaces get the default policy
    so a caller is never refused a decision for a typo in a page name."""
    if surface:
        try:
            name, policy = spec.policy_for(surface)
            return surface, name, policy, True
        except KeyError:
            pass
    try:
        name, policy = spec.policy_for("default")
        return "default", name, policy, surface is None
    except KeyError:
        name, policy = next(iter(spec.policies.items()))
        return policy.surface, name, policy, surface is None
