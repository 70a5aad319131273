"""Non-item actions (offers, content) and the surface -> policy mapping.

An offer is eligible when every `where` condition of the spec holds for the user's
online features and the request context and its cap for the period is not reached;
its score is the spec's `priority`, plus the policy's cached weight when the batch
side chose it for this user.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nextbest import rules
from nextbest.candidates import UserView
from nextbest.spec import Policy, Spec


@dataclass(frozen=True, slots=True)
class Action:
    action_id: str
    item_id: str | None
    score: float
    source: str
    reasons: list[str]
    title: str | None = None


def decide_offers(
    spec: Spec,
    policy: Policy,
    surface: str,
    context: Mapping[str, Any],
    user: UserView,
    names: list[str],
) -> list[Action]:
    """Non-item actions: eligible when every `where` holds and the cap is not reached;
    score = priority, plus the cached source's weight when the batch side chose it."""
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
        score, source = action.priority, "rules"
        if name in cached_ids and cached_weight > 0:
            score += cached_weight
            source = "cached"
            reasons.append("cached: chosen by the batch side")
        out.append(Action(name, None, round(score, 6), source, reasons, title=action.title))
    return out


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
