"""Participant figures: the image grid is one RGB mosaic whose pixels are the slices shown."""

from __future__ import annotations

import io

import numpy as np

from ldae_bids.reports.figures import image_rows, qc_overlay


def _volumes(shape=(12, 16, 10)):
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    return a, np.clip(a + 0.2, 0, 1)


def test_image_rows_is_one_mosaic_of_the_slices():
    a, b = _volumes()
    fig = image_rows([("input", a), ("reconstruction", b)], "sub-01: reconstruction", diff_of=(0, 1))
    ax, = fig.axes
    img, = ax.images
    mosaic = np.asarray(img.get_array())
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["input", "reconstruction", "|input - reconstruction|"]
    assert fig._suptitle.get_text() == "sub-01: reconstruction"
    # a row: the 10-pixel label band above the tallest of the three (rotated) central slices
    heights = [np.rot90(np.take(a, a.shape[ax_] // 2, axis=ax_)).shape for ax_ in (2, 1, 0)]
    row_h = 10 + max(h for h, _ in heights)
    assert mosaic.shape[0] == 3 * row_h and mosaic.shape[2] == 3
    # the first panel of the first row is the axial central slice of `a`, in gray
    axial = np.rot90(a[:, :, a.shape[2] // 2])
    top = 10 + (row_h - 10 - axial.shape[0]) // 2
    shown = mosaic[top:top + axial.shape[0], :axial.shape[1]]
    np.testing.assert_allclose(shown[..., 0], axial, atol=1e-6)
    np.testing.assert_allclose(shown[..., 1], shown[..., 0])
    # the second row is b, the difference row is coloured (not gray) where |a - b| > 0
    np.testing.assert_allclose(mosaic[row_h + top:row_h + top + axial.shape[0], :axial.shape[1], 0],
                               np.rot90(b[:, :, b.shape[2] // 2]), atol=1e-6)
    diff = mosaic[2 * row_h + top:2 * row_h + top + axial.shape[0], :axial.shape[1]]
    assert np.abs(diff[..., 0] - diff[..., 2]).max() > 0.1
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    assert buf.getvalue().count(b"<image ") == 1


def test_qc_overlay_draws_three_panels():
    a, _ = _volumes()
    mask = a > 0.5
    fig = qc_overlay(a, mask, None, "qc")
    assert len(fig.axes) == 3 and all(ax.images for ax in fig.axes)
