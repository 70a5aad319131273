"""Uplift models for non-item actions (offers), learned from randomized exposure.

Why: ranking offers by response rate ("who converts when shown it") spends them on
users who would have converted anyway and on users the offer puts off. An uplift model
estimates P(convert | treated, x) - P(convert | not treated, x), the conversions an
offer actually causes, so the decide path can target the users it persuades.

Two learners over user features: the two-model T-learner (one logistic regression per
arm, uplift = difference) and the X-learner (imputes each user's individual effect
with the other arm's model, regresses it, and blends the two effect models by the
exposure propensity), which uses unbalanced arms better. Evaluation on held-out
randomized logs: the Qini curve, its coefficient, and the area under the uplift
curve. Pure numpy; the only I/O is `OfferUplift.save`/`load`, on request.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Learner = Literal["t", "x"]
Basis = Literal["linear", "quadratic"]


def expand(x: np.ndarray, basis: Basis) -> np.ndarray:
    """The design matrix: raw columns, or with squares and pairwise products so linear
    models can follow effects that rise and fall across a feature."""
    if basis == "linear":
        return x
    i, j = np.triu_indices(x.shape[1])
    return np.hstack([x, x[:, i] * x[:, j]])


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, z: np.ndarray) -> "Standardizer":
        scale = z.std(axis=0)
        return cls(z.mean(axis=0), np.where(scale > 1e-12, scale, 1.0))

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.hstack([(z - self.mean) / self.scale, np.ones((len(z), 1))])


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(t, -35, 35)))


def fit_logistic(
    z: np.ndarray,
    y: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    l2: float = 1.0,
    iters: int = 25,
    tol: float = 1e-8,
) -> np.ndarray:
    """Ridge-penalized logistic regression by Newton/IRLS steps; `z` has its intercept
    as the last column (not penalized). Returns the coefficients."""
    n, d = z.shape
    w = np.ones(n) if weights is None else weights
    penalty = l2 * np.eye(d)
    penalty[-1, -1] = 0.0
    beta = np.zeros(d)
    mean_y = float(np.average(y, weights=w)) if n else 0.5
    beta[-1] = np.log(np.clip(mean_y, 1e-4, 1 - 1e-4) / (1 - np.clip(mean_y, 1e-4, 1 - 1e-4)))
    for _ in range(iters):
        p = _sigmoid(z @ beta)
        grad = z.T @ (w * (p - y)) + penalty @ beta
        hess = (z * (w * p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if float(np.max(np.abs(step))) < tol:
            break
    return beta


def fit_ridge(
    z: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None, l2: float = 1.0
) -> np.ndarray:
    """Weighted ridge least squares (intercept, the last column, not penalized)."""
    w = np.ones(len(z)) if weights is None else weights
    penalty = l2 * np.eye(z.shape[1])
    penalty[-1, -1] = 1e-9
    zw = z * w[:, None]
    return np.linalg.solve(zw.T @ z + penalty, zw.T @ y)


@dataclass(frozen=True)
class UpliftModel:
    """A fitted uplift model for one offer. `coef` rows: for the T-learner the control
    and treated logistic models; for the X-learner additionally the two effect models
    (control-side tau0, treated-side tau1) and `g`, the treated share it blends by."""

    learner: Learner
    basis: Basis
    standardizer: Standardizer
    coef: np.ndarray
    g: float

    def _z(self, x: np.ndarray) -> np.ndarray:
        return self.standardizer(expand(np.asarray(x, dtype=float), self.basis))

    def predict_control(self, x: np.ndarray) -> np.ndarray:
        """P(convert | not treated, x)."""
        return _sigmoid(self._z(x) @ self.coef[0])

    def predict_treated(self, x: np.ndarray) -> np.ndarray:
        """P(convert | treated, x): the response rate a response model would rank by."""
        return _sigmoid(self._z(x) @ self.coef[1])

    def predict_uplift(self, x: np.ndarray) -> np.ndarray:
        """Per-row estimated increase in conversion probability from treating."""
        if self.learner == "t":
            return self.predict_treated(x) - self.predict_control(x)
        z = self._z(x)
        tau0, tau1 = z @ self.coef[2], z @ self.coef[3]
        return self.g * tau0 + (1 - self.g) * tau1

    def params(self) -> dict[str, np.ndarray]:
        """Arrays for `np.savez`; `UpliftModel.from_params` restores the model."""
        return {
            "learner": np.array(self.learner),
            "basis": np.array(self.basis),
            "mean": self.standardizer.mean,
            "scale": self.standardizer.scale,
            "coef": self.coef,
            "g": np.array(self.g),
        }

    @classmethod
    def from_params(cls, p: dict[str, np.ndarray]) -> "UpliftModel":
        learner = str(p["learner"])
        basis = str(p["basis"])
        if learner not in ("t", "x") or basis not in ("linear", "quadratic"):
            raise ValueError(f"unknown uplift model {learner!r}/{basis!r}")
        return cls(
            learner,  # type: ignore[arg-type]
            basis,  # type: ignore[arg-type]
            Standardizer(np.asarray(p["mean"]), np.asarray(p["scale"])),
            np.asarray(p["coef"]),
            float(p["g"]),
        )


def fit_uplift(
    x: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    learner: Learner = "x",
    basis: Basis = "quadratic",
    weights: np.ndarray | None = None,
    l2: float = 1.0,
) -> UpliftModel:
    """Fit a T- or X-learner on rows with a binary exposure `treated` and outcome `y`.

    `weights` (e.g. inverse logged propensities) rebalance exposure that was not
    uniformly random; with uniform randomization leave them None.
    """
    x = np.asarray(x, dtype=float)
    t = np.asarray(treated, dtype=bool)
    y = np.asarray(y, dtype=float)
    if not t.any() or t.all():
        raise ValueError("uplift needs both treated and control rows")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    design = expand(x, basis)
    std = Standardizer.fit(design)
    z = std(design)
    c0 = fit_logistic(z[~t], y[~t], weights=w[~t], l2=l2)
    c1 = fit_logistic(z[t], y[t], weights=w[t], l2=l2)
    g = float(w[t].sum() / w.sum())
    if learner == "t":
        return UpliftModel("t", basis, std, np.vstack([c0, c1]), g)
    # X-learner: impute individual effects with the opposite arm's outcome model.
    d1 = y[t] - _sigmoid(z[t] @ c0)
    d0 = _sigmoid(z[~t] @ c1) - y[~t]
    tau1 = fit_ridge(z[t], d1, weights=w[t], l2=l2)
    tau0 = fit_ridge(z[~t], d0, weights=w[~t], l2=l2)
    return UpliftModel("x", basis, std, np.vstack([c0, c1, tau0, tau1]), g)


@dataclass(frozen=True)
class QiniCurve:
    """Cumulative curves over users sorted by score, best first, at `n_points` cuts.

    `counts` are (weighted) row counts; `qini[k]` = treated conversions - control
    conversions * (treated / control count) in the top `counts[k]` rows: incremental
    conversions had those users been treated, in the treated group's scale.
    `uplift[k]` = (treated rate - control rate) * counts[k]: the same in the whole
    population's scale (the uplift/gain curve).
    """

    fraction: np.ndarray
    counts: np.ndarray
    qini: np.ndarray
    uplift: np.ndarray


def qini_curve(
    scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    n_points: int = 101,
) -> QiniCurve:
    """`weights` (inverse exposure propensities) correct logs whose exposure depended
    on the user, e.g. epsilon-greedy; counts are then weighted counts."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    t = np.asarray(treated, dtype=bool)[order]
    yy = np.asarray(y, dtype=float)[order]
    w = np.ones(len(yy)) if weights is None else np.asarray(weights, dtype=float)[order]
    n = len(yy)
    cuts = np.unique(np.round(np.linspace(0, n, n_points)).astype(int))
    counts = np.concatenate([[0.0], np.cumsum(w)])[cuts]
    nt = np.concatenate([[0.0], np.cumsum(w * t)])[cuts]
    nc = np.concatenate([[0.0], np.cumsum(w * ~t)])[cuts]
    yt = np.concatenate([[0.0], np.cumsum(w * yy * t)])[cuts]
    yc = np.concatenate([[0.0], np.cumsum(w * yy * ~t)])[cuts]
    safe_nc = np.where(nc > 0, nc, 1)
    safe_nt = np.where(nt > 0, nt, 1)
    qini = yt - yc * np.where(nc > 0, nt / safe_nc, 0.0)
    uplift = np.where((nt > 0) & (nc > 0), yt / safe_nt - yc / safe_nc, 0.0) * counts
    return QiniCurve(cuts / max(n, 1), counts, qini, uplift)


def _area(fraction: np.ndarray, values: np.ndarray) -> float:
    return float(np.sum((values[1:] + values[:-1]) * np.diff(fraction)) / 2)


def qini_coefficient(
    scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    weights: np.ndarray | None = None,
) -> float:
    """Area between the Qini curve and the random-targeting diagonal, per user: > 0 when
    the score ranks persuadable users first, about 0 for a random score, < 0 when it
    ranks them last."""
    curve = qini_curve(scores, treated, y, weights=weights)
    n = max(float(curve.counts[-1]), 1e-12)
    diagonal = curve.fraction * curve.qini[-1]
    return _area(curve.fraction, curve.qini - diagonal) / n


def auuc(
    scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    normalize: bool = True,
) -> float:
    """Area under the uplift (gain) curve per user; with `normalize`, minus the area of
    random targeting, so 0 means no better than random (comparable across data sets)."""
    curve = qini_curve(scores, treated, y, weights=weights)
    n = max(float(curve.counts[-1]), 1e-12)
    area = _area(curve.fraction, curve.uplift) / n
    if normalize:
        area -= _area(curve.fraction, curve.fraction * curve.uplift[-1]) / n
    return area


def log_features(values: np.ndarray) -> np.ndarray:
    """sign(v) * log1p(|v|): counts and spend are heavy-tailed; models see them on this
    scale (the simulator's hidden responses are defined on it too)."""
    v = np.asarray(values, dtype=float)
    return np.sign(v) * np.log1p(np.abs(v))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k highest scores (ties broken by position)."""
    mask = np.zeros(len(scores), dtype=bool)
    mask[np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]] = True
    return mask


def feature_matrix(values: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """Rows of `{feature: value}` to model inputs on the `log_features` scale; missing,
    null or non-numeric values count as 0 (a feature nobody computed yet)."""
    out = np.zeros((len(values), len(names)))
    for i, row in enumerate(values):
        for j, name in enumerate(names):
            v = row.get(name)
            if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v):
                out[i, j] = v
    return log_features(out)


@dataclass(frozen=True)
class OfferUplift:
    """Per-offer uplift models over named features: what the batch side trains and the
    decide path loads to rank offers by predicted uplift instead of response rate."""

    feature_names: tuple[str, ...]
    models: Mapping[str, UpliftModel]
    version: str = ""

    def predict(self, values: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """offer -> per-row predicted uplift for feature-value rows."""
        x = feature_matrix(values, self.feature_names)
        return {offer: m.predict_uplift(x) for offer, m in self.models.items()}

    def save(self, path: Path) -> Path:
        arrays: dict[str, np.ndarray] = {
            "feature_names": np.array(self.feature_names, dtype=str),
            "offers": np.array(list(self.models), dtype=str),
            "version": np.array(self.version),
        }
        for offer, model in self.models.items():
            arrays.update({f"{offer}/{k}": v for k, v in model.params().items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "OfferUplift":
        with np.load(path, allow_pickle=False) as data:
            offers = [str(o) for o in data["offers"]]
            models = {
                o: UpliftModel.from_params(
                    {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{o}/")}
                )
                for o in offers
            }
            names = tuple(str(n) for n in data["feature_names"])
            return cls(names, models, str(data["version"]))
