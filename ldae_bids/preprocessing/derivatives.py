"""Use sMRIPrep/fMRIPrep outputs instead of preprocessing (``--derivatives DIR``).

Their ``space-MNI152NLin2009cAsym_desc-preproc_T1w`` and ``desc-brain_mask`` are
already in template space: they are masked, resampled once onto the model grid and
normalised; no extraction or registration is run.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ldae_bids.errors import MissingInputError

SPACE = "MNI152NLin2009cAsym"


def _find(ses, roots, suffix: str) -> Path | None:
    name = f"sub-{ses.subject}" + (f"_ses-{ses.session}" if ses.session else "")
    for root in roots:
        folder = Path(root) / f"sub-{ses.subject}" / (f"ses-{ses.session}" if ses.session else "") / "anat"
        hits = sorted(folder.glob(f"{name}_*space-{SPACE}_*{suffix}.nii.gz"))
        if not ses.session:  # never take a session's file for a session-less input
            hits = [h for h in hits if "_ses-" not in h.name]
        if hits:
            return hits[0]
    return None


def from_derivatives(ses, roots, grid, device="cpu", normalisation: str = "percentile"):
    """A :class:`~ldae_bids.preprocessing.PreprocResult` from existing template-space derivatives."""
    from ldae_bids.preprocessing import PreprocResult, load_t1w, normalise, resample_to_grid

    image_path = _find(ses, roots, "desc-preproc_T1w")
    mask_path = _find(ses, roots, "desc-brain_mask")
    if image_path is None or mask_path is None:
        what = "desc-preproc_T1w" if image_path is None else "desc-brain_mask"
        raise MissingInputError(f"{ses.key}: no space-{SPACE} {what} in --derivatives "
                                f"{', '.join(map(str, roots))}")
    img = load_t1w(image_path)
    mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask.shape != data.shape:
        raise MissingInputError(f"{mask_path}: mask shape {mask.shape} differs from {image_path.name} {data.shape}")
    import torch

    on_grid, mask_grid = resample_to_grid(data, mask, img.affine, np.eye(4), grid, torch.device(device))
    normed, info = normalise(on_grid, mask_grid, method=normalisation)
    affine = np.asarray(grid.affine, dtype=float)
    return PreprocResult(
        image=nib.Nifti1Image(normed, affine),
        mask_native=None,
        mask_grid=nib.Nifti1Image(mask_grid.astype(np.uint8), affine),
        native_to_template=None,
        qc={"brain_volume_ml": float(mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000)},
        params={"input": "derivatives", "preproc_T1w": str(image_path), "brain_mask": str(mask_path),
                "normalisation": info},
        grid=grid,
    )
