"""Probe and embedding figures (matplotlib, no pyplot state: safe on headless nodes).

Each function returns a :class:`matplotlib.figure.Figure`; with ``path`` it also writes it (the format
follows the suffix: ``.png``, ``.svg``...) atomically and still returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ldae_bids.analysis.probe import ProbeResult
from ldae_bids.errors import UsageError

_COLORS = {"probe": "#1f77b4", "classical": "#ff7f0e", "trivial": "#7f7f7f"}


def _figure(size=(5.0, 4.5)):
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (temporary file, then rename)."""
    from ldae_bids.bids.io import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _finish(fig, path):
    if path is not None:
        save_figure(fig, path)
    return fig


def _roc(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(pos, score)
    return fpr, tpr


def plot_roc(result: ProbeResult, path: str | Path | None = None, models: Sequence[str] | None = None):
    """Out-of-fold ROC curves of the probe and its baselines (one-vs-rest per class when multiclass)."""
    if result.kind != "classification":
        raise UsageError(f"{result.target}: ROC curves need a classification probe")
    models = [m for m in (models or ("probe", "classical", "trivial")) if m in result.models]
    classes = result.classes
    binary = len(classes) == 2
    shown = [1] if binary else list(range(len(classes)))
    fig = _figure((5.0, 4.5) if binary else (4.0 * min(len(shown), 3), 4.0 * ((len(shown) + 2) // 3)))
    axes = fig.subplots((len(shown) + 2) // 3, min(len(shown), 3), squeeze=False).ravel()
    for ax, c in zip(axes, shown):
        pos = (result.y == c).astype(int)
        for name in models:
            ev = result.models[name]
            fpr, tpr = _roc(pos, ev.oof[:, c])
            auc = ev.metrics["auroc"]
            label = f"{name} AUROC {auc}" if binary else name
            ax.plot(fpr, tpr, color=_COLORS.get(name), lw=2 if name == "probe" else 1.2,
                    ls="-" if name == "probe" else "--", label=label)
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{result.target}: {classes[c]}" + ("" if binary else " vs rest"))
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if not binary:
        fig.suptitle(f"macro AUROC {result.metrics['auroc']}", fontsize=9)
    return _finish(fig, path)


def plot_pred_vs_true(result: ProbeResult, path: str | Path | None = None, show_classical: bool = True):
    """Out-of-fold predicted against true values of a regression probe, identity line dashed."""
    if result.kind != "regression":
        raise UsageError(f"{result.target}: a predicted-vs-true plot needs a regression probe")
    fig = _figure()
    ax = fig.subplots()
    y = result.y
    if show_classical and "classical" in result.models:
        ev = result.models["classical"]
        ax.scatter(y, ev.oof, s=10, alpha=0.5, color=_COLORS["classical"],
                   label=f"classical MAE {ev.metrics['mae']}")
    ev = result.models["probe"]
    ax.scatter(y, ev.oof, s=12, alpha=0.8, color=_COLORS["probe"], label=f"probe MAE {ev.metrics['mae']}")
    lo = float(min(y.min(), ev.oof.min()))
    hi = float(max(y.max(), ev.oof.max()))
    ax.plot([lo, hi], [lo, hi], color="0.5", ls="--", lw=1)
    triv = result.models["trivial"].metrics["mae"]
    ax.set(xlabel=f"true {result.target}", ylabel=f"predicted {result.target} (out of fold)",
           title=f"{result.target}: r {ev.metrics['pearson_r'].value:.2f}, trivial MAE {triv.value:.2f}")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    return _finish(fig, path)


def pca_2d(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of z-scored ``X``: (scores (n, 2), explained variance ratio (2,))."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    var = S**2
    k = min(2, S.size)
    scores = np.zeros((X.shape[0], 2))
    scores[:, :k] = U[:, :k] * S[:k]
    ratio = np.zeros(2)
    ratio[:k] = var[:k] / var.sum() if var.sum() > 0 else 0.0
    return scores, ratio


def plot_embedding_map(X, values=None, path: str | Path | None = None, *, title: str = "embedding",
                       value_name: str = "", groups: Sequence | None = None):
    """PCA map (PC1, PC2 of z-scored features) coloured by a target.

    Numeric values with more than 10 levels get a colour bar, others a legend; missing values are
    grey. With ``groups``, the sessions of a subject are joined by a thin line in row order.
    """
    from ldae_bids.analysis.targets import clean_target

    scores, ratio = pca_2d(X)
    fig = _figure((5.5, 4.5))
    ax = fig.subplots()
    if groups is not None:
        groups = np.asarray([str(g) for g in groups])
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            if idx.size > 1:
                ax.plot(scores[idx, 0], scores[idx, 1], color="0.75", lw=0.6, zorder=1)
    if values is None:
        ax.scatter(scores[:, 0], scores[:, 1], s=14, color=_COLORS["probe"], zorder=2)
    else:
        vals, numeric = clean_target(values)
        missing = ~np.isfinite(vals.astype(float)) if numeric else np.array([v is None for v in vals])
        if missing.any():
            ax.scatter(scores[missing, 0], scores[missing, 1], s=10, color="0.8", label="n/a", zorder=2)
        ok = ~missing
        if numeric and np.unique(vals[ok].astype(float)).size > 10:
            sc = ax.scatter(scores[ok, 0], scores[ok, 1], s=14, c=vals[ok].astype(float), cmap="viridis", zorder=3)
            fig.colorbar(sc, ax=ax, label=value_name)
        else:
            import matplotlib as mpl

            levels = sorted(set(vals[ok].tolist()), key=lambda v: (str(type(v)), v))
            cmap = mpl.colormaps["tab10"]
            for i, lev in enumerate(levels):
                sel = ok & np.array([v == lev for v in vals])
                ax.scatter(scores[sel, 0], scores[sel, 1], s=14, color=cmap(i % 10), label=str(lev), zorder=3)
            ax.legend(title=value_name or None, fontsize=7, frameon=False)
    ax.set(xlabel=f"PC1 ({100 * ratio[0]:.0f}%)", ylabel=f"PC2 ({100 * ratio[1]:.0f}%)", title=title)
    return _finish(fig, path)
