"""N4 bias-field correction (SimpleITK), fitted inside the brain mask.

Optional: SimpleITK is not a dependency of the app. The ``preprocess`` stage applies the
correction the model bundle records in ``metadata.json`` (``intensity.bias_correction``), so
inputs are treated like the model's training data; the shipped compact model was trained
without N4. ``benchmarks/bench_preprocess.py --n4-study N`` measures what N4 changes on
the IXI data: on 16 subjects (benchmarks/results/n4_study.json) it halves the white-matter
intensity CV (median 0.149 -> 0.078) and raises the NCC to the template (0.462 -> 0.558) in every
subject, for about 5 s per subject on 2 CPU cores. A stage 2 adapted to N4 images on the CPU did not read age
better from them and lost sex (docs/model.md, run 9), so the shipped model stays uncorrected.
Without SimpleITK, a request for N4 falls back to no correction with a warning, and the
sidecar parameters say so.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("ldae_bids")

# SimpleITK's N4 with 4 fitting levels x 50 iterations, fitted on a copy shrunk to ~6 mm
# voxels (the field is smooth; 6 mm gives the same correction as 4 mm at a third of the time).
N4_ITERATIONS = (50, 50, 50, 50)
N4_SHRINK_MM = 6.0
N4_CONVERGENCE = 1e-3

_warned = False


def n4_available() -> bool:
    """Whether SimpleITK can be imported."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def n4_params() -> dict:
    """Parameters recorded in sidecars."""
    from importlib.metadata import version

    return {
        "tool": "SimpleITK N4BiasFieldCorrection",
        "version": version("SimpleITK"),
        "iterations": list(N4_ITERATIONS),
        "shrink_to_mm": N4_SHRINK_MM,
        "convergence_threshold": N4_CONVERGENCE,
        "mask": "deepbet brain mask",
    }


def n4_correct(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Divide ``data`` by the N4 bias field estimated inside ``mask``.

    Parameters
    ----------
    data : numpy.ndarray
        3D intensities (non-negative).
    mask : numpy.ndarray
        Brain mask (bool) on the same grid.
    affine : numpy.ndarray
        Voxel-to-world matrix (for the voxel sizes).
    threads : int, optional
        SimpleITK threads (default: its global setting).

    Returns
    -------
    numpy.ndarray
        float32 corrected image, same shape.
    """
    import SimpleITK as sitk

    spacing = [float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))]
    img = sitk.GetImageFromArray(np.transpose(np.maximum(data, 0), (2, 1, 0)).astype(np.float32))
    img.SetSpacing(spacing)
    msk = sitk.GetImageFromArray(np.transpose(mask, (2, 1, 0)).astype(np.uint8))
    msk.CopyInformation(img)
    shrink = [max(1, int(round(N4_SHRINK_MM / s))) for s in spacing]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.SetConvergenceThreshold(N4_CONVERGENCE)
    if threads:
        n4.SetNumberOfThreads(int(threads))
    n4.Execute(sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink))
    log_field = n4.GetLogBiasFieldAsImage(img)
    out = sitk.GetArrayFromImage(img / sitk.Exp(log_field))
    return np.transpose(out, (2, 1, 0)).astype(np.float32)


def correct_bias(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, method: str | None = "n4"):
    """Apply the configured correction; returns ``(image, params_or_None)``.

    ``method`` is ``"n4"`` or ``None``. With ``"n4"`` and no SimpleITK, warns once and
    returns the input unchanged with ``None`` parameters.
    """
    global _warned
    if method is None or method == "none":
        return data, None
    if method != "n4":
        raise ValueError(f"unknown bias correction {method!r}; use 'n4' or None")
    if not n4_available():
        if not _warned:
            log.warning("SimpleITK is not installed: N4 bias-field correction skipped (pip install SimpleITK)")
            _warned = True
        return data, None
    return n4_correct(data, mask, affine), n4_params()
