"""Item slates: diversity, the exploring first slot, the online model's group terms
and the reasons of each item.

Split from `nextbest.decide.decision` (which explains the exploration model) to keep both small.
"""

import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nextbest.decide.candidates import UserView
from nextbest.decide.exploration import explore
from nextbest.decide.pool import Pooled
from nextbest.learn.online_model import Adjustment
from nextbest.spec.models import Policy

EXPLORE_ARMS = 20
"""Arms of an item slate's first slot: the greedy top k and the next candidates."""

Ranked = tuple[str, int | None, float]


def diverse(
    policy: Policy, attributes: dict[str, dict[str, Any]], ranked: Iterator[Ranked], k: int
) -> list[Ranked]:
    """Top k keeping at most `max_per_group` items per `group_by` attribute value."""
    out: list[Ranked] = []
    if k <= 0:
        return out
    limit = policy.max_per_group if policy.group_by is not None else None
    counts: dict[Any, int] = {}
    for entry in ranked:
        if limit is not None:
            group = (attributes.get(entry[0]) or {}).get(policy.group_by or "")
            if counts.get(group, 0) >= limit:
                continue
            counts[group] = counts.get(group, 0) + 1
        out.append(entry)
        if len(out) == k:
            break
    return out


def explore_slate(
    policy: Policy,
    seed: int,
    action_name: str,
    slate: list[Ranked],
    rest: Iterator[Ranked],
    arms: list[dict[str, Any]],
) -> tuple[list[Ranked], float]:
    """(the slate with its first slot drawn by the strategy, that slot's probability);
    appends the arms with their probabilities to `arms`."""
    if not slate:
        return slate, 1.0
    ranked = list(slate)
    ranked.extend(e for _, e in zip(range(max(EXPLORE_ARMS - len(slate), 0)), rest, strict=False))
    strategy = policy.exploration.strategy
    chosen, probs = explore(
        [e[2] for e in ranked], 0, strategy, epsilon=policy.exploration.epsilon, seed=seed
    )
    arms.extend(
        {"action_id": action_name, "item_id": e[0], "score": round(e[2], 6), "propensity": p}
        for e, p in zip(ranked, probs, strict=True)
    )
    if chosen == 0:
        return slate, probs[0]
    first = ranked[chosen]
    return [first, *(e for e in slate if e[0] != first[0])][: len(slate)], probs[chosen]


@dataclass(frozen=True, slots=True)
class GroupBoosts:
    """The user's online model per value of the policy's `group_by` attribute (e.g.
    `category`): items of a group the user clicked rise, of one they dismissed sink."""

    attr: str
    attributes: Mapping[str, Mapping[str, Any]]
    by_group: dict[str, Adjustment]

    def of(self, item: str) -> Adjustment | None:
        value = (self.attributes.get(item) or {}).get(self.attr)
        return None if value is None else self.by_group.get(str(value))

    def rerank(self, ranked: Iterator[Ranked]) -> Iterator[Ranked]:
        """`ranked` (best first) by score + term, still lazily: an item is yielded once
        no later one can beat it (later ones score at most the current raw score plus
        the largest positive term), so a long pool is never ranked in full."""
        lift = max(0.0, max((a.term for a in self.by_group.values()), default=0.0))
        heap: list[tuple[float, int, Ranked]] = []
        for n, (item, j, score) in enumerate(ranked):
            found = self.of(item)
            adjusted = score + found.term if found is not None else score
            heapq.heappush(heap, (-adjusted, n, (item, j, adjusted)))
            while heap and -heap[0][0] >= score + lift:
                yield heapq.heappop(heap)[2]
        while heap:
            yield heapq.heappop(heap)[2]


def online_boosts(
    policy: Policy, user: UserView, attributes: Mapping[str, Mapping[str, Any]]
) -> GroupBoosts | None:
    """The online model's group terms for this decision; None when there are none."""
    settings = policy.online_model
    if user.online is None or not settings.enabled or policy.group_by is None:
        return None
    by_group = user.online.groups(policy.group_by, settings)
    return GroupBoosts(policy.group_by, attributes, by_group) if by_group else None


def item_reasons(p: Pooled, because: list[str]) -> list[str]:
    reasons: list[str] = []
    for source, contribution in sorted(p.parts.items(), key=lambda kv: -kv[1]):
        raw = p.raw.get(source, 0.0)
        if source == "item_model":
            tail = f" because of {', '.join(because)}" if because else ""
            reasons.append(f"item_model: {raw:.3f}{tail}")
        elif source == "vector":
            reasons.append(f"vector: similarity {raw:.3f} to the current session")
        elif source == "trending":
            reasons.append(f"trending: {raw:g} recent interactions")
        elif source == "cached":
            reasons.append(f"cached: precomputed score {raw:.3f}")
        elif source == "popular":
            reasons.append(f"popular: {raw:g} users")
        else:
            reasons.append(f"{source}: {contribution:.3f}")
    return reasons
