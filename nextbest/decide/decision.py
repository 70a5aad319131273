"""The next-best-action decision: blend candidates, apply the spec's rules, rank, explain.

Pure and synchronous: everything it needs (model, item attributes, trending counts,
the user's online view) is passed in, so the API calls it on data it holds in memory
and the tests call it without HTTP or stores.

Blending: each source's raw scores are divided by that source's best score (so a
source contributes at most its policy weight) and summed per item. An action's
`source` is the source that contributed most; `reasons` say why it was chosen.

Exploration (spec `policy.exploration`, see `nextbest.decide.exploration`): on an item
slate the arms are the greedy (diversified) top k plus the next eligible candidates,
up to `nextbest.decide.slate.EXPLORE_ARMS`; the strategy draws the first slot among
them and the other slots are the greedy slate without that item, so the slate is a deterministic
function of its first item and the first item's probability is the slate's. Every
shown item carries that probability as its `propensity`, and off-policy evaluation
treats the slate as the arm `<action>:<first item>` (a top-1 approximation: a reward
from any slot is credited to the first). An explored first item may exceed
`max_per_group` by one. Offers: `nextbest.decide.offers.choose_offers`. The seed is the
request's (the API derives it from the decision id), so a decision replays exactly.

`served_from` is `realtime` when the user has fresh online state and a real-time
source (item model or vectors) produced candidates, `cached` when the batch side's
precomputed decision carried it, and `fallback` for popular-in-context answers
(unknown users, empty pools, a degraded path).
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any, Literal

import numpy as np

from nextbest.decide import rules
from nextbest.decide.candidates import (
    DEFAULT_HALF_LIFE_MS,
    HistoryScores,
    UserView,
    VectorSearch,
    cached_candidates,
    half_life_ms,
    history_scores,
    popular_in_context,
    top_indices,
    vector_dense,
    vector_search_candidates,
)
from nextbest.decide.offers import Action, choose_offers, decide_offers, policy_for_surface
from nextbest.decide.pool import Pool
from nextbest.decide.rerank import Floor, candidate_mask, fill
from nextbest.decide.slate import diverse, explore_slate, item_reasons, online_boosts
from nextbest.learn.model import ItemModel
from nextbest.learn.uplift import OfferUplift
from nextbest.spec.models import Policy, Spec

__all__ = [
    "Action",
    "Assets",
    "DecisionRequest",
    "Outcome",
    "ServedFrom",
    "decide",
    "policy_for_surface",
]

ServedFrom = Literal["realtime", "cached", "fallback"]
REALTIME_SOURCES = frozenset({"item_model", "vector"})
LOGGED_CANDIDATES = 50


@dataclass(frozen=True, slots=True)
class Assets:
    """What the API keeps in memory between model reloads. `masks` holds, per item
    action, which model items pass the action's static `item.*` rules (e.g. in stock),
    and `groups` each model item's value of every policy's `group_by` attribute."""

    model: ItemModel | None = None
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    popular: list[tuple[str, float]] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    half_life_ms: float = DEFAULT_HALF_LIFE_MS

    @classmethod
    def build(
        cls,
        model: ItemModel | None,
        attributes: Mapping[str, Mapping[str, Any]],
        *,
        spec: Spec | None = None,
        popular_limit: int = 2000,
    ) -> "Assets":
        """Precompute popularity order and eligibility masks once per model load."""
        attrs = {k: dict(v) for k, v in attributes.items()}
        if model is not None and model.n_items:
            popular = model.popular(k=popular_limit)
        else:
            popular = [(item, 0.0) for item in list(attrs)[:popular_limit]]
        masks: dict[str, np.ndarray] = {}
        if model is not None and spec is not None and attrs:
            for name, action in spec.actions.items():
                where = rules.item_rules(action.eligibility.where)
                if action.kind == "item" and where:
                    masks[name] = np.fromiter(
                        (_item_ok(attrs.get(i), where) for i in model.item_ids),
                        dtype=bool,
                        count=model.n_items,
                    )
        half_life = half_life_ms(spec) if spec is not None else DEFAULT_HALF_LIFE_MS
        return cls(model, attrs, popular, masks, half_life)

    def with_attributes(
        self, changes: Mapping[str, Mapping[str, Any]], *, spec: Spec | None = None
    ) -> "Assets":
        """A copy with `changes` merged into the items' attributes (PUT /v1/items) and
        only the changed items' eligibility recomputed: O(changes) plus one shallow
        copy, cheap enough to run every few seconds in every API process."""
        attrs = dict(self.attributes)
        for item, new in changes.items():
            attrs[item] = {**attrs.get(item, {}), **new}
        model = self.model
        if model is None or spec is None:
            return replace(self, attributes=attrs)
        if not self.masks and any(  # built without a catalogue: the masks afresh
            a.kind == "item" and rules.item_rules(a.eligibility.where)
            for a in spec.actions.values()
        ):
            return Assets.build(model, attrs, spec=spec)
        masks: dict[str, np.ndarray] = {}
        for name, mask in self.masks.items():
            where = rules.item_rules(spec.actions[name].eligibility.where)
            updated = mask.copy()
            for item in changes:
                j = model.index.get(item)
                if j is not None:
                    updated[j] = _item_ok(attrs.get(item), where)
            masks[name] = updated
        return replace(self, attributes=attrs, masks=masks)


def _item_ok(attrs: Mapping[str, Any] | None, where: list[Any]) -> bool:
    return attrs is not None and all(
        rules.compare(c.op, attrs.get(c.attr[5:]), c.value) for c in where
    )


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    surface: str
    k: int = 10
    context: Mapping[str, Any] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()
    seed: int = 0
    candidates: frozenset[str] | None = None
    """Only these items may be returned (`nextbest.decide.rerank`); None: any."""


@dataclass(frozen=True, slots=True)
class Outcome:
    actions: list[Action]
    served_from: ServedFrom
    pool: Pool
    sources: list[str]
    degraded: list[str]
    arms: list[dict[str, Any]] = field(default_factory=list)
    """Every arm the exploring choice drew from, `{"action_id", "item_id", "score",
    "propensity"}` (the decision log's `candidates`)."""
    propensity_none: float | None = None
    """Probability of showing nothing on an offer surface (None on item surfaces)."""

    def candidates(self, n: int = LOGGED_CANDIDATES) -> dict[str, Any]:
        """The best pooled candidates with per-source contributions, columnar, for the
        decision log's explanation. Deferred: the API calls it on the log's writer
        thread, off the request path."""
        return self.pool.top(n)


def decide(
    spec: Spec,
    policy: Policy,
    request: DecisionRequest,
    user: UserView,
    assets: Assets,
    *,
    trending: Sequence[tuple[str, float]] = (),
    vector_search: VectorSearch | None = None,
    realtime: bool = True,
    uplift: OfferUplift | None = None,
) -> Outcome:
    """Decide the policy's actions for one user. `realtime=False` skips the model and
    vector sources (the degraded path: cached, then popular-in-context); `uplift`
    ranks offers by predicted uplift."""
    item_actions = [a for a in policy.actions if spec.actions[a].kind == "item"]
    other_actions = [a for a in policy.actions if spec.actions[a].kind != "item"]
    degraded: list[str] = []
    items: list[Action] = []
    pool = Pool(assets.model)
    sources: list[str] = []
    arms: list[dict[str, Any]] = []
    if item_actions:
        sources, scored = _gather(
            spec, policy, user, assets, pool, trending, vector_search, realtime, degraded
        )
        items = _rank_items(
            spec, policy, request, user, assets, item_actions[0], pool, scored, degraded, arms
        )
    p_none: float | None = None
    offers: list[Action] = []
    if other_actions:
        eligible = decide_offers(
            spec, policy, request.surface, request.context, user, other_actions, uplift=uplift
        )
        if any(s.source == "cached" for s in eligible):
            sources.append("cached")
        if any(s.source == "uplift" for s in eligible):
            sources.append("uplift")
        offers, offer_arms, p_none = choose_offers(policy, eligible, seed=request.seed)
        arms.extend(offer_arms)
    # Slate order is the exploring choice's (an explored first item stays first); a
    # policy mixing items and offers interleaves them by score.
    mixed = sorted([*items, *offers], key=lambda a: -a.score) if items and offers else None
    actions = (mixed or items or offers)[: request.k]
    return Outcome(
        actions=actions,
        served_from=_served_from(user, items, offers, sources),
        pool=pool,
        sources=sorted(set(sources)),
        degraded=degraded,
        arms=arms,
        propensity_none=p_none,
    )


def _served_from(
    user: UserView, items: list[Action], offers: list[Action], sources: list[str]
) -> ServedFrom:
    if items:
        if user.fresh and REALTIME_SOURCES & set(sources):
            return "realtime"
        return "cached" if any(a.source == "cached" for a in items) else "fallback"
    if offers:
        if user.features:
            return "realtime"
        return "cached" if "cached" in sources else "fallback"
    # Nothing eligible: still a real-time answer when it was decided on fresh state.
    return "realtime" if user.fresh or user.features else "fallback"


def _gather(
    spec: Spec,
    policy: Policy,
    user: UserView,
    assets: Assets,
    pool: Pool,
    trending: Sequence[tuple[str, float]],
    vector_search: VectorSearch | None,
    realtime: bool,
    degraded: list[str],
) -> tuple[list[str], HistoryScores | None]:
    used: list[str] = []
    scored: HistoryScores | None = None
    model = assets.model
    for cand in policy.candidates:
        added = False
        if cand.source == "item_model" and realtime:
            if model is None:
                degraded.append("item_model: no promoted model loaded")
                continue
            scored = history_scores(model, user.history)
            if scored is not None:
                found = top_indices(scored.scores, cand.limit)
                added = pool.add_dense(cand.source, cand.weight, *found)
        elif cand.source == "vector" and realtime:
            try:
                if model is not None:
                    hit = vector_dense(model, user, limit=cand.limit, half_life=assets.half_life_ms)
                    if hit is not None:
                        added = pool.add_dense(cand.source, cand.weight, *hit)
                elif vector_search is not None:
                    hits = vector_search_candidates(user, limit=cand.limit, search=vector_search)
                    added = pool.add(cand.source, cand.weight, hits)
            except Exception as exc:  # a vector store outage must not fail the decision
                degraded.append(f"vector: {type(exc).__name__}")
        elif cand.source == "trending":
            added = pool.add(cand.source, cand.weight, list(trending[: cand.limit]))
        elif cand.source == "cached":
            found_cached = cached_candidates(user, limit=cand.limit)
            added = pool.add(cand.source, cand.weight, found_cached)
        elif cand.source == "popular":
            added = pool.add(cand.source, cand.weight, list(assets.popular[: cand.limit]))
        if added:
            used.append(cand.source)
    return used, scored


def _exclusions(spec: Spec, action_name: str, request: DecisionRequest, user: UserView) -> set[str]:
    out = set(request.exclude)
    for kind in spec.actions[action_name].eligibility.exclude_seen:
        out.update(user.seen.get(kind, ()))
    return out


def _rank_items(
    spec: Spec,
    policy: Policy,
    request: DecisionRequest,
    user: UserView,
    assets: Assets,
    action_name: str,
    pool: Pool,
    scored: HistoryScores | None,
    degraded: list[str],
    arms: list[dict[str, Any]],
) -> list[Action]:
    action = spec.actions[action_name]
    where = action.eligibility.where
    ok, _ = rules.check(
        spec, rules.request_rules(where), item=None, user=user.features, context=request.context
    )
    if not ok:
        return []
    item_where = rules.item_rules(where)
    if item_where and not assets.attributes:
        degraded.append("catalog: no item attributes loaded; item rules skipped")
        item_where = []
    mask = assets.masks.get(action_name) if item_where else None
    banned = _exclusions(spec, action_name, request, user)
    index = assets.model.index if assets.model is not None else {}
    allowed = request.candidates
    pool_mask = mask
    if allowed is not None:
        given = candidate_mask(assets.model, allowed)
        pool_mask = given if mask is None or given is None else mask & given

    def eligible(item: str, j: int | None) -> bool:
        if item in banned or (allowed is not None and item not in allowed):
            return False
        if mask is not None and j is not None:
            return bool(mask[j])
        return not item_where or _item_ok(assets.attributes.get(item), item_where)

    def popular_fill(floor: float) -> Iterator[tuple[str, int | None, float]]:
        """Popular-in-context items after the pool, scored below its lowest score."""
        extra = popular_in_context(
            assets.popular,
            assets.attributes,
            request.context,
            attribute_names=list(spec.entities.item.attributes),
            limit=len(assets.popular),
        )
        best = max((s for _, s in extra), default=0.0)
        for rank, (item, raw) in enumerate(extra):
            j = index.get(item)
            if pool.contains(item, j) or not eligible(item, j):
                continue
            value = floor * 0.5 * (raw / best if best > 0 else 1.0 / (rank + 1))
            pool.add_extra(item, "popular", value, raw)
            yield item, j, value

    pooled, low = pool.ordered(
        mask=pool_mask, banned=banned, keep_extra=lambda item: eligible(item, None)
    )
    with_popular: Iterator[tuple[str, int | None, float]] = (
        chain(pooled, popular_fill(1.0 if low is None else low))
        if "popular" in policy.fallbacks
        else pooled
    )
    if allowed is not None:  # every given item may rank, after the scored ones
        floor = Floor(low)
        with_popular = chain(floor.watch(with_popular), fill(allowed, pool, floor, eligible))
    boosts = online_boosts(policy, user, assets.attributes)  # the online model's groups
    stream = boosts.rerank(with_popular) if boosts is not None else with_popular
    slate = diverse(policy, assets.attributes, stream, request.k)
    chosen, p_first = explore_slate(policy, request.seed, action_name, slate, stream, arms)
    because = (
        scored.because(assets.model, [i for i, _, _ in chosen])
        if assets.model is not None and scored is not None
        else {}
    )
    actions = []
    for slot, (item, j, _) in enumerate(chosen):
        p = pool.explain(item, j)
        reasons = item_reasons(p, because.get(item, []))
        boost = boosts.of(item) if boosts is not None else None
        if boost is not None:
            reasons.append(boost.reason)
        if slot == 0 and policy.exploration.strategy != "none":
            how = "greedy choice" if chosen[0] == slate[0] else "explored"
            reasons.append(f"exploration: {policy.exploration.strategy} {how} (p={p_first:.4f})")
        actions.append(
            Action(
                action_id=action_name,
                item_id=item,
                score=round(p.score + (boost.term if boost is not None else 0.0), 6),
                source=max(p.parts, key=lambda s: p.parts[s]) if p.parts else "popular",
                reasons=reasons,
                propensity=p_first,
            )
        )
    return actions
