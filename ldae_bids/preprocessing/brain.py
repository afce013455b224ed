"""Brain extraction with deepbet (MIT licence; weights ship in its wheel)."""

from __future__ import annotations

import contextlib
import threading

import nibabel as nib
import numpy as np
import torch

# Chosen on the 134 IXI subjects against the DLMUSE brain masks (benchmarks/results/preprocess.md).
DEFAULT_THRESHOLD = 0.5
DEFAULT_DILATE = 0

_MODELS: dict[str, object] = {}
_LOCK = threading.Lock()


def deepbet_version() -> str:
    """Installed deepbet version string."""
    from importlib.metadata import version

    try:
        return version("deepbet")
    except Exception:  # pragma: no cover
        return "unknown"


def _extractor(device: torch.device):
    """One deepbet ``BrainExtraction`` per device, loaded lazily and reused."""
    key = str(device)
    with _LOCK:
        if key not in _MODELS:
            from deepbet import BrainExtraction

            bet = BrainExtraction(no_gpu=True)  # loads on CPU; we move it ourselves
            bet.model.to(device)
            bet.bbox_model.to(device)
            _MODELS[key] = bet
        return _MODELS[key]


def brain_probability(img: nib.Nifti1Image, device: torch.device | str = "cpu", precision: str = "fp32"):
    """deepbet's brain probability map in canonical (RAS) orientation.

    ``precision="bf16"`` runs deepbet's networks under bf16 autocast (CPU or CUDA): faster on a CPU with
    native bf16, masks nearly identical (``benchmarks/results/preprocess-bf16/preprocess_compare.md``).

    Returns
    -------
    prob : numpy.ndarray
        float32 probability on ``nib.as_closest_canonical(img)``'s array.
    bbox : tuple of slice
        deepbet's brain bounding box in that array (used by :func:`postprocess`).
    canon : nibabel.Nifti1Image
        The canonical image.
    """
    canon = nib.as_closest_canonical(img)
    x = np.asarray(canon.dataobj, dtype=np.float32)
    dev = torch.device(device)
    bet = _extractor(dev)
    mixed = precision == "bf16" and dev.type in ("cpu", "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    with _LOCK, torch.no_grad(), autocast:  # run_model stores the bbox on the shared object
        prob = bet.run_model(x.copy())
        bbox = bet.bbox
    return prob.astype(np.float32), bbox, canon


def postprocess(prob: np.ndarray, bbox, threshold: float = DEFAULT_THRESHOLD, n_dilate: int = DEFAULT_DILATE):
    """deepbet's postprocessing: threshold, largest component, fill holes, dilate."""
    import fill_voids
    from deepbet.utils import dilate, keep_largest_connected_component

    mask = prob > threshold
    if not mask[bbox].any():
        return mask.astype(np.uint8)
    mask[bbox] = keep_largest_connected_component(mask[bbox])
    mask[bbox] = fill_voids.fill(mask[bbox])
    return dilate(mask, n_dilate).astype(np.uint8)


def to_input_orientation(array: np.ndarray, canon: nib.Nifti1Image, img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Put a canonical-orientation array back on ``img``'s grid (uint8 image)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(canon.affine), nib.io_orientation(img.affine))
    back = nib.orientations.apply_orientation(array, ornt)
    out = nib.Nifti1Image(np.ascontiguousarray(back).astype(np.uint8), img.affine)
    out.set_data_dtype(np.uint8)
    return out


def brain_mask(
    img: nib.Nifti1Image,
    device: torch.device | str = "cpu",
    threshold: float = DEFAULT_THRESHOLD,
    n_dilate: int = DEFAULT_DILATE,
    precision: str = "fp32",
) -> nib.Nifti1Image:
    """Binary brain mask (uint8) of a T1w image on its own grid.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        3D T1w image, any orientation.
    device : torch.device or str
        Where deepbet runs.
    threshold : float
        Cut-off on deepbet's probability.
    n_dilate : int
        Voxel layers to dilate (negative erodes) after deepbet's postprocessing.
    precision : {"fp32", "bf16"}
        Arithmetic of deepbet's networks (see :func:`brain_probability`).

    Returns
    -------
    nibabel.Nifti1Image
        uint8 mask with ``img``'s affine and shape.
    """
    prob, bbox, canon = brain_probability(img, device, precision)
    return to_input_orientation(postprocess(prob, bbox, threshold, n_dilate), canon, img)
