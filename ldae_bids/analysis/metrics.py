"""Weighted evaluation metrics and the subject-level (cluster) bootstrap.

Every metric takes row weights ``w``: all ones gives the ordinary metric; a subject bootstrap draw
gives each row the number of times its subject was drawn. Computing the point estimate and every
bootstrap replicate with the same function keeps them consistent, and drawing subjects once for all
models makes model-minus-baseline differences paired.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

REGRESSION_METRICS = ("mae", "rmse", "pearson_r", "r2")
CLASSIFICATION_METRICS = ("auroc", "accuracy", "balanced_accuracy", "f1")
#: True where a larger value is better (for deltas and reports).
HIGHER_IS_BETTER = {
    "mae": False,
    "rmse": False,
    "pearson_r": True,
    "r2": True,
    "auroc": True,
    "accuracy": True,
    "balanced_accuracy": True,
    "f1": True,
}


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap percentile interval.

    ``n_boot`` counts the bootstrap draws where the metric was defined (a draw with a single class
    has no AUROC, for instance); the interval is NaN when fewer than 20 were.
    """

    value: float
    low: float
    high: float
    n_boot: int
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "n_boot": self.n_boot,
                "ci_level": self.level}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Estimate":
        return cls(float(d["value"]), float(d["ci_low"]), float(d["ci_high"]), int(d.get("n_boot", 0)),
                   float(d.get("ci_level", 0.95)))


# ----------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------
def mae(y, p, w):
    return float(np.sum(w * np.abs(p - y)) / np.sum(w))


def rmse(y, p, w):
    return float(np.sqrt(np.sum(w * (p - y) ** 2) / np.sum(w)))


def pearson_r(y, p, w):
    sw = np.sum(w)
    my, mp = np.sum(w * y) / sw, np.sum(w * p) / sw
    cov = np.sum(w * (y - my) * (p - mp))
    vy, vp = np.sum(w * (y - my) ** 2), np.sum(w * (p - mp) ** 2)
    if vy <= 0 or vp <= 1e-12 * max(1.0, vy):
        return float("nan")
    return float(cov / np.sqrt(vy * vp))


def r2(y, p, w):
    sw = np.sum(w)
    my = np.sum(w * y) / sw
    ss_tot = np.sum(w * (y - my) ** 2)
    if ss_tot <= 0:
        return float("nan")
    return float(1.0 - np.sum(w * (y - p) ** 2) / ss_tot)


# ----------------------------------------------------------------------------------------------
# Classification (y: class index 0..K-1; proba: (n, K))
# ----------------------------------------------------------------------------------------------
def binary_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> float:
    """Weighted Mann-Whitney AUC; tied scores count one half."""
    _, inv = np.unique(score, return_inverse=True)
    gp = np.bincount(inv, weights=w * pos)
    gn = np.bincount(inv, weights=w * (1.0 - pos))
    tp, tn = gp.sum(), gn.sum()
    if tp <= 0 or tn <= 0:
        return float("nan")
    below = np.cumsum(gn) - gn
    return float(np.sum(gp * (below + 0.5 * gn)) / (tp * tn))


def auroc(y, proba, w):
    k = proba.shape[1]
    if k == 2:
        return binary_auc((y == 1).astype(float), proba[:, 1], w)
    aucs = [binary_auc((y == c).astype(float), proba[:, c], w) for c in range(k)]
    return float(np.mean(aucs))  # NaN when a class is absent from the draw


def accuracy(y, proba, w):
    return float(np.sum(w * (np.argmax(proba, axis=1) == y)) / np.sum(w))


def balanced_accuracy(y, proba, w):
    pred = np.argmax(proba, axis=1)
    recalls = []
    for c in range(proba.shape[1]):
        wc = w * (y == c)
        if wc.sum() <= 0:
            return float("nan")
        recalls.append(np.sum(wc * (pred == c)) / wc.sum())
    return float(np.mean(recalls))


def _f1_class(y, pred, w, c):
    tp = np.sum(w * ((pred == c) & (y == c)))
    fp = np.sum(w * ((pred == c) & (y != c)))
    fn = np.sum(w * ((pred != c) & (y == c)))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else float("nan")


def f1(y, proba, w):
    """Binary: F1 of class index 1 (the positive class). Multiclass: macro F1."""
    pred = np.argmax(proba, axis=1)
    if proba.shape[1] == 2:
        return _f1_class(y, pred, w, 1)
    return float(np.mean([_f1_class(y, pred, w, c) for c in range(proba.shape[1])]))


METRIC_FUNCTIONS: dict[str, Callable] = {
    "mae": mae,
    "rmse": rmse,
    "pearson_r": pearson_r,
    "r2": r2,
    "auroc": auroc,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1": f1,
}


# ----------------------------------------------------------------------------------------------
# Subject bootstrap
# ----------------------------------------------------------------------------------------------
def subject_bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Row weights of ``n_boot`` draws of subjects with replacement, shape (n_boot, n_rows).

    Each draw picks as many subjects as there are, uniformly with replacement; a row's weight is how
    often its subject was picked, so all sessions of a subject enter or leave together.
    """
    _, gidx = np.unique(groups, return_inverse=True)
    n_groups = int(gidx.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws]) if n_boot else np.zeros((0, n_groups))
    return counts[:, gidx].astype(float)


def _interval(values: np.ndarray, level: float) -> tuple[float, float, int]:
    ok = values[np.isfinite(values)]
    if ok.size < 20:
        return float("nan"), float("nan"), int(ok.size)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(ok, [a, 1.0 - a])
    return float(lo), float(hi), int(ok.size)


def evaluate(
    metrics: tuple[str, ...],
    y: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    boot_weights: np.ndarray,
    level: float = 0.95,
    reference: str | None = None,
) -> tuple[dict[str, dict[str, Estimate]], dict[str, dict[str, Estimate]]]:
    """Metrics with intervals for several models on the same rows and the same bootstrap draws.

    Returns ``(per_model, deltas)``; ``deltas["<reference>-<other>"][metric]`` is the paired
    difference reference minus other (for MAE/RMSE a negative delta means the reference is better).
    """
    ones = np.ones(len(y))
    per_model: dict[str, dict[str, Estimate]] = {}
    reps: dict[str, dict[str, np.ndarray]] = {}
    points: dict[str, dict[str, float]] = {}
    for name, pred in predictions.items():
        per_model[name], reps[name], points[name] = {}, {}, {}
        for m in metrics:
            fn = METRIC_FUNCTIONS[m]
            value = fn(y, pred, ones)
            boot = np.array([fn(y, pred, w) for w in boot_weights])
            lo, hi, n = _interval(boot, level)
            per_model[name][m] = Estimate(value, lo, hi, n, level)
            reps[name][m], points[name][m] = boot, value
    deltas: dict[str, dict[str, Estimate]] = {}
    if reference is not None and reference in predictions:
        for other in predictions:
            if other == reference:
                continue
            key = f"{reference}-{other}"
            deltas[key] = {}
            for m in metrics:
                d = reps[reference][m] - reps[other][m]
                lo, hi, n = _interval(d, level)
                deltas[key][m] = Estimate(points[reference][m] - points[other][m], lo, hi, n, level)
    return per_model, deltas
