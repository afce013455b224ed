"""Participant figures: the image grid is one RGB mosaic whose pixels are the slices shown."""

from __future__ import annotations

import io

import numpy as np
import pytest

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
    # the second panel (coronal, shorter than the axial one) is centred vertically, after a white gap
    coronal = np.rot90(a[:, a.shape[1] // 2, :])
    x0 = axial.shape[1] + 4
    c_top = 10 + (row_h - 10 - coronal.shape[0]) // 2
    assert c_top > top
    np.testing.assert_allclose(mosaic[c_top:c_top + coronal.shape[0], x0:x0 + coronal.shape[1], 0], coronal,
                               atol=1e-6)
    assert (mosaic[10:c_top, x0:x0 + coronal.shape[1]] == 1.0).all()  # white above it
    assert (mosaic[10:row_h, axial.shape[1]:x0] == 1.0).all()  # the gap between the panels
    # the second row is b, the difference row is coloured (not gray) where |a - b| > 0
    np.testing.assert_allclose(mosaic[row_h + top:row_h + top + axial.shape[0], :axial.shape[1], 0],
                               np.rot90(b[:, :, b.shape[2] // 2]), atol=1e-6)
    diff = mosaic[2 * row_h + top:2 * row_h + top + axial.shape[0], :axial.shape[1]]
    assert np.abs(diff[..., 0] - diff[..., 2]).max() > 0.1
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    assert buf.getvalue().count(b"<image ") == 1


@pytest.mark.parametrize("shape", [(80, 96, 80), (128, 160, 128)])  # the compact and the paper grid
def test_image_rows_label_band_keeps_its_size_in_points(shape):
    vol = np.zeros(shape, np.float32)
    fig = image_rows([("x", vol), ("y", vol)], "t")
    mosaic = np.asarray(fig.axes[0].images[0].get_array())
    band_px = mosaic.shape[0] // 2 - max(shape[1], shape[2])  # a row: its band above the tallest panel
    points = band_px / mosaic.shape[1] * fig.get_figwidth() * 72
    assert 15 <= points <= 30  # room for the 9-point labels at any grid


def test_image_rows_refuses_images_of_different_shapes():
    a, _ = _volumes()
    with pytest.raises(ValueError, match="different shapes"):
        image_rows([("a", a), ("b", a[:-1])], "t")


def test_qc_overlay_draws_three_panels():
    a, _ = _volumes()
    mask = a > 0.5
    fig = qc_overlay(a, mask, None, "qc")
    assert len(fig.axes) == 3 and all(ax.images for ax in fig.axes)
