"""Off-policy evaluation: the value of a candidate policy from what another policy logged.

Why: a new ranking or offer policy should prove it beats the current one before it is
served, using only the exploring policy's log of (context, chosen action, probability
it was chosen with, reward). IPS reweights logged rewards by target/logging
probability; self-normalized IPS divides by the weights' sum (biased, far less
variance when weights are large); doubly robust adds a reward model's prediction for
every action and only reweights its residual, so variance drops as the model improves
while staying unbiased when the logged propensities are right.

Every estimate carries a confidence interval: a normal approximation from per-sample
(influence) terms, or a percentile bootstrap. Pure numpy; no I/O.
"""

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from nextbest.learn.uplift import Basis, expand

Interval = Literal["normal", "bootstrap"]
Method = Literal["ips", "snips", "dr"]
METHODS: tuple[Method, ...] = ("ips", "snips", "dr")
NO_ACTION = "none"
"""The arm of showing nothing: the control arm of an offer surface."""


@dataclass(frozen=True)
class BanditLog:
    """Logged rounds: `x` (n, d) contexts, `actions` (n,) in [0, n_actions), the logging
    policy's probability of each logged action, and the observed reward."""

    x: np.ndarray
    actions: np.ndarray
    propensities: np.ndarray
    rewards: np.ndarray
    n_actions: int

    def __post_init__(self) -> None:
        n = len(self.actions)
        if self.x.ndim != 2 or self.x.shape[0] != n:
            raise ValueError(f"x must be (n, d) with n={n}, got {self.x.shape}")
        if self.propensities.shape != (n,) or self.rewards.shape != (n,):
            raise ValueError("actions, propensities and rewards must have the same length")
        if n and (self.actions.min() < 0 or self.actions.max() >= self.n_actions):
            raise ValueError(f"actions must lie in [0, {self.n_actions})")
        if n and not (np.all(self.propensities > 0) and np.all(self.propensities <= 1)):
            raise ValueError("logged propensities must lie in (0, 1]")

    @property
    def n(self) -> int:
        return len(self.actions)

    def subset(self, rows: np.ndarray) -> "BanditLog":
        return BanditLog(
            self.x[rows],
            self.actions[rows],
            self.propensities[rows],
            self.rewards[rows],
            self.n_actions,
        )


@dataclass(frozen=True)
class Estimate:
    """A policy value with its (1 - alpha) interval; `ess` is the effective sample size
    of the importance weights ((sum w)^2 / sum w^2): how many on-policy rows the log is
    worth for this target, the first thing to check when an interval is wide."""

    method: str
    value: float
    low: float
    high: float
    std_error: float
    n: int
    ess: float
    clipped: int = 0

    def covers(self, truth: float) -> bool:
        return self.low <= truth <= self.high

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


class RewardModel:
    """Per-action ridge regression of reward on context (with intercept): the direct
    method's model inside doubly robust. Actions never logged predict the mean reward."""

    def __init__(self, coef: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
        self.coef = coef  # (n_actions, d + 1), last column the intercept
        self.mean = mean
        self.scale = scale

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        n_actions: int,
        *,
        l2: float = 1.0,
    ) -> "RewardModel":
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        scale = x.std(axis=0) if len(x) else np.ones(x.shape[1])
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
        d = z.shape[1]
        prior = float(rewards.mean()) if len(rewards) else 0.0
        coef = np.zeros((n_actions, d))
        coef[:, -1] = prior
        penalty = l2 * np.eye(d)
        penalty[-1, -1] = 1e-9  # the intercept is not shrunk
        for a in range(n_actions):
            rows = actions == a
            if not rows.any():
                continue
            za, ra = z[rows], rewards[rows]
            coef[a] = np.linalg.solve(za.T @ za + penalty, za.T @ ra)
        return cls(coef, mean, scale)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, n_actions) expected rewards."""
        z = np.hstack([(x - self.mean) / self.scale, np.ones((len(x), 1))])
        return z @ self.coef.T


def _check_target(log: BanditLog, target: np.ndarray) -> np.ndarray:
    target = np.asarray(target, dtype=float)
    if target.shape != (log.n, log.n_actions):
        raise ValueError(f"target must be (n, n_actions)={(log.n, log.n_actions)}")
    if np.any(target < -1e-12) or not np.allclose(target.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("target rows must be probability distributions over actions")
    return target


def importance_weights(
    log: BanditLog, target: np.ndarray, *, clip: float | None = None
) -> tuple[np.ndarray, int]:
    """target(a_i | x_i) / logged propensity, capped at `clip`; and how many were capped."""
    target = _check_target(log, target)
    w = target[np.arange(log.n), log.actions] / log.propensities
    if clip is None:
        return w, 0
    return np.minimum(w, clip), int(np.count_nonzero(w > clip))


def effective_sample_size(weights: np.ndarray) -> float:
    total_sq = float(np.sum(weights**2))
    return float(np.sum(weights)) ** 2 / total_sq if total_sq > 0 else 0.0


def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


def _bootstrap(
    stat: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int, seed: int, alpha: float
) -> tuple[float, float, float]:
    """(low, high, std) of `stat` over resampled row indices, in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    values: list[np.ndarray] = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        values.append(stat(idx))
    boot = np.concatenate(values)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high), float(boot.std(ddof=1))


def _from_terms(
    method: str,
    value: float,
    terms: np.ndarray,
    weights: np.ndarray,
    clipped: int,
    *,
    alpha: float,
    interval: Interval,
    boot_stat: Callable[[np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
) -> Estimate:
    n = len(terms)
    ess = effective_sample_size(weights)
    if n < 2:
        return Estimate(method, value, float("nan"), float("nan"), float("nan"), n, ess, clipped)
    if interval == "bootstrap":
        low, high, se = _bootstrap(boot_stat, n, n_boot=n_boot, seed=seed, alpha=alpha)
    else:
        se = float(terms.std(ddof=1) / np.sqrt(n))
        low, high = value - _z(alpha) * se, value + _z(alpha) * se
    return Estimate(method, value, low, high, se, n, ess, clipped)


def ips(
    log: BanditLog,
    target: np.ndarray,
    *,
    clip: float | None = None,
    alpha: float = 0.05,
    interval: Interval = "normal",
    n_boot: int = 500,
    seed: int = 0,
) -> Estimate:
    """Inverse propensity scoring: mean of w_i r_i (unbiased without clipping)."""
    w, clipped = importance_weights(log, target, clip=clip)
    terms = w * log.rewards
    value = float(terms.mean()) if log.n else float("nan")
    return _from_terms(
        "ips",
        value,
        terms,
        w,
        clipped,
        alpha=alpha,
        interval=interval,
        boot_stat=lambda idx: terms[idx].mean(axis=1),
        n_boot=n_boot,
        seed=seed,
    )


def snips(
    log: BanditLog,
    target: np.ndarray,
    *,
    clip: float | None = None,
    alpha: float = 0.05,
    interval: Interval = "normal",
    n_boot: int = 500,
    seed: int = 0,
) -> Estimate:
    """Self-normalized IPS: sum w r / sum w; the normal interval uses the delta method's
    terms w_i (r_i - V) / mean(w)."""
    w, clipped = importance_weights(log, target, clip=clip)
    wr = w * log.rewards
    total = float(w.sum())
    value = float(wr.sum() / total) if total > 0 else float("nan")
    terms = w * (log.rewards - value) / (total / log.n) if total > 0 else np.zeros(log.n)

    def stat(idx: np.ndarray) -> np.ndarray:
        ws = w[idx].sum(axis=1)
        return wr[idx].sum(axis=1) / np.where(ws > 0, ws, np.nan)

    return _from_terms(
        "snips",
        value,
        terms,
        w,
        clipped,
        alpha=alpha,
        interval=interval,
        boot_stat=stat,
        n_boot=n_boot,
        seed=seed,
    )


def cross_fit_rewards(
    log: BanditLog,
    *,
    folds: int = 2,
    l2: float = 1.0,
    basis: Basis = "linear",
    seed: int = 0,
) -> np.ndarray:
    """(n, n_actions) reward predictions where row i's comes from a model that did not
    see row i, so the model's overfitting cannot leak into the DR correction.
    `basis="quadratic"` adds squares and pairwise products of the context features."""
    x = expand(log.x, basis)
    if folds < 2 or log.n < 2 * folds:
        return RewardModel.fit(x, log.actions, log.rewards, log.n_actions, l2=l2).predict(x)
    fold = np.random.default_rng(seed).permutation(log.n) % folds
    out = np.empty((log.n, log.n_actions))
    for k in range(folds):
        train, test = fold != k, fold == k
        model = RewardModel.fit(
            x[train], log.actions[train], log.rewards[train], log.n_actions, l2=l2
        )
        out[test] = model.predict(x[test])
    return out


def doubly_robust(
    log: BanditLog,
    target: np.ndarray,
    *,
    predicted: np.ndarray | None = None,
    folds: int = 2,
    l2: float = 1.0,
    basis: Basis = "linear",
    clip: float | None = None,
    alpha: float = 0.05,
    interval: Interval = "normal",
    n_boot: int = 500,
    seed: int = 0,
) -> Estimate:
    """sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)), with q the cross-fitted
    per-action ridge model (or `predicted`, an (n, n_actions) matrix you supply)."""
    target = _check_target(log, target)
    w, clipped = importance_weights(log, target, clip=clip)
    if predicted is None:
        q = cross_fit_rewards(log, folds=folds, l2=l2, basis=basis, seed=seed)
    else:
        q = np.asarray(predicted, dtype=float)
    if q.shape != (log.n, log.n_actions):
        raise ValueError("predicted must be (n, n_actions)")
    direct = np.sum(target * q, axis=1)
    terms = direct + w * (log.rewards - q[np.arange(log.n), log.actions])
    value = float(terms.mean()) if log.n else float("nan")
    return _from_terms(
        "dr",
        value,
        terms,
        w,
        clipped,
        alpha=alpha,
        interval=interval,
        boot_stat=lambda idx: terms[idx].mean(axis=1),
        n_boot=n_boot,
        seed=seed,
    )


def on_policy(log: BanditLog, *, alpha: float = 0.05) -> Estimate:
    """The logging policy's own value: the mean logged reward with a normal interval."""
    ones = np.ones(log.n)
    value = float(log.rewards.mean()) if log.n else float("nan")
    return _from_terms(
        "logged",
        value,
        log.rewards,
        ones,
        0,
        alpha=alpha,
        interval="normal",
        boot_stat=lambda idx: log.rewards[idx].mean(axis=1),
        n_boot=0,
        seed=0,
    )


def evaluate(
    log: BanditLog,
    target: np.ndarray,
    *,
    methods: Sequence[Method] = METHODS,
    clip: float | None = None,
    alpha: float = 0.05,
    interval: Interval = "normal",
    n_boot: int = 500,
    seed: int = 0,
    l2: float = 1.0,
    basis: Basis = "linear",
) -> dict[str, Estimate]:
    """Every requested estimator of `target`'s value, keyed by method name."""
    out: dict[str, Estimate] = {}
    for method in methods:
        if method == "dr":
            out[method] = doubly_robust(
                log,
                target,
                l2=l2,
                basis=basis,
                clip=clip,
                alpha=alpha,
                interval=interval,
                n_boot=n_boot,
                seed=seed,
            )
        else:
            fn = ips if method == "ips" else snips
            out[method] = fn(
                log, target, clip=clip, alpha=alpha, interval=interval, n_boot=n_boot, seed=seed
            )
    return out


def greedy(scores: np.ndarray, *, available: np.ndarray | None = None) -> np.ndarray:
    """One-hot (n, n_actions) policy choosing the highest score among `available` arms."""
    s = np.where(available, scores, -np.inf) if available is not None else scores
    out = np.zeros(s.shape)
    out[np.arange(len(s)), np.argmax(s, axis=1)] = 1.0
    return out
