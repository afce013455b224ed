"""Loading and validating a raw T1w image."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ldae_bids.errors import InputError

# Voxel sizes outside this range (mm) are certainly a broken header for a human T1w.
MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0
MIN_SHAPE = 8


def _fail(path, what: str) -> InputError:
    return InputError(f"{path}: {what}")


def load_t1w(path) -> nib.Nifti1Image:
    """Load a T1w NIfTI and check that it can be preprocessed.

    Parameters
    ----------
    path : str or os.PathLike
        NIfTI file (``.nii`` or ``.nii.gz``).

    Returns
    -------
    nibabel.Nifti1Image
        A 3D float32 image held in memory (a 4D file with one volume is squeezed).

    Raises
    ------
    InputError
        One line, ``"<path>: <what is wrong>"``, when the file is missing, unreadable or
        corrupt, not 3D, has NaN/Inf values, has a singular or non-finite affine, has
        implausible voxel sizes, or is constant.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"cannot be read as NIfTI (corrupt or truncated?): {reason}") from None
    return validate_t1w(nib.Nifti1Image(data, img.affine, img.header), path)


def validate_t1w(img: nib.spatialimages.SpatialImage, path="<in-memory image>") -> nib.Nifti1Image:
    """Check an already loaded image (see :func:`load_t1w`); return it as 3D float32."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise _fail(path, f"4D image with {data.shape[3]} volumes; expected a single 3D T1w volume")
    if data.ndim != 3:
        raise _fail(path, f"{data.ndim}D image of shape {data.shape}; expected a 3D volume")
    if min(data.shape) < MIN_SHAPE:
        raise _fail(path, f"image shape {data.shape} is too small for a brain MRI (< {MIN_SHAPE} voxels on an axis)")
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise _fail(path, f"{n_bad} voxels are NaN or infinite")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise _fail(path, "affine (qform/sform) contains NaN or infinite values")
    sv = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if sv.min() <= 1e-6 * max(sv.max(), 1e-12):
        raise _fail(path, "affine (qform/sform) is singular; the voxel-to-world mapping is broken")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < MIN_VOXEL_MM) or np.any(zooms > MAX_VOXEL_MM):
        sizes = "x".join(f"{z:.3g}" for z in zooms)
        raise _fail(path, f"implausible voxel size {sizes} mm (expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm)")
    if float(data.max()) <= float(data.min()):
        raise _fail(path, f"image is constant (all voxels = {float(data.min()):g})")
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(data, affine, header)
    out.set_data_dtype(np.float32)
    return out
