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


def image_rows(rows: list[tuple[str, np.ndarray]], title: str, diff_of: tuple[int, int] | None = None):
    """A grid of images (one row per image, three orthogonal slices), optional |difference| row."""
    items = list(rows)
    if diff_of is not None:
        a, b = diff_of
        items.append((f"|{items[a][0]} - {items[b][0]}|", np.abs(items[a][1] - items[b][1])))
    fig = _figure(figsize=(7.5, 2.4 * len(items)))
    axes = fig.subplots(len(items), 3, squeeze=False)
    for r, (label, vol) in enumerate(items):
        is_diff = diff_of is not None and r == len(items) - 1
        for c, (axis, idx) in enumerate(_slices(vol.shape)):
            ax = axes[r, c]
            ax.imshow(_take(vol, axis, idx), cmap="magma" if is_diff else "gray", vmin=0,
                      vmax=(max(float(vol.max()), 1e-6) if is_diff else 1))
            ax.set_axis_off()
        axes[r, 0].set_title(label, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
