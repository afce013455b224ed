"""Intensity normalisation of a skull-stripped image on the model grid to [0, 1]."""

from __future__ import annotations

import numpy as np

METHODS = ("percentile", "minmax")
PERCENTILES = (0.5, 99.5)


def normalise(image: np.ndarray, mask: np.ndarray, method: str = "percentile", percentiles=PERCENTILES) -> tuple[np.ndarray, dict]:
    """Scale brain intensities to [0, 1] (float32), background 0.

    Parameters
    ----------
    image : numpy.ndarray
        Skull-stripped image.
    mask : numpy.ndarray
        Brain mask (bool); voxels outside are set to 0.
    method : {"percentile", "minmax"}
        ``"percentile"``: the ``percentiles`` of the intensities inside the mask map to 0
        and 1, values beyond are clipped (robust to a few hot or dark voxels).
        ``"minmax"``: the reference's per-volume min-max over the mask.
    percentiles : tuple of float
        Low and high percentiles for ``"percentile"``.

    Returns
    -------
    image : numpy.ndarray
        float32 in [0, 1].
    info : dict
        The method and the raw intensities that mapped to 0 and 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {METHODS}")
    vals = image[mask]
    if vals.size == 0:
        return np.zeros(image.shape, np.float32), {"method": method, "low": 0.0, "high": 0.0}
    if method == "percentile":
        low, high = (float(v) for v in np.percentile(vals, percentiles))
    else:
        low, high = float(vals.min()), float(vals.max())
    scale = high - low if high > low else 1.0
    out = np.clip((image - low) / scale, 0.0, 1.0).astype(np.float32)
    out[~mask] = 0.0
    info = {"method": method, "low": low, "high": high}
    if method == "percentile":
        info["percentiles"] = list(percentiles)
    return out, info
