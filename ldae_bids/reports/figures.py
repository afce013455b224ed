"""Figures for the participant stages (matplotlib, SVG).

Built with matplotlib's object API (``Figure``), not pyplot: pyplot's figure registry is global state, and
the stages write a batch's outputs on several threads (``StageContext.for_each``).
"""

from __future__ import annotations

import numpy as np


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _slices(shape) -> list[tuple[int, int]]:
    """Axial, coronal, sagittal central slices (axis, index)."""
    return [(2, shape[2] // 2), (1, shape[1] // 2), (0, shape[0] // 2)]


def _take(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.rot90(np.take(vol, index, axis=axis))


def qc_overlay(image: np.ndarray, mask: np.ndarray, template_mask: np.ndarray | None, title: str):
    """The model-ready image with the brain mask (red) and template brain (blue) outlines."""
    fig = _figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 3)
    for ax, (axis, idx) in zip(axes, _slices(image.shape)):
        ax.imshow(_take(image, axis, idx), cmap="gray", vmin=0, vmax=1)
        ax.contour(_take(mask, axis, idx), levels=[0.5], colors="red", linewidths=0.8)
        if template_mask is not None:
            ax.contour(_take(template_mask, axis, idx), levels=[0.5], colors="deepskyblue", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def _mosaic_row(vol: np.ndarray, gap: int) -> np.ndarray:
    """The three orthogonal slices of ``vol`` side by side, vertically centred, NaN between and around them."""
    planes = [_take(vol, axis, idx) for axis, idx in _slices(vol.shape)]
    height = max(p.shape[0] for p in planes)
    out = []
    for i, p in enumerate(planes):
        top = (height - p.shape[0]) // 2
        out.append(np.pad(p, ((top, height - p.shape[0] - top), (0, gap if i < len(planes) - 1 else 0)),
                          constant_values=np.nan))
    return np.concatenate(out, axis=1)


def image_rows(rows: list[tuple[str, np.ndarray]], title: str, diff_of: tuple[int, int] | None = None):
    """A grid of images (one row per image, three orthogonal slices), optional |difference| row.

    The grid is one RGB mosaic drawn by a single ``imshow`` (gray rows on 0..1, the difference row in magma
    scaled to the maximum of the three slices shown), with the row labels as text: one embedded image per figure
    instead of one per panel, which is what the SVG writer spends its time on (``benchmarks/bench_host_io.py``).
    Every image must have the same shape (one grid per figure).
    """
    from matplotlib import colormaps

    items = list(rows)
    if diff_of is not None:
        a, b = diff_of
        items.append((f"|{items[a][0]} - {items[b][0]}|", np.abs(items[a][1] - items[b][1])))
    shapes = {np.shape(vol) for _, vol in items}
    if len(shapes) != 1:
        raise ValueError(f"image_rows: the images have different shapes {sorted(shapes)}")
    gap = 4  # mosaic pixels between panels
    rows_px = [_mosaic_row(np.asarray(vol, dtype=np.float32), gap) for _, vol in items]
    # the label band above each row grows with the grid, so that the labels keep their size in points at any
    # grid (the paper grid 128x160x128 as well as the compact one)
    band = max(10, int(np.ceil(0.038 * rows_px[0].shape[1])))
    strips = []
    for r, row in enumerate(rows_px):
        if diff_of is not None and r == len(items) - 1:
            rgb = colormaps["magma"](np.clip(row / max(float(np.nanmax(row)), 1e-6), 0, 1))[..., :3]
        else:
            rgb = np.repeat(np.clip(row, 0, 1)[..., None], 3, axis=2)
        rgb[np.isnan(row)] = 1.0  # white between the panels
        strips.append(np.pad(rgb, ((band, 0), (0, 0), (0, 0)), constant_values=1.0))
    mosaic = np.concatenate(strips, axis=0)
    h, w = mosaic.shape[:2]
    width_in = 7.5
    fig = _figure(figsize=(width_in, width_in * (h + band) / w))
    ax = fig.add_axes((0, 0, 1, h / (h + band)))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for r, (label, _) in enumerate(items):
        ax.text(0, r * (h / len(items)) + band - 2, label, fontsize=9, va="bottom", ha="left")
    fig.suptitle(title, fontsize=10, y=1 - 0.5 * band / (h + band), va="center")
    return fig


def qc_distributions(table, columns: list[str], keys: list[str], flagged_by: dict | None = None,
                     max_labels: int = 8):
    """One strip plot per QC metric across the sessions of ``table`` (pandas): flagged sessions in red, labelled in
    the panels of the metrics that flagged them (``flagged_by``: per column, a boolean per session, as
    :func:`ldae_bids.stages.qc.flag_sessions` returns it). Metrics with no value (e.g. no reconstruction yet) are
    left out."""
    shown = [c for c in columns if c in table.columns and np.isfinite(table[c].to_numpy(dtype=float)).any()]
    flagged = table["qc_flagged"].to_numpy(dtype=bool) if "qc_flagged" in table.columns else np.zeros(len(table), bool)
    fig = _figure(figsize=(2.1 * max(len(shown), 1), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(shown), 1)))
    rng = np.random.default_rng(0)  # the same jitter every time: figures are reproducible
    jitter = rng.uniform(-0.18, 0.18, len(table))
    for ax, col in zip(axes, shown):
        values = table[col].to_numpy(dtype=float)
        z = table[f"z_{col}"].to_numpy(dtype=float) if f"z_{col}" in table.columns else np.zeros(len(table))
        ok = np.isfinite(values)
        ax.scatter(jitter[ok & ~flagged], values[ok & ~flagged], s=9, color="#4a6fa5", alpha=0.7, linewidths=0)
        ax.scatter(jitter[ok & flagged], values[ok & flagged], s=16, color="#d62728", linewidths=0)
        # label a flagged session only where this metric flagged it, the most deviant first
        why = (flagged_by or {}).get(col, np.zeros(len(table), bool))
        worst = [i for i in np.argsort(-np.nan_to_num(np.abs(z), nan=0.0)) if ok[i] and why[i]][:max_labels]
        for i in worst:
            ax.annotate(keys[i], (jitter[i], values[i]), fontsize=6, xytext=(4, 0), textcoords="offset points",
                        va="center", color="#d62728")
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([])
        ax.set_title(col.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=7)
    if not shown:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no QC values", ha="center", va="center")
    fig.suptitle(f"QC across {len(table)} session(s); {int(flagged.sum())} flagged (red)", fontsize=9)
    return fig
