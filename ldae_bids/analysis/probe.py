"""Linear probes on embeddings, evaluated honestly, and the saved probe used for editing.

What :func:`fit_probe` does, and why
------------------------------------
* **Subject-grouped outer cross-validation**: all sessions of a subject fall in one test fold
  (``GroupKFold`` for regression, ``StratifiedGroupKFold`` for classes, both shuffled by ``seed``).
  The reference split scans, not subjects, which leaks subjects between train and test.
* **Everything fit inside the training folds**: z-scoring (``StandardScaler``), and the
  regularisation strength, chosen by an inner grouped CV on the training subjects only
  (ridge ``alpha`` by mean squared error over the whole path from one SVD per fold; logistic ``C`` by
  log loss, warm-started along the path), z-scoring refit inside every inner fold too.
* **Out-of-fold predictions** for every row, scored with the metrics below, each with a 95%
  percentile interval from a bootstrap that resamples **subjects** (all their rows together).
  The intervals describe the sampling of test subjects given the fitted folds; they do not refit.
* **Baselines in the same run, on the same folds and the same bootstrap draws**: the trivial
  predictor (training-fold mean; training-fold class priors, which predicts the majority class and has
  AUROC 0.5), and, when ``baseline_features`` is given (e.g. ROI volumes), the same probe fit on them
  (missing values there are imputed by the training-fold median). Paired differences probe minus
  baseline come with their own intervals.
* Rows whose target is missing (NaN, None, ``""``, ``n/a``) are dropped and counted.
* **Kind**: ``"auto"`` means regression when the target is numeric with more than ``max_classes``
  (default 10) distinct values or with any non-integer value (an age of 38.78 is never a class, even
  in a pilot of ten subjects), classification otherwise (strings, booleans, few integer levels).

Metrics: regression MAE, RMSE, Pearson r, R^2; classification AUROC (one-vs-rest macro average for
more than two classes), accuracy, balanced accuracy, F1 (of the positive class when binary, macro
otherwise). For two classes the positive class is ``positive_class`` or else the last in sorted order.

The final probe (:class:`Probe`) is refit on all rows with the regularisation chosen by grouped CV on
all rows; its ``metrics`` are the cross-validated ones above, never scores on its own training data.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldae_bids.analysis.metrics import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    Estimate,
    evaluate,
    subject_bootstrap_weights,
)
from ldae_bids.analysis.targets import align_targets, clean_target, read_target_table  # noqa: F401
from ldae_bids.errors import InputError, ModelError, UsageError

log = logging.getLogger("ldae_bids")

PROBE_FORMAT = "ldae-bids-probe"
PROBE_FORMAT_VERSION = 1
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))


# ----------------------------------------------------------------------------------------------
# The fitted probe
# ----------------------------------------------------------------------------------------------
def _to_numpy(x) -> tuple[np.ndarray, Any]:
    """(float64 array, restore function back to the caller's type)."""
    if type(x).__module__.startswith("torch"):
        dtype, device = x.dtype, x.device

        def back(a):
            import torch

            return torch.as_tensor(a, dtype=dtype, device=device)

        return x.detach().cpu().double().numpy(), back
    arr = np.asarray(x)
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    return arr.astype(np.float64), (lambda a: np.asarray(a, dtype=out_dtype))


@dataclass
class Probe:
    """A linear probe on z-scored features, as refit on all rows.

    ``coef`` is (k, d): k = 1 for regression and binary classification (the logit of
    ``classes[1]``), k = number of classes for multinomial classification. Predictions use
    ``z = (x - mean) / scale`` then ``z @ coef.T + intercept``.
    """

    target: str
    kind: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    classes: list | None = None
    regularization: float = float("nan")
    metrics: dict[str, Estimate] = field(default_factory=dict)
    baselines: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    n_rows: int = 0
    n_subjects: int = 0
    feature_name: str = "y_sem"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float64).ravel()
        self.scale = np.asarray(self.scale, dtype=np.float64).ravel()
        self.coef = np.atleast_2d(np.asarray(self.coef, dtype=np.float64))
        self.intercept = np.atleast_1d(np.asarray(self.intercept, dtype=np.float64))
        d = self.mean.size
        if self.scale.size != d or self.coef.shape[1] != d or self.coef.shape[0] != self.intercept.size:
            raise ModelError(
                f"probe {self.target!r}: inconsistent shapes mean {self.mean.shape}, scale {self.scale.shape}, "
                f"coef {self.coef.shape}, intercept {self.intercept.shape}"
            )
        if self.kind not in {"regression", "classification"}:
            raise ModelError(f"probe {self.target!r}: unknown kind {self.kind!r}")
        if self.kind == "classification":
            k = len(self.classes or [])
            if k < 2 or self.coef.shape[0] != (1 if k == 2 else k):
                raise ModelError(f"probe {self.target!r}: {k} classes do not fit coef of shape {self.coef.shape}")

    @property
    def feature_dim(self) -> int:
        return int(self.mean.size)

    # -- prediction -------------------------------------------------------------------------
    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        if X.shape[-1] != self.feature_dim:
            raise UsageError(
                f"probe {self.target!r} expects {self.feature_dim} features, got {X.shape[-1]}"
            )
        return X

    def zscore(self, X) -> np.ndarray:
        X, _ = _to_numpy(X)
        return (self._check(X) - self.mean) / self.scale

    def decision_function(self, X) -> np.ndarray:
        """Regression value or logits; (n,) when k = 1 else (n, k)."""
        z = self.zscore(X)
        out = z @ self.coef.T + self.intercept
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of ``classes``."""
        if self.kind != "classification":
            raise UsageError(f"probe {self.target!r} is a regression probe: no probabilities")
        s = self.decision_function(X)
        if s.ndim == 1:
            p1 = 1.0 / (1.0 + np.exp(-s))
            return np.stack([1.0 - p1, p1], axis=1)
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Predicted values (regression) or class labels (classification), one per row."""
        if self.kind == "regression":
            return self.decision_function(X)
        idx = np.argmax(self.predict_proba(X), axis=1)
        return np.asarray([self.classes[i] for i in idx], dtype=object)

    # -- editing ----------------------------------------------------------------------------
    def _class_index(self, cls) -> int:
        if cls is None:
            raise UsageError(f"probe {self.target!r} has {len(self.classes)} classes: name the class to move towards")
        for i, c in enumerate(self.classes):
            if c == cls or str(c) == str(cls):
                return i
        raise UsageError(f"probe {self.target!r}: unknown class {cls!r} (classes: {', '.join(map(str, self.classes))})")

    def direction(self, cls=None) -> np.ndarray:
        """Unit vector(s) in z-scored feature space along which the probe's output grows.

        Regression: towards larger values. Binary: towards ``classes[1]``, or towards ``cls`` when
        given (the opposite vector for ``classes[0]``). Multiclass: towards class ``cls``, i.e.
        ``w_cls - mean_j w_j`` normalised (the softmax ignores a shift common to all classes); with
        ``cls=None`` a (k, d) array, one row per class.
        """
        if self.coef.shape[0] == 1:
            w = self.coef[0].copy()
            if cls is not None:
                if self.kind != "classification":
                    raise UsageError(f"probe {self.target!r} is a regression probe: no classes")
                if self._class_index(cls) == 0:
                    w = -w
            return _unit(w)
        centred = self.coef - self.coef.mean(axis=0, keepdims=True)
        if cls is None:
            return np.stack([_unit(row) for row in centred])
        return _unit(centred[self._class_index(cls)])

    def output(self, X, cls=None) -> np.ndarray:
        """The linear output that :meth:`manipulate` moves, one value per row, in the target's units.

        Regression: the predicted value. Binary: the log-odds of ``classes[1]`` (of ``cls`` when given).
        Multiclass: the logit of ``cls`` minus the mean logit (the softmax ignores a common shift).
        """
        s = self.decision_function(X)
        if self.kind == "regression":
            return s
        if s.ndim == 1:
            return -s if cls is not None and self._class_index(cls) == 0 else s
        return s[:, self._class_index(cls)] - s.mean(axis=1)

    def gain(self, cls=None) -> float:
        """How much :meth:`output` changes per unit ``alpha`` of :meth:`manipulate`: ``sqrt(d) * |w|``."""
        if self.coef.shape[0] == 1:
            w = self.coef[0]
        else:
            w = (self.coef - self.coef.mean(axis=0, keepdims=True))[self._class_index(cls)]
        return math.sqrt(self.feature_dim) * float(np.linalg.norm(w))

    def alpha_for_change(self, change: float, cls=None) -> float:
        """The ``alpha`` whose edit moves the probe's linear output (:meth:`output`) by ``change`` target units
        (e.g. +10 years of predicted age). The output of the edited code moves exactly by ``change``; what the
        decoded image, re-encoded, gives is what the manipulate stage measures."""
        g = self.gain(cls)
        if not g > 0:
            raise UsageError(f"probe {self.target!r} has zero weights: no direction to move along")
        return float(change) / g

    def manipulate(self, y_sem, alpha: float, cls=None):
        """The method's attribute edit: ``unscale(z(y) + alpha * sqrt(d) * w / |w|)``.

        ``alpha`` is in z-scored units per dimension (about 2.5 in the reference's demo); positive
        moves towards larger values / the positive class (or ``cls``). ``y_sem`` is (d,) or (n, d),
        numpy or torch; the result has the same type, shape and dtype.
        """
        arr, back = _to_numpy(y_sem)
        shape = arr.shape
        u = self.direction(cls)
        if u.ndim != 1:
            raise UsageError(f"probe {self.target!r} has {len(self.classes)} classes: name the class to move towards")
        z = self.zscore(arr.reshape(-1, shape[-1]))
        z = z + float(alpha) * math.sqrt(self.feature_dim) * u
        return back((z * self.scale + self.mean).reshape(shape))

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from ldae_bids import __version__

        return {
            "format": PROBE_FORMAT,
            "format_version": PROBE_FORMAT_VERSION,
            "software": {"name": "ldae-bids", "version": __version__},
            "target": self.target,
            "kind": self.kind,
            "feature_name": self.feature_name,
            "feature_dim": self.feature_dim,
            "classes": None if self.classes is None else [_jsonable(c) for c in self.classes],
            "regularization": self.regularization,
            "n_rows": self.n_rows,
            "n_subjects": self.n_subjects,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "baselines": {b: {k: v.to_dict() for k, v in m.items()} for b, m in self.baselines.items()},
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "probe") -> "Probe":
        if d.get("format") != PROBE_FORMAT:
            raise ModelError(f"{source}: not an ldae-bids probe file (format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > PROBE_FORMAT_VERSION:
            raise ModelError(f"{source}: probe format version {d['format_version']} is newer than this ldae-bids")
        try:
            probe = cls(
                target=d["target"],
                kind=d["kind"],
                mean=d["mean"],
                scale=d["scale"],
                coef=d["coef"],
                intercept=d["intercept"],
                classes=d.get("classes"),
                regularization=float(d.get("regularization", float("nan"))),
                metrics={k: Estimate.from_dict(v) for k, v in d.get("metrics", {}).items()},
                baselines={b: {k: Estimate.from_dict(v) for k, v in m.items()}
                           for b, m in d.get("baselines", {}).items()},
                n_rows=int(d.get("n_rows", 0)),
                n_subjects=int(d.get("n_subjects", 0)),
                feature_name=d.get("feature_name", "y_sem"),
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: corrupt probe file ({type(exc).__name__}: {exc})") from None
        if "feature_dim" in d and int(d["feature_dim"]) != probe.feature_dim:
            raise ModelError(f"{source}: feature_dim {d['feature_dim']} does not match the stored weights")
        return probe


def _unit(w: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(w))
    if n == 0.0:
        raise UsageError("probe weights are all zero: no direction to move along")
    return w / n


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def save_probe(probe: Probe, path: str | Path) -> Path:
    """Write a probe as JSON (weights as plain lists, full float precision; no pickle), atomically."""
    from ldae_bids.bids.io import atomic_write_text

    text = json.dumps(probe.to_dict(), indent=1, allow_nan=True) + "\n"
    return atomic_write_text(Path(path), text)


def load_probe(path: str | Path) -> Probe:
    """Read a probe written by :func:`save_probe`; raises :class:`ModelError` when it is not one."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such probe file") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable probe file ({exc})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: not an ldae-bids probe file")
    return Probe.from_dict(d, source=str(path))


# ----------------------------------------------------------------------------------------------
# Cross-validated evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelEvaluation:
    """Out-of-fold predictions and metrics of one model (the probe or a baseline)."""

    name: str
    metrics: dict[str, Estimate]
    oof: np.ndarray  # regression: (n,) predictions; classification: (n, K) probabilities
    regularization: list[float] = field(default_factory=list)  # chosen per outer fold


@dataclass
class ProbeResult:
    """Everything :func:`fit_probe` found; rows are the kept rows (target present), in input order."""

    target: str
    kind: str
    classes: list | None
    y: np.ndarray  # regression: values; classification: class index into ``classes``
    groups: np.ndarray
    folds: np.ndarray  # outer test fold of each row
    row_index: np.ndarray  # index of each kept row in the caller's input
    n_missing: int
    models: dict[str, ModelEvaluation]
    deltas: dict[str, dict[str, Estimate]]
    probe: Probe
    n_splits: int
    seed: int

    @property
    def metrics(self) -> dict[str, Estimate]:
        return self.models["probe"].metrics

    @property
    def n_rows(self) -> int:
        return int(self.y.size)

    @property
    def n_subjects(self) -> int:
        return int(np.unique(self.groups).size)

    def table(self):
        """Long table: model, metric, value, ci_low, ci_high (deltas as model ``probe-<baseline>``)."""
        import pandas as pd

        rows = []
        for name, ev in self.models.items():
            for m, e in ev.metrics.items():
                rows.append({"model": name, "metric": m, "value": e.value, "ci_low": e.low, "ci_high": e.high})
        for name, ms in self.deltas.items():
            for m, e in ms.items():
                rows.append({"model": name, "metric": m, "value": e.value, "ci_low": e.low, "ci_high": e.high})
        return pd.DataFrame(rows)

    def predictions(self):
        """One row per kept input row: ``row``, ``group``, ``fold``, ``y_true`` and, per model, the
        out-of-fold prediction (regression) or ``<model>_p_<class>`` probabilities and ``<model>_pred``."""
        import pandas as pd

        df = pd.DataFrame({"row": self.row_index, "group": self.groups, "fold": self.folds})
        if self.kind == "regression":
            df["y_true"] = self.y
            for name, ev in self.models.items():
                df[f"{name}_pred"] = ev.oof
            return df
        df["y_true"] = [self.classes[i] for i in self.y]
        for name, ev in self.models.items():
            for j, c in enumerate(self.classes):
                df[f"{name}_p_{c}"] = ev.oof[:, j]
            df[f"{name}_pred"] = [self.classes[i] for i in np.argmax(ev.oof, axis=1)]
        return df

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: sizes, CV settings, metrics with intervals, paired deltas."""
        return {
            "target": self.target,
            "kind": self.kind,
            "classes": self.classes,
            "n_rows": self.n_rows,
            "n_subjects": self.n_subjects,
            "n_missing_target": self.n_missing,
            "cv": {"n_splits": self.n_splits, "seed": self.seed, "grouped_by": "subject"},
            "models": {n: {"metrics": {k: v.to_dict() for k, v in ev.metrics.items()},
                           "regularization_per_fold": ev.regularization} for n, ev in self.models.items()},
            "deltas": {n: {k: v.to_dict() for k, v in ms.items()} for n, ms in self.deltas.items()},
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{self.target}: {self.kind}, {self.n_rows} rows from {self.n_subjects} subjects "
            f"({self.n_missing} rows without a target dropped), {self.n_splits}-fold subject-grouped CV"
        ]
        for name, ev in self.models.items():
            lines.append(f"  {name:<10} " + "  ".join(f"{m} {e}" for m, e in ev.metrics.items()))
        for name, ms in self.deltas.items():
            lines.append(f"  {name:<10} " + "  ".join(f"d{m} {e}" for m, e in ms.items()))
        return "\n".join(lines)


def infer_kind(y: Sequence, max_classes: int = 10) -> str:
    """``"regression"`` for numeric targets with more than ``max_classes`` distinct values or with
    non-integer values; ``"classification"`` otherwise."""
    values, numeric = clean_target(y)
    present = values[~_missing_mask(values, numeric)]
    if numeric:
        v = present.astype(float)
        if np.unique(v).size > max_classes or not np.all(np.equal(np.round(v), v)):
            return "regression"
    return "classification"


def _missing_mask(values: np.ndarray, numeric: bool) -> np.ndarray:
    if numeric:
        return ~np.isfinite(values.astype(float))
    return np.array([v is None for v in values], dtype=bool)


def _pipeline(kind: str, impute: bool, class_weight, reg: float | None = None):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = []
    if impute:
        steps.append(("impute", SimpleImputer(strategy="median", keep_empty_features=True)))
    steps.append(("scale", StandardScaler()))
    if kind == "regression":
        steps.append(("model", Ridge(alpha=1.0 if reg is None else reg)))
    else:
        steps.append(("model", LogisticRegression(C=1.0 if reg is None else reg, max_iter=2000,
                                                  class_weight=class_weight)))
    return Pipeline(steps)


def _splitter(kind: str, n_splits: int, seed: int):
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    if kind == "regression":
        return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _ridge_path_mse(Ztr, ytr, Zte, yte, alphas) -> np.ndarray:
    """Test MSE of ridge (with intercept) for every alpha from one SVD; ``Ztr`` columns centred."""
    U, s, Vt = np.linalg.svd(Ztr, full_matrices=False)
    ybar = ytr.mean()
    uy = U.T @ (ytr - ybar)
    A = Zte @ Vt.T
    out = np.empty(len(alphas))
    for i, a in enumerate(alphas):
        pred = A @ (uy * s / (s**2 + a)) + ybar
        out[i] = np.mean((pred - yte) ** 2)
    return out


def _logistic_path_loss(Ztr, ytr, Zte, yte, Cs, n_classes, class_weight) -> np.ndarray:
    """Test log loss of logistic regression for every C, warm-started from small to large C."""
    from sklearn.linear_model import LogisticRegression

    order = np.argsort(Cs)
    out = np.full(len(Cs), np.nan)
    model = LogisticRegression(max_iter=2000, warm_start=True, class_weight=class_weight)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        for i in order:
            model.set_params(C=Cs[i])
            model.fit(Ztr, ytr)
            proba = np.full((Zte.shape[0], n_classes), 1e-12)
            proba[:, model.classes_.astype(int)] = model.predict_proba(Zte)
            proba = np.clip(proba, 1e-12, 1.0)
            out[i] = -np.mean(np.log(proba[np.arange(yte.size), yte]))
    return out


def _fit_inner(kind, X, y, groups, grid, inner_splits, seed, impute, class_weight, n_classes=0):
    """Choose the regularisation by grouped inner CV on these rows, then refit on all of them.

    Preprocessing (imputation, z-scoring) is refit inside every inner training fold.
    """
    n_groups = np.unique(groups).size
    k = min(inner_splits, n_groups)
    if kind == "classification":
        k = min(k, _min_subjects_per_class(y, groups))
    grid = np.asarray(grid, dtype=float)
    if k < 2:  # too few subjects to select: middle of the grid
        best = float(grid[len(grid) // 2])
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            splits = list(_splitter(kind, k, seed).split(X, y, groups))
        loss = np.zeros(len(grid))
        for tr, te in splits:
            pre = _pipeline(kind, impute, class_weight)[:-1]
            Ztr = pre.fit_transform(X[tr])
            Zte = pre.transform(X[te])
            if kind == "regression":
                loss += _ridge_path_mse(Ztr, y[tr], Zte, y[te], grid) * te.size
            else:
                loss += _logistic_path_loss(Ztr, y[tr], Zte, y[te], grid, n_classes, class_weight) * te.size
        best = float(grid[int(np.nanargmin(loss))])
        if best in (grid[0], grid[-1]):
            log.debug("probe: regularisation %s chosen at the edge of the grid", best)
    pipe = _pipeline(kind, impute, class_weight, best)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        pipe.fit(X, y)
    return pipe, best


def _min_subjects_per_class(y, groups) -> int:
    return int(min(np.unique(groups[y == c]).size for c in np.unique(y)))


def _predict(kind, model, X, n_classes):
    if kind == "regression":
        return model.predict(X)
    proba = np.zeros((X.shape[0], n_classes))
    proba[:, model.classes_.astype(int)] = model.predict_proba(X)
    return proba


def _as_features(X, name: str, n: int | None = None, allow_nan: bool = False) -> np.ndarray:
    arr, _ = _to_numpy(X)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise UsageError(f"{name} must be a 2-D (rows x features) array, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise UsageError(f"{name} has {arr.shape[0]} rows, expected {n}")
    if not allow_nan and not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.all(np.isfinite(arr), axis=1)))
        raise InputError(f"{name}: {bad} rows contain NaN or infinite values")
    if allow_nan and np.isinf(arr).any():
        raise InputError(f"{name}: infinite values")
    return arr


def fit_probe(
    X,
    y: Sequence,
    groups: Sequence,
    kind: str = "auto",
    n_splits: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    baseline_features=None,
    *,
    target: str = "target",
    inner_splits: int = 5,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    Cs: Sequence[float] = DEFAULT_CS,
    max_classes: int = 10,
    positive_class=None,
    class_weight: str | None = None,
    ci_level: float = 0.95,
    feature_name: str = "y_sem",
    covariates=None,
) -> ProbeResult:
    """Cross-validate a linear probe with baselines, then refit it on all rows.

    Parameters
    ----------
    X : array (n, d)
        Features (e.g. ``y_sem``), one row per session; must be finite.
    y : sequence (n,)
        Target; missing values (NaN, None, "", "n/a") drop the row.
    groups : sequence (n,)
        Subject of each row; all rows of a subject go to the same fold.
    kind : {"auto", "regression", "classification"}
        See the module docstring for ``"auto"``.
    n_splits : int
        Outer folds (reduced to the number of subjects, or for classification to the number of
        subjects in the rarest class, with a warning; at least 2).
    seed : int
        Seeds fold assignment and the bootstrap.
    n_boot : int
        Subject bootstrap draws for the intervals (0 disables intervals).
    baseline_features : array (n, k), optional
        Classical features for the same rows (NaN allowed: imputed with the training-fold median).
    covariates : array (n, c), optional
        Per-row covariates (e.g. brain volume, which the affine to the template removes from y_sem;
        NaN imputed in the training folds). Adds two models in the same folds: "covariates" alone
        and "probe+covariates" (y_sem and covariates together). The saved probe stays on y_sem only.
    target : str
        Name of the target, stored in the result and the probe.
    inner_splits, alphas, Cs
        Inner grouped CV folds and the ridge alpha / logistic C grids.
    max_classes : int
        Threshold of ``kind="auto"``.
    positive_class : optional
        Binary only: the class whose F1 is reported and that the probe direction points to.
    class_weight : {None, "balanced"}
        Passed to the logistic regression.

    Returns
    -------
    ProbeResult
        ``models`` has "probe", "trivial", with ``baseline_features`` "classical", with ``covariates``
        "covariates" and "probe+covariates";
        ``deltas["probe-trivial"]`` etc. are paired differences; ``probe`` is the refit :class:`Probe`.
    """
    if kind not in {"auto", "regression", "classification"}:
        raise UsageError(f"unknown probe kind {kind!r} (auto, regression, classification)")
    from threadpoolctl import threadpool_limits

    # Hundreds of tiny fits: thread pools only add spin-wait overhead (50x slower on a busy node).
    with threadpool_limits(limits=1):
        return _fit_probe(X, y, groups, kind, n_splits, seed, n_boot, baseline_features, target, inner_splits,
                          alphas, Cs, max_classes, positive_class, class_weight, ci_level, feature_name, covariates)


def _fit_probe(X, y, groups, kind, n_splits, seed, n_boot, baseline_features, target, inner_splits, alphas, Cs,
               max_classes, positive_class, class_weight, ci_level, feature_name, covariates=None) -> ProbeResult:
    values, numeric = clean_target(y)
    n_all = values.size
    groups_all = np.asarray([str(g) for g in groups], dtype=object)
    if groups_all.size != n_all:
        raise UsageError(f"groups has {groups_all.size} entries for {n_all} targets")
    X_all = _as_features(X, feature_name, n_all)
    B_all = None if baseline_features is None else _as_features(baseline_features, "baseline features", n_all, True)
    C_all = None if covariates is None else _as_features(covariates, "covariates", n_all, True)

    keep = ~_missing_mask(values, numeric)
    n_missing = int((~keep).sum())
    if kind == "auto":
        kind = infer_kind(values, max_classes)
    if kind == "regression" and not numeric:
        raise UsageError(f"target {target!r} is not numeric: it cannot be a regression target")

    rows = np.flatnonzero(keep)
    Xk, gk = X_all[rows], groups_all[rows]
    Bk = None if B_all is None else B_all[rows]
    extra = {}  # further models in the same folds: name -> features (imputed in the training folds)
    if C_all is not None:
        extra = {"covariates": C_all[rows], "probe+covariates": np.hstack([Xk, C_all[rows]])}
    classes = None
    if kind == "regression":
        yk = values[rows].astype(float)
    else:
        raw = values[rows]
        if numeric:
            raw = np.array([_tidy_number(v) for v in raw.astype(float)], dtype=object)
        classes = sorted(set(raw.tolist()), key=lambda v: (str(type(v)), v))
        if positive_class is not None:
            match = [c for c in classes if c == positive_class or str(c) == str(positive_class)]
            if not match:
                raise UsageError(f"positive class {positive_class!r} is not among {classes}")
            if len(classes) != 2:
                raise UsageError("positive_class only applies to two classes")
            classes.remove(match[0])
            classes.append(match[0])
        if len(classes) < 2:
            only = classes[0] if classes else "none"
            raise UsageError(f"target {target!r} has a single class ({only}): nothing to classify")
        index = {c: i for i, c in enumerate(classes)}
        yk = np.array([index[v] for v in raw.tolist()], dtype=int)

    n_groups = np.unique(gk).size
    k = min(int(n_splits), n_groups)
    if kind == "classification":
        k = min(k, _min_subjects_per_class(yk, gk))
    if k < 2:
        raise UsageError(
            f"target {target!r}: too few subjects for cross-validation ({n_groups} subjects"
            + (", rarest class in fewer than 2" if kind == "classification" else "") + ")"
        )
    if k < n_splits:
        log.warning("probe %s: %d outer folds instead of %d (too few subjects)", target, k, n_splits)

    grid = tuple(alphas) if kind == "regression" else tuple(Cs)
    splitter = _splitter(kind, k, seed)
    folds = np.full(yk.size, -1, dtype=int)
    n_classes = 0 if classes is None else len(classes)
    shape = (yk.size,) if kind == "regression" else (yk.size, n_classes)
    oof = {"probe": np.zeros(shape), "trivial": np.zeros(shape)}
    if Bk is not None:
        oof["classical"] = np.zeros(shape)
    for name in extra:
        oof[name] = np.zeros(shape)
    chosen: dict[str, list[float]] = {name: [] for name in oof}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = list(splitter.split(Xk, yk, gk))
    for f, (tr, te) in enumerate(splits):
        if set(gk[tr]) & set(gk[te]):  # cannot happen with group splitters; guard the promise anyway
            raise RuntimeError("a subject is in both the training and the test fold")
        folds[te] = f
        model, best = _fit_inner(kind, Xk[tr], yk[tr], gk[tr], grid, inner_splits, seed, False, class_weight,
                                 n_classes)
        oof["probe"][te] = _predict(kind, model, Xk[te], n_classes)
        chosen["probe"].append(best)
        if kind == "regression":
            oof["trivial"][te] = yk[tr].mean()
        else:
            oof["trivial"][te] = np.bincount(yk[tr], minlength=n_classes) / tr.size  # argmax: majority
        if Bk is not None:
            model_b, best_b = _fit_inner(kind, Bk[tr], yk[tr], gk[tr], grid, inner_splits, seed, True, class_weight,
                                         n_classes)
            oof["classical"][te] = _predict(kind, model_b, Bk[te], n_classes)
            chosen["classical"].append(best_b)
        for name, F in extra.items():
            model_e, best_e = _fit_inner(kind, F[tr], yk[tr], gk[tr], grid, inner_splits, seed, True, class_weight,
                                         n_classes)
            oof[name][te] = _predict(kind, model_e, F[te], n_classes)
            chosen[name].append(best_e)

    metric_names = REGRESSION_METRICS if kind == "regression" else CLASSIFICATION_METRICS
    weights = subject_bootstrap_weights(gk, int(n_boot), seed)
    per_model, deltas = evaluate(metric_names, yk, oof, weights, ci_level, reference="probe")
    models = {name: ModelEvaluation(name, per_model[name], oof[name], chosen[name]) for name in oof}

    final, best_all = _fit_inner(kind, Xk, yk, gk, grid, inner_splits, seed, False, class_weight, n_classes)
    scaler, lin = final.named_steps["scale"], final.named_steps["model"]
    coef = np.atleast_2d(lin.coef_)
    intercept = np.atleast_1d(lin.intercept_)
    if kind == "classification" and n_classes > 2 and coef.shape[0] != n_classes:
        raise RuntimeError("final probe did not see every class")
    probe = Probe(
        target=target,
        kind=kind,
        mean=scaler.mean_,
        scale=scaler.scale_,
        coef=coef,
        intercept=intercept,
        classes=classes,
        regularization=best_all,
        metrics=per_model["probe"],
        baselines={n: m for n, m in per_model.items() if n != "probe"},
        n_rows=int(yk.size),
        n_subjects=int(n_groups),
        feature_name=feature_name,
        extra={"cv": {"n_splits": k, "seed": seed, "grouped_by": "subject", "n_boot": int(n_boot),
                      "n_missing_target": n_missing}},
    )
    return ProbeResult(target, kind, classes, yk, gk, folds, rows, n_missing, models, deltas, probe, k, seed)


def _tidy_number(v: float):
    return int(v) if float(v).is_integer() else float(v)
