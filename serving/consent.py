"""Decisions for users without consent (spec `privacy.consent`): not personalized.

Such a user gets what an unknown visitor gets: no online features, history, session
vector or cached (per-user, batch-computed) decision is read, only trending and
popular-in-context candidates, `served_from: fallback`, and every action says why.
Actions with a cap are left out: counting them would keep per-user state. The check
reads the API's consent cache (`storage.online.consent.ConsentCache`, written through
by ingest); on a miss one point read runs in a worker thread within the latency
budget, and a read that fails or overruns counts as no consent. The decision is logged
without the person: no feature values, no requested user id, and in place of the user
id `unlogged_actor` (the decision log's Delta table requires one), which is also the
log key; feedback for it joins on decision_id.
"""

import dataclasses

import anyio
import anyio.to_thread

from nextbest.decide.candidates import UserView
from nextbest.decide.decision import Outcome
from nextbest.ingest.consent import NO_CONSENT_PREFIX
from nextbest.spec.models import Policy
from serving.runtime import ServingRuntime

NOT_PERSONALIZED = "not personalized: no consent"


async def consented(runtime: ServingRuntime, actor: str, timeout_s: float) -> bool:
    cache, consent = runtime.consent, runtime.spec.privacy.consent
    if cache is None or consent is None:
        return True
    known = cache.peek(actor, consent)
    if known is not None:
        return known
    try:
        with anyio.move_on_after(timeout_s):
            return await anyio.to_thread.run_sync(
                lambda: cache.allowed(actor, consent), abandon_on_cancel=True
            )
    except Exception:  # a store outage must not personalize by accident
        return False
    return False


def unlogged_actor(decision_id: str) -> str:
    """What a decision without consent is logged and keyed under: not the person (the
    `~nc:` prefix is reserved; `definitions.batch.bandit_log` skips these rows)."""
    return NO_CONSENT_PREFIX + decision_id


def unpersonalized_view(runtime: ServingRuntime, actor: str, policy: Policy) -> UserView:
    """An empty view whose capped actions count as used up."""
    caps = {
        name: action.cap.max
        for name in policy.actions
        if (action := runtime.spec.actions[name]).cap is not None
    }
    return UserView(actor=actor, cap_counts=caps)


def explained(outcome: Outcome) -> Outcome:
    actions = [
        dataclasses.replace(a, reasons=[NOT_PERSONALIZED, *a.reasons]) for a in outcome.actions
    ]
    return dataclasses.replace(outcome, actions=actions)
