"""Per-user online model: what one user's feedback says about each offer and item
group, learned by the stream between retrains and read by the decide path.

The model: per target (an offer, `action:<id>`, or an item group, `<attr>=<value>` such
as `category=toys`) a Beta-Bernoulli posterior of "this user takes it when shown".
Evidence is per exposure (decision x target) and the strongest outcome wins: taken
(click or conversion) > dismissed > ignored (an impression alone: a weak no, weighted
by the policy's `ignored_weight`). A click arriving after the impression of the same
decision moves that exposure from ignored to taken, so clients may report outcomes in
any order and any number of times.

The stream keeps decayed sums of the three kinds per target (one set per half-life
the spec's policies ask for) anchored at the newest exposure, so the state stays a few
numbers per target however much feedback arrives. The reader decays them further to
the request time and adds the policy's prior: old feedback fades towards the prior
and new feedback always moves the posterior, i.e. the model keeps learning.

Idempotence: the newest `MEMORY` exposures are remembered by (decision_id, target); a
repeat is a no-op. An exposure pushed out of that memory leaves an 8-byte digest of its
key (the newest `FORGOTTEN` of them are kept), so a late outcome of it (a conversion
whose own ts is after the forgotten impression's) is dropped rather than counted as a
second exposure, and any record dated at or before the newest forgotten exposure is
dropped too. Exact for the last MEMORY + FORGOTTEN exposures, bounded forever.

Time: a record's ts is the client's (`POST /v1/feedback` accepts any `ts`), and the
evidence is decayed to the newest one, so one record dated a year ahead would decay
everything real to nothing. The stream therefore folds a record at no later than its
processing clock + `MAX_SKEW_MS` (`learn(..., now_ms=)`). Nothing in a record bounds
its ts: it carries no log or ingest time, and a bound from the user's own newest
records would misdate honest feedback after an idle gap, so the clock it is. A replay
of the log rebuilds the same model unless a record was future-dated beyond the skew
when first folded (a replay folds it at its later clock, or at face value once that
time has passed); records with honest timestamps are never touched by the clamp.
"""

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from nextbest.features.state import OnlineEvidence, OnlineSnapshot
from nextbest.spec.models import OnlineModel, Spec

MEMORY = 256
"""Exposures per user remembered for idempotence and late, stronger outcomes."""
FORGOTTEN = 4 * MEMORY
"""Digests of exposures pushed out of memory kept to drop their late outcomes (8 B each)."""
MAX_SKEW_MS = 5 * 60_000
"""How far past the stream's clock a record's ts may lie; later ones are folded at it."""

TAKEN, DISMISSED, IGNORED = 3, 2, 1
"""Signal strengths: a stronger outcome of the same exposure replaces a weaker one."""
SIGNALS: dict[str, int] = {
    "click": TAKEN,
    "conversion": TAKEN,
    "dismiss": DISMISSED,
    "impression": IGNORED,
}
_SLOT = {TAKEN: 0, DISMISSED: 1, IGNORED: 2}
PRIOR_MEAN = 0.5

Key = tuple[int, str, str]  # (ts_ms, decision_id, target): the order exposures are forgotten in


def action_target(action_id: str) -> str:
    return f"action:{action_id}"


def group_target(attr: str, value: Any) -> str:
    return f"{attr}={value}"


def half_life_ms(settings: OnlineModel) -> int:
    return int(settings.half_life.seconds * 1000)


class Feedback(NamedTuple):
    """A feedback record on its way to the user's state step (picklable, plain)."""

    decision_id: str
    user_id: str
    outcome: str
    action_id: str | None
    item_id: str | None
    ts_ms: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Feedback | None":
        """From `pipelines.records.feedback_row`; None when it cannot teach anything
        (no user to route it to, no target, an outcome without a signal)."""
        user, decision, ts = row.get("user_id"), row.get("decision_id"), row.get("ts")
        outcome = row.get("outcome")
        if not user or not decision or outcome not in SIGNALS or not isinstance(ts, datetime):
            return None
        if not row.get("action_id") and not row.get("item_id"):
            return None
        return cls(
            decision,
            user,
            outcome,
            row.get("action_id"),
            row.get("item_id"),
            int(ts.timestamp() * 1000),
        )


@dataclass(frozen=True)
class OnlinePlan:
    """What the stream learns, resolved from the spec once per flow: the half-lives of
    the policies that use the model, their offers and their item `group_by` attributes."""

    half_lives_ms: tuple[int, ...] = ()
    actions: frozenset[str] = frozenset()
    group_attrs: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Spec) -> "OnlinePlan":
        used = [p for p in spec.policies.values() if p.online_model.enabled]
        kinds = {name: a.kind for name, a in spec.actions.items()}
        return cls(
            half_lives_ms=tuple(sorted({half_life_ms(p.online_model) for p in used})),
            actions=frozenset(a for p in used for a in p.actions if kinds[a] != "item"),
            group_attrs=tuple(
                sorted(
                    {
                        p.group_by
                        for p in used
                        if p.group_by and any(kinds[a] == "item" for a in p.actions)
                    }
                )
            ),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.half_lives_ms) and bool(self.actions or self.group_attrs)

    def targets(self, feedback: Feedback, item: Mapping[str, Any] | None) -> list[str]:
        """Item feedback teaches the item's groups; offer feedback the offer. Unknown
        actions teach nothing, so a client cannot grow the state with made-up ids."""
        if feedback.item_id is not None:
            if item is None:
                return []
            return [group_target(a, item[a]) for a in self.group_attrs if item.get(a) is not None]
        if feedback.action_id in self.actions:
            return [action_target(feedback.action_id)]
        return []


@dataclass
class OnlineState:
    """The stream's side: decayed evidence per half-life and target, and the memory
    of recent exposures that makes updates idempotent."""

    anchor_ms: int = 0
    sums: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """half-life ms -> target -> [taken, dismissed, ignored], decayed to `anchor_ms`."""
    counts: dict[str, list[int]] = field(default_factory=dict)
    """target -> [taken, dismissed, ignored] exposures, undecayed (for explanations)."""
    exposures: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """(decision_id, target) -> (ts_ms, signal) of the newest MEMORY exposures."""
    floor: Key | None = None
    """The newest exposure forgotten so far: records at or below it are dropped."""
    forgotten: dict[int, None] = field(default_factory=dict)
    """Digests of the newest FORGOTTEN exposures pushed out of `exposures`, oldest first."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Snapshots pickled before `forgotten` existed restore without it.
        self.__dict__.update(state)
        self.__dict__.setdefault("forgotten", {})

    def snapshot(self) -> tuple[Any, ...]:
        """The `OnlineSnapshot` layout (`nextbest.features.state`) as plain builtins."""
        return (
            self.anchor_ms,
            self.sums,
            self.counts,
            [(d, t, ts, signal) for (d, t), (ts, signal) in self.exposures.items()],
            self.floor,
            list(self.forgotten),
        )

    @classmethod
    def restore(cls, snap: OnlineSnapshot) -> "OnlineState":
        return cls(
            anchor_ms=snap.anchor_ms,
            sums=snap.sums,
            counts=snap.counts,
            exposures={(d, t): (ts, signal) for d, t, ts, signal in snap.exposures},
            floor=snap.floor,
            forgotten=dict.fromkeys(snap.forgotten),
        )

    def ensure(self, half_lives: Iterable[int]) -> None:
        """Keep sums for exactly these half-lives; a new one is rebuilt from memory."""
        wanted = set(half_lives)
        for h in [h for h in self.sums if h not in wanted]:
            del self.sums[h]
        for h in sorted(wanted - set(self.sums)):
            targets: dict[str, list[float]] = {}
            for (_d, target), (ts, signal) in self.exposures.items():
                sums = targets.setdefault(target, [0.0, 0.0, 0.0])
                sums[_SLOT[signal]] += _decay(self.anchor_ms - ts, h)
            self.sums[h] = targets

    def learn(
        self,
        decision_id: str,
        targets: Iterable[str],
        outcome: str,
        ts_ms: int,
        *,
        now_ms: int | None = None,
    ) -> bool:
        """Fold one feedback record in; True when it changed anything. With `now_ms`
        (the stream's clock) a ts later than now_ms + MAX_SKEW_MS is folded at that bound."""
        signal = SIGNALS.get(outcome)
        if signal is None:
            return False
        if now_ms is not None:
            ts_ms = min(ts_ms, now_ms + MAX_SKEW_MS)
        changed = False
        for target in targets:
            changed = self._expose(decision_id, target, signal, ts_ms) or changed
        return changed

    def _expose(self, decision_id: str, target: str, signal: int, ts_ms: int) -> bool:
        if self.floor is not None and (ts_ms, decision_id, target) <= self.floor:
            return False
        key = (decision_id, target)
        old = self.exposures.get(key)
        if old is None and self.forgotten and _digest(decision_id, target) in self.forgotten:
            return False  # a late outcome of an exposure already counted, then forgotten
        if old is not None:
            new = (min(old[0], ts_ms), max(old[1], signal))
            if new == old:
                return False
            self._add(target, old[1], old[0], -1)
        else:
            new = (ts_ms, signal)
        self._rescale(new[0])
        self._add(target, new[1], new[0], 1)
        self.exposures[key] = new
        if len(self.exposures) > MEMORY:
            (d, t), (ts, _s) = min(self.exposures.items(), key=lambda kv: (kv[1][0], *kv[0]))
            del self.exposures[(d, t)]
            self.floor = (ts, d, t)
            self.forgotten[_digest(d, t)] = None
            if len(self.forgotten) > FORGOTTEN:
                del self.forgotten[next(iter(self.forgotten))]
        return True

    def _rescale(self, ts_ms: int) -> None:
        if ts_ms <= self.anchor_ms:
            return
        for h, targets in self.sums.items():
            factor = _decay(ts_ms - self.anchor_ms, h)
            for sums in targets.values():
                for slot in range(3):
                    sums[slot] *= factor
        self.anchor_ms = ts_ms

    def _add(self, target: str, signal: int, ts_ms: int, sign: int) -> None:
        slot = _SLOT[signal]
        for h, targets in self.sums.items():
            sums = targets.setdefault(target, [0.0, 0.0, 0.0])
            sums[slot] = max(0.0, sums[slot] + sign * _decay(self.anchor_ms - ts_ms, h))
        counts = self.counts.setdefault(target, [0, 0, 0])
        counts[slot] += sign

    def evidence(self) -> OnlineEvidence:
        """The online store's copy (`SessionState.online_model`)."""
        return OnlineEvidence(
            anchor_ms=self.anchor_ms,
            half_lives={
                h: {
                    t: (round(v[0], 9), round(v[1], 9), round(v[2], 9))
                    for t, v in sorted(ts.items())
                }
                for h, ts in sorted(self.sums.items())
            },
            counts={t: (v[0], v[1], v[2]) for t, v in sorted(self.counts.items())},
        )

    def to_json(self) -> dict[str, Any]:
        """`evidence()` as JSON builtins (what a version-0 row held)."""
        return msgspec.to_builtins(self.evidence(), str_keys=True)


def _digest(decision_id: str, target: str) -> int:
    """A stable 64-bit digest of an exposure key (not `hash()`: salted per process, and
    the digests outlive it in recovery snapshots)."""
    raw = hashlib.blake2b(f"{decision_id}\x1f{target}".encode(), digest_size=8).digest()
    return int.from_bytes(raw)


def _decay(age_ms: float, half_life_ms: float) -> float:
    return 2.0 ** (-max(age_ms, 0.0) / half_life_ms)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A bounded score term from one target's posterior, and why."""

    term: float
    mean: float
    reason: str


@dataclass(frozen=True, slots=True)
class OnlineView:
    """The decide path's side: the stored evidence, decayed to `as_of_ms` on read."""

    anchor_ms: int
    sums: dict[int, dict[str, tuple[float, float, float]]]
    counts: dict[str, tuple[int, int, int]]
    as_of_ms: int

    @classmethod
    def parse(cls, raw: Any, *, as_of_ms: int | None = None) -> "OnlineView | None":
        """From the stored evidence (typed, or its JSON); None when absent, empty or
        malformed (never raises: the decision goes on without the online model)."""
        if isinstance(raw, OnlineEvidence):
            evidence = raw
        elif not isinstance(raw, Mapping) or not raw.get("half_lives"):
            return None
        else:
            try:
                evidence = msgspec.convert(raw, OnlineEvidence, str_keys=True, strict=False)
            except msgspec.ValidationError:
                return None
        if not evidence.half_lives:
            return None
        anchor = evidence.anchor_ms
        return cls(anchor, evidence.half_lives, evidence.counts, max(anchor, as_of_ms or 0))

    def adjust(self, target: str, label: str, settings: OnlineModel) -> Adjustment | None:
        """weight x (posterior mean - prior mean): within +/- weight/2 whatever the
        evidence. None when the policy's half-life has no evidence on `target`."""
        h = half_life_ms(settings)
        sums = self.sums.get(h, {}).get(target)
        if sums is None:
            return None
        factor = _decay(self.as_of_ms - self.anchor_ms, h)
        taken, dismissed, ignored = sums
        a = settings.prior * PRIOR_MEAN + taken * factor
        b = (
            settings.prior * (1 - PRIOR_MEAN)
            + (dismissed + settings.ignored_weight * ignored) * factor
        )
        mean = a / (a + b)
        term = settings.weight * (mean - PRIOR_MEAN)
        names = ("clicked/converted", "dismissed", "ignored")
        counts = self.counts.get(target, (0, 0, 0))
        seen = ", ".join(f"{n} {c}x" for n, c in zip(names, counts, strict=True) if c > 0)
        reason = (
            f"online model: {label} {seen or 'no recent feedback'}; posterior {mean:.3f} "
            f"vs prior {PRIOR_MEAN:.3f} ({term:+.3f})"
        )
        return Adjustment(term, mean, reason)

    def groups(self, attr: str, settings: OnlineModel) -> dict[str, Adjustment]:
        """Adjustments of every value of item attribute `attr` with evidence."""
        prefix = f"{attr}="
        out: dict[str, Adjustment] = {}
        for target in self.sums.get(half_life_ms(settings), {}):
            if target.startswith(prefix):
                found = self.adjust(target, target, settings)
                if found is not None:
                    out[target[len(prefix) :]] = found
        return out
