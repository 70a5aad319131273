"""The /v1/decide hot path: one short worker-thread hop, a latency budget, never a 5xx.

1. Read the user's snapshot (one connection: alias, state, features, cached
   decision, cap counters) on a reader thread (`serving.reader`, which coalesces
   concurrent reads), bounded by the policy's `latency_budget_ms`. That read is the
   only I/O of a decision.
2. Decide on the event loop: `nextbest.decide.decision.decide` is pure numpy/Python over the
   in-memory model, attributes and trending list, sub-millisecond on the demo catalog.
   Running it inline rather than in a thread saves two GIL hand-offs per request,
   which under load cost far more than the work (the loop thread waits up to the
   interpreter's switch interval each time it wants the GIL back). Large catalogs and
   the no-model LanceDB path, where deciding itself is slow or does I/O, go to the
   thread as well.
3. Degrade: if deciding fails, the same snapshot is ranked without the real-time
   sources (cached, then popular); if the read fails or overruns, one short read of
   the cached decision; if that fails too, popular-in-context from memory.

The decision record is handed to the decision log's queue; the caller never waits
for it. Its layout is what `definitions.batch.bandit_log` reads (and what
`nextbest.demo.offer_sim.decision_records` simulates): each shown action with its
`propensity`, every arm the exploring choice drew from in `candidates`
(`{"action_id", "item_id", "score", "propensity"}`), the probability of showing
nothing in `features["propensity"]` when an offer surface showed nothing, the feature
values in `features["values"]`, the pooled candidates with their per-source parts in
`features["pool"]`, and the exploration strategy and seed in `features["exploration"]`
(the seed is the first 32 bits of the decision id, so the decision replays).
"""

import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread

from nextbest.decide.candidates import UserView, user_view
from nextbest.decide.decision import Action, DecisionRequest, Outcome, decide, policy_for_surface
from nextbest.logs import note
from nextbest.spec.models import Policy
from serving.consent import (
    NOT_PERSONALIZED,
    consented,
    explained,
    unlogged_actor,
    unpersonalized_view,
)
from serving.metrics import degraded_reason
from serving.runtime import ServingRuntime
from serving.schemas import ActionOut, DecideIn, DecideOut
from storage.online.models import now_ms
from storage.online.serving import Snapshot

FALLBACK_READ_S = 0.005
INLINE_MAX_ITEMS = 20_000
_ids = random.Random()


def new_decision_id() -> str:
    """128 random bits as hex. Not uuid4: os.urandom releases the GIL, and getting it
    back under load costs more than the whole decision."""
    return f"{_ids.getrandbits(128):032x}"


def view_of(runtime: ServingRuntime, snap: Snapshot) -> UserView:
    state = snap.state
    features: dict[str, float | None] = {}
    values: dict[str, float | None] = {}
    for f in snap.features:
        if f.group_key:
            values[f"{f.feature}[{f.group_key}]"] = f.value
        else:
            features[f.feature] = values[f.feature] = f.value
    cached = snap.cached
    return user_view(
        runtime.spec,
        snap.actor,
        recent_items=state.recent_items if state else (),
        session=state.session if state else None,
        session_vector=state.session_vector if state else None,
        features=features,
        cached=cached.actions if cached else (),
        cached_version=cached.model_version if cached else None,
        cap_counts=snap.cap_counts,
        values=values,
        as_of_ms=now_ms(),  # the online model's feedback fades until the request
    )


def _decide(
    runtime: ServingRuntime,
    policy: Policy,
    request: DecisionRequest,
    view: UserView,
    *,
    realtime: bool,
) -> Outcome:
    return decide(
        runtime.spec,
        policy,
        request,
        view,
        runtime.assets,
        trending=runtime.trending,
        vector_search=runtime.vector_search() if realtime else None,
        realtime=realtime,
        uplift=runtime.uplift,
    )


def _read_and_decide(
    runtime: ServingRuntime, actor: str, surface: str, policy: Policy, request: DecisionRequest
) -> tuple[Snapshot, Outcome | None]:
    snap = _read(runtime, actor, surface, policy)
    return snap, _decide(runtime, policy, request, view_of(runtime, snap), realtime=True)


def _read(runtime: ServingRuntime, actor: str, surface: str, policy: Policy) -> Snapshot:
    caps = {a: runtime.cap_periods[a] for a in policy.actions if a in runtime.cap_periods}
    return runtime.serving.snapshot(actor, surface=surface, caps=caps)


async def _bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run `fn` in a worker thread; None when it overruns (the thread is abandoned)."""
    with anyio.move_on_after(timeout_s):
        return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    return None


def _inline(runtime: ServingRuntime) -> bool:
    model = runtime.assets.model
    return model is not None and model.n_items <= INLINE_MAX_ITEMS


async def decide_request(
    runtime: ServingRuntime, body: DecideIn, candidates: frozenset[str] | None = None
) -> DecideOut:
    started = time.perf_counter()
    requested = body.surface or _context_surface(body.context)
    surface, _, policy, known = policy_for_surface(runtime.spec, requested)
    decision_id = new_decision_id()
    note(decision_id=decision_id)  # on every log line of this request (nextbest.logs)
    request = DecisionRequest(
        surface=surface,
        k=body.k,
        context=body.context,
        exclude=frozenset(body.exclude),
        seed=int(decision_id[:8], 16),
        candidates=candidates,  # only these may be returned (nextbest.decide.rerank)
    )
    notes: list[str] = [] if known else [f"surface {requested!r} unknown; served {surface!r}"]
    if runtime.stream_note is not None:  # features may be stale: the stream is down
        notes.append(runtime.stream_note)
    budget_s = policy.latency_budget_ms / 1000
    actor = body.user_id
    snap: Snapshot | None = None
    outcome: Outcome | None = None
    if runtime.consent is not None and not await consented(runtime, actor, budget_s):
        view = unpersonalized_view(runtime, actor, policy)  # nothing of the user is read
        outcome = explained(_decide(runtime, policy, request, view, realtime=False))
        if outcome.served_from != "realtime":
            runtime.metrics.fallbacks.labels("no_consent", outcome.served_from).inc()
        return _respond(
            runtime, body, decision_id, request, policy, outcome, None, view, notes, personal=False
        )
    left_s = max(budget_s - (time.perf_counter() - started), 0.0)  # after the consent read
    try:
        if _inline(runtime):
            caps = {a: runtime.cap_periods[a] for a in policy.actions if a in runtime.cap_periods}
            snap = await runtime.reader.read_within(
                actor, surface=surface, caps=caps, timeout_s=left_s
            )
        else:
            pair = await _bounded(
                lambda: _read_and_decide(runtime, actor, surface, policy, request), left_s
            )
            snap, outcome = pair if pair is not None else (None, None)
        if snap is None:
            notes.append(f"realtime: over the {policy.latency_budget_ms} ms budget")
    except Exception as exc:
        notes.append(f"realtime: {type(exc).__name__}")
    if snap is not None:
        runtime.answers.put(actor, surface, snap.cached)
    view = view_of(runtime, snap) if snap is not None else UserView(actor=actor)
    if snap is not None and outcome is None:
        try:
            outcome = _decide(runtime, policy, request, view, realtime=True)
        except Exception as exc:  # e.g. a model artifact that does not fit the catalog
            notes.append(f"realtime: decide {type(exc).__name__}")
    if snap is None and "cached" in policy.fallbacks:
        # The copy the last read of this user brought (no I/O), else one short read.
        remaining = max(budget_s - (time.perf_counter() - started), FALLBACK_READ_S)
        try:
            cached = runtime.answers.get(actor, surface) or await _bounded(
                lambda: runtime.online.get_cached_decision(actor, surface), remaining
            )
            if cached is not None:
                view = UserView(actor, cached=cached.actions, cached_version=cached.model_version)
        except Exception as exc:
            notes.append(f"cached: {type(exc).__name__}")
    if outcome is None:
        outcome = _decide(runtime, policy, request, view, realtime=False)
    notes.extend(outcome.degraded)
    reasons = [degraded_reason(note) for note in notes]
    for reason in reasons:
        runtime.metrics.degraded.labels(reason).inc()
    if outcome.served_from != "realtime":
        why = _fallback_reason(runtime, snap, reasons)
        runtime.metrics.fallbacks.labels(why, outcome.served_from).inc()
    return _respond(runtime, body, decision_id, request, policy, outcome, snap, view, notes)


def _fallback_reason(runtime: ServingRuntime, snap: Snapshot | None, reasons: list[str]) -> str:
    """Why a decision was not served in real time, as a bounded metric label."""
    for reason in reasons:
        if reason in ("budget", "store_error", "decide_error"):
            return reason
    if runtime.assets.model is None:
        return "no_model"
    if snap is not None and snap.state is None and not snap.features:
        return "no_state"
    return "stale_state" if snap is not None else "other"


def _context_surface(context: dict[str, Any]) -> str | None:
    value = context.get("surface")
    return value if isinstance(value, str) and value else None


def _respond(
    runtime: ServingRuntime,
    body: DecideIn,
    decision_id: str,
    request: DecisionRequest,
    policy: Policy,
    outcome: Outcome,
    snap: Snapshot | None,
    view: UserView,
    notes: list[str],
    *,
    personal: bool = True,
) -> DecideOut:
    now = now_ms()
    surface = request.surface
    model = runtime.assets.model
    if outcome.served_from == "cached" and view.cached_version:
        model_version = view.cached_version
    else:
        model_version = model.version if model is not None else None
    age = _feature_age(runtime, snap, now)
    runtime.metrics.decisions.labels(outcome.served_from, surface).inc()
    catalog = runtime.assets.attributes
    actions = [_action_out(a, catalog) for a in outcome.actions]
    actor = view.actor
    caps = [
        (actor, a.action_id, runtime.cap_periods[a.action_id])
        for a in outcome.actions
        if a.action_id in runtime.cap_periods
    ]
    features: dict[str, Any] = {
        "values": view.values,
        "feature_age_ms": age,
        "surface": surface,
        "context": body.context,
        "requested_user_id": body.user_id,
        "sources": outcome.sources,
        "degraded": notes,
        "pool": outcome.candidates,  # evaluated by the log writer thread
        "exploration": {
            "strategy": policy.exploration.strategy,
            "epsilon": policy.exploration.epsilon,
            "seed": request.seed,
        },
    }
    if request.candidates is not None:  # propensities are within the given items
        features["candidates"] = sorted(request.candidates)
    if not outcome.actions and outcome.propensity_none is not None:
        features["propensity"] = outcome.propensity_none
    if not personal:
        features["personalized"] = NOT_PERSONALIZED  # and `values` is empty
        del features["requested_user_id"]  # no id of a user without consent is logged
        actor = unlogged_actor(decision_id)  # the record's user_id and log key
    record = {
        "record": "decision",
        "decision_id": decision_id,
        "user_id": actor,
        "ts": datetime.fromtimestamp(now / 1000, tz=UTC).isoformat(),
        "served_from": outcome.served_from,
        "model_version": model_version,
        "actions": [
            {
                "action_id": a.action_id,
                "item_id": a.item_id,
                "score": a.score,
                "source": a.source,
                "propensity": a.propensity,
            }
            for a in outcome.actions
        ],
        "candidates": outcome.arms,
        "features": features,
    }
    runtime.decision_log.submit(actor, record, caps)
    return DecideOut(
        decision_id=decision_id,
        user_id=body.user_id,
        surface=surface,
        actions=actions,
        served_from=outcome.served_from,
        model_version=model_version,
        feature_age_ms=age,
        degraded=notes,
    )


def _action_out(a: Action, catalog: Mapping[str, dict[str, Any]]) -> ActionOut:
    """An item action shows its item's catalogue attributes from the in-memory catalog
    (one dict lookup, shared not copied: no I/O per decision); an offer its own title."""
    attrs = catalog.get(a.item_id) if a.item_id is not None else None
    if not attrs:
        return ActionOut(a.action_id, a.item_id, a.score, a.source, a.reasons, a.title)
    title = a.title if a.title is not None else attrs.get("title")
    title = title if isinstance(title, str) else None
    return ActionOut(a.action_id, a.item_id, a.score, a.source, a.reasons, title, attrs)


def _feature_age(runtime: ServingRuntime, snap: Snapshot | None, now: int) -> int | None:
    if snap is None:
        return None
    newest: int | None = None
    for f in snap.features:
        newest = f.event_ts_ms if newest is None else max(newest, f.event_ts_ms)
    state = snap.state
    if state is not None:
        newest = state.event_ts_ms if newest is None else max(newest, state.event_ts_ms)
        runtime.metrics.observe_lag(snap.actor, state.event_ts_ms, state.updated_at_ms)
    return None if newest is None else max(0, now - newest)
