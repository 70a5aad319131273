"""A seeded offer simulator that knows the truth, for testing OPE and uplift.

Each simulated user has features on the demo spec's scale (`views_1h`,
`cart_adds_1h`, `spend_30d`, `category_affinity_7d[...]`) and, per offer, a hidden
response type: persuadable (converts only when offered), sure thing (converts
anyway), lost cause (never), do-not-disturb (converts unless offered). Types are
drawn from feature-dependent probabilities built around one shared baseline:
P(convert without offer) = p0(x); an offer persuades a would-not-converter with
q_k(x) and puts off a would-converter with d_k(x). Spend and cart adds raise the
baseline, so a response-rate ranking fills its top with sure things; heavy spenders
are often put off; cart-adders with low spend (free shipping) and browsers with an
outdoor taste (10% off) are the persuadables an uplift model should find.

Because the probabilities are known, `policy_value` and `incremental_conversions`
give the exact expected value of any policy on given users: what OPE estimates and
uplift rankings are checked against. Pure: no I/O, every draw from a seeded generator.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np

from nextbest.learn.ope import NO_ACTION, BanditLog, greedy
from nextbest.learn.uplift import log_features

CATEGORIES = ("outdoor", "home", "beauty")
FEATURES = (
    "views_1h",
    "cart_adds_1h",
    "spend_30d",
    *(f"category_affinity_7d[{c}]" for c in CATEGORIES),
)
TYPES = ("persuadable", "sure_thing", "lost_cause", "do_not_disturb")
Strategy = Literal["epsilon_greedy", "thompson", "uniform"]

# Hidden responses on the standardized log-feature scale z (order of FEATURES).
_CENTER = np.array([1.55, 0.25, 1.9, 1.0, 1.0, 1.0])
_SPREAD = np.array([0.8, 0.4, 1.4, 0.8, 0.8, 0.8])


@dataclass(frozen=True)
class Response:
    """Logistic (intercept, coefficients over z) of one hidden probability."""

    intercept: float
    coef: tuple[float, ...]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.intercept + z @ np.asarray(self.coef))))


@dataclass(frozen=True)
class OfferWorld:
    """The hidden truth: baseline conversion, and per offer persuasion and put-off."""

    offers: tuple[str, ...] = ("free_shipping", "ten_percent_off")
    base: Response = Response(-1.5, (0.2, 0.6, 1.0, 0.0, 0.0, 0.0))
    persuade: Mapping[str, Response] = field(
        default_factory=lambda: {
            "free_shipping": Response(-2.2, (0.3, 1.2, -0.8, 0.0, 0.0, 0.0)),
            "ten_percent_off": Response(-2.4, (0.9, 0.0, -0.5, 0.8, 0.0, -0.3)),
        }
    )
    disturb: Mapping[str, Response] = field(
        default_factory=lambda: {
            "free_shipping": Response(-1.6, (0.0, 0.0, 1.4, 0.0, 0.0, 0.0)),
            "ten_percent_off": Response(-1.4, (0.0, 0.0, 1.2, 0.0, 0.5, 0.0)),
        }
    )
    none_score: float = 0.25
    """The logging policy's score for showing nothing (offers score their response rate)."""

    @property
    def arms(self) -> tuple[str, ...]:
        return (NO_ACTION, *self.offers)


@dataclass(frozen=True)
class Users:
    """Sampled users: raw feature values, model inputs `x`, hidden probabilities and
    the realized hidden types (index into TYPES) per offer."""

    raw: np.ndarray  # (n, len(FEATURES))
    x: np.ndarray  # log_features(raw)
    p_base: np.ndarray  # (n,)
    p_persuade: np.ndarray  # (n, K)
    p_disturb: np.ndarray  # (n, K)
    types: np.ndarray  # (n, K) int8

    @property
    def n(self) -> int:
        return len(self.p_base)

    def expected_rewards(self) -> np.ndarray:
        """(n, 1 + K) P(convert | arm): column 0 no offer, then each offer."""
        p0 = self.p_base[:, None]
        p1 = p0 * (1 - self.p_disturb) + (1 - p0) * self.p_persuade
        return np.hstack([p0, p1])

    def uplift(self) -> np.ndarray:
        """(n, K) true expected uplift of each offer."""
        p = self.expected_rewards()
        return p[:, 1:] - p[:, :1]

    def type_probabilities(self, offer: int) -> np.ndarray:
        """(n, 4) probabilities of TYPES for offer index `offer`."""
        p0, q, d = self.p_base, self.p_persuade[:, offer], self.p_disturb[:, offer]
        return np.column_stack([(1 - p0) * q, p0 * (1 - d), (1 - p0) * (1 - q), p0 * d])

    def outcomes(self, arms: np.ndarray) -> np.ndarray:
        """Realized conversions (0/1) when each user gets `arms[i]` (0 = no offer)."""
        rows = np.arange(self.n)
        t = self.types[rows, np.maximum(arms - 1, 0)]
        treated = np.isin(t, (0, 1))  # persuadable or sure thing
        untreated = np.isin(t, (1, 3))  # sure thing or do-not-disturb
        return np.where(arms > 0, treated, untreated).astype(float)

    def feature_dicts(self) -> list[dict[str, float]]:
        return [dict(zip(FEATURES, map(float, row), strict=True)) for row in self.raw]


def sample_users(world: OfferWorld, n: int, *, seed: int) -> Users:
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 0.8, n)
    views = rng.poisson(4.0 * activity)
    carts = rng.binomial(views, 0.08)
    spend = rng.lognormal(2.4, 1.1, n) * rng.binomial(1, 0.75, n)
    affinity = rng.dirichlet(np.full(len(CATEGORIES), 0.6), n) * (views[:, None] * 1.5 + 1)
    raw = np.column_stack([views, carts, spend, affinity]).astype(float)
    x = log_features(raw)
    z = (x - _CENTER) / _SPREAD
    p_base = world.base(z)
    p_pers = np.column_stack([world.persuade[o](z) for o in world.offers])
    p_dist = np.column_stack([world.disturb[o](z) for o in world.offers])
    # One shared baseline draw per user keeps "would convert anyway" consistent across offers.
    y0 = rng.random(n) < p_base
    u = rng.random((n, len(world.offers)))
    types = np.where(y0[:, None], np.where(u < p_dist, 3, 1), np.where(u < p_pers, 0, 2)).astype(
        np.int8
    )
    return Users(raw, x, p_base, p_pers, p_dist, types)


def policy_value(users: Users, probs: np.ndarray) -> float:
    """Exact expected conversion rate of a policy (n, 1 + K) on these users."""
    return float(np.mean(np.sum(probs * users.expected_rewards(), axis=1)))


def incremental_conversions(users: Users, treat: np.ndarray, offer: int) -> float:
    """Expected conversions caused by giving offer index `offer` to the users in `treat`."""
    return float(users.uplift()[np.asarray(treat, dtype=bool), offer].sum())


def logging_scores(world: OfferWorld, users: Users) -> np.ndarray:
    """The current (response-rate) policy's scores: each offer's conversion rate when
    shown, and a fixed bar for showing nothing."""
    scores = users.expected_rewards().copy()
    scores[:, 0] = world.none_score
    return scores


def action_probabilities(
    scores: np.ndarray,
    strategy: Strategy,
    *,
    epsilon: float = 0.1,
    noise: float = 0.1,
    draws: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """(n, A) probabilities the exploring policy chooses each arm with. Thompson: the
    frequency each arm is the argmax under Gaussian score noise (Monte Carlo, then
    mixed with `epsilon` uniform so no arm has probability 0)."""
    n, a = scores.shape
    uniform = np.full((n, a), 1.0 / a)
    if strategy == "uniform":
        return uniform
    if strategy == "epsilon_greedy":
        return (1 - epsilon) * greedy(scores) + epsilon * uniform
    rng = np.random.default_rng(seed)
    wins = np.zeros((n, a))
    for _ in range(draws):
        noisy = scores + rng.normal(0.0, noise, scores.shape)
        wins[np.arange(n), np.argmax(noisy, axis=1)] += 1
    return (1 - epsilon) * wins / draws + epsilon * uniform


@dataclass(frozen=True)
class OfferLog:
    """What an exploring policy logged: chosen arm, its probability, the outcome."""

    world: OfferWorld
    users: Users
    scores: np.ndarray  # (n, A) logging scores
    probs: np.ndarray  # (n, A) logging probabilities
    actions: np.ndarray  # (n,) chosen arm index
    rewards: np.ndarray  # (n,) realized conversion

    @property
    def propensities(self) -> np.ndarray:
        return self.probs[np.arange(len(self.actions)), self.actions]

    def bandit(self) -> BanditLog:
        return BanditLog(
            self.users.x, self.actions, self.propensities, self.rewards, len(self.world.arms)
        )


def simulate_log(
    world: OfferWorld,
    n: int,
    *,
    seed: int,
    strategy: Strategy = "epsilon_greedy",
    epsilon: float = 0.2,
    noise: float = 0.1,
) -> OfferLog:
    """n decisions for fresh users by the exploring response-rate policy."""
    users = sample_users(world, n, seed=seed)
    scores = logging_scores(world, users)
    probs = action_probabilities(scores, strategy, epsilon=epsilon, noise=noise, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    cdf = np.cumsum(probs, axis=1)
    actions = np.minimum((rng.random(n)[:, None] > cdf).sum(axis=1), probs.shape[1] - 1)
    return OfferLog(world, users, scores, probs, actions, users.outcomes(actions))


def randomized_exposure(
    world: OfferWorld, n: int, offer: int, *, seed: int, p_treat: float = 0.5
) -> tuple[Users, np.ndarray, np.ndarray]:
    """(users, treated, converted) for an A/B exposure of offer index `offer`."""
    users = sample_users(world, n, seed=seed)
    treated = np.random.default_rng(seed + 3).random(n) < p_treat
    arms = np.where(treated, offer + 1, 0)
    return users, treated, users.outcomes(arms)


def uplift_policy(uplift: np.ndarray) -> np.ndarray:
    """(n, 1 + K) deterministic policy: the offer with the highest uplift when > 0."""
    gains = np.hstack([np.zeros((len(uplift), 1)), uplift])
    return greedy(gains)


def decision_records(
    log: OfferLog,
    *,
    start: datetime,
    surface: str = "checkout",
    prefix: str = "sim",
    step: timedelta = timedelta(seconds=30),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(decisions, feedback) rows for `decisions_to_table` / `feedback_to_table` in the
    layout an exploring API logs: the shown offer (none when the control arm was
    drawn) with its `propensity`, every arm in `candidates` with score and
    propensity, the probability of showing nothing in `features["propensity"]`, and
    feature values in `features["values"]`. Conversions are feedback rows."""
    arms = log.world.arms
    decisions: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    features = log.users.feature_dicts()
    for i, a in enumerate(log.actions.tolist()):
        ts = start + i * step
        did, uid = f"{prefix}-d{i:06d}", f"{prefix}-u{i:06d}"
        p = log.probs[i]
        shown = (
            []
            if a == 0
            else [
                {
                    "action_id": arms[a],
                    "item_id": None,
                    "score": float(log.scores[i, a]),
                    "source": "rules",
                    "propensity": float(p[a]),
                }
            ]
        )
        candidates = [
            {"action_id": arm, "score": float(log.scores[i, j]), "propensity": float(p[j])}
            for j, arm in enumerate(arms)
        ]
        extra = {"propensity": float(p[0])} if a == 0 else {}
        decisions.append(
            {
                "decision_id": did,
                "user_id": uid,
                "ts": ts,
                "served_from": "realtime",
                "model_version": "sim",
                "actions": shown,
                "candidates": candidates,
                "features": {"values": features[i], "surface": surface, **extra},
            }
        )
        if shown:
            feedback.append(_feedback(did, uid, "impression", arms[a], ts))
        if log.rewards[i] > 0:
            feedback.append(_feedback(did, uid, "conversion", arms[a] if a else None, ts))
    return decisions, feedback


def _feedback(
    decision_id: str, user_id: str, outcome: str, action_id: str | None, ts: datetime
) -> dict[str, Any]:
    return {
        "decision_id": decision_id,
        "user_id": user_id,
        "outcome": outcome,
        "action_id": action_id,
        "item_id": None,
        "ts": ts + timedelta(minutes=2),
        "value": 1.0,
    }


def type_shares(users: Users, offers: Sequence[int] | None = None) -> dict[str, float]:
    """Share of each realized hidden type (over the given offer indices): a sanity view."""
    cols = list(range(users.types.shape[1])) if offers is None else list(offers)
    t = users.types[:, cols].ravel()
    return {name: float(np.mean(t == k)) for k, name in enumerate(TYPES)}
