"""ITK/ANTs text transform files for 4x4 world-to-world affines.

ITK works in LPS physical coordinates, NIfTI/nibabel in RAS. A RAS matrix ``M`` becomes
``F M F`` in LPS with ``F = diag(-1, -1, 1, 1)``. ITK stores the transform as the matrix
``A``, a translation and a fixed centre ``c``: ``y = A (x - c) + t + c``; we write ``c = 0``.

ITK transforms map points of the *fixed* (reference) space to the *moving* space (they are
"pull" transforms). The matrix written is exactly the one given; what it means is the
caller's contract. ``ldae_bids`` writes ``from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm``
files as the transform ITK/ANTs needs to resample the T1w onto the template, i.e. the
template-to-native point mapping (the inverse of ``PreprocResult.native_to_template``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 RAS world-to-world affine into the LPS convention (self-inverse)."""
    return _LPS @ np.asarray(matrix, dtype=np.float64) @ _LPS


def write_itk_affine(matrix_ras, path) -> Path:
    """Write a 4x4 RAS affine as an ITK ``AffineTransform_double_3_3`` text file.

    Parameters
    ----------
    matrix_ras : array_like
        4x4 world-to-world affine in RAS millimetres.
    path : str or os.PathLike
        Output file, conventionally ``*.txt`` (ANTs and ITK-SNAP read it).

    Returns
    -------
    pathlib.Path
    """
    m = ras_to_lps(np.asarray(matrix_ras, dtype=np.float64).reshape(4, 4))
    params = list(m[:3, :3].ravel()) + list(m[:3, 3])
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        "Parameters: " + " ".join(repr(float(v)) for v in params) + "\n"
        "FixedParameters: 0 0 0\n"
    )
    path = Path(path)
    path.write_text(text)
    return path


def read_itk_affine(path) -> np.ndarray:
    """Read an ITK ``AffineTransform`` / ``MatrixOffsetTransformBase`` text file as a RAS 4x4.

    Non-zero centres (``FixedParameters``) are folded into the translation.
    """
    params = fixed = None
    for line in Path(path).read_text().splitlines():
        if line.startswith("Parameters:"):
            params = np.array(line.split(":", 1)[1].split(), dtype=np.float64)
        elif line.startswith("FixedParameters:"):
            fixed = np.array(line.split(":", 1)[1].split(), dtype=np.float64)
    if params is None or params.size != 12:
        raise ValueError(f"{path}: not a 3D ITK affine transform file")
    centre = np.zeros(3) if fixed is None or fixed.size != 3 else fixed
    a = params[:9].reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = params[9:] + centre - a @ centre
    return ras_to_lps(m)
