"""Preprocessing of raw T1w images onto the model grid.

Steps: validate (:func:`load_t1w`), brain extraction (deepbet), N4 bias-field correction
inside the brain (SimpleITK), 12-dof affine registration of the brain to the
MNI152NLin2009cAsym brain (batched torch, GPU when available), one trilinear resampling
onto a :class:`Grid`, robust percentile scaling to [0, 1]. Choices and their measurements:
``benchmarks/results/preprocess.md``.
"""

from .grid import Grid
from .io import load_t1w, validate_t1w
from .itk import read_itk_affine, write_itk_affine
from .normalise import normalise
from .pipeline import PreprocResult, load_template, preprocess_batch, preprocess_t1w, resample_to_grid
from .spatial import resolve_device

__all__ = [
    "Grid",
    "PreprocResult",
    "load_t1w",
    "validate_t1w",
    "preprocess_t1w",
    "preprocess_batch",
    "write_itk_affine",
    "read_itk_affine",
    "normalise",
    "load_template",
    "resample_to_grid",
    "resolve_device",
]
