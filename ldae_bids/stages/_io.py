"""Reading what earlier stages wrote, for the model stages."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SessionInput
from ldae_bids.errors import MissingInputError


def require(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; run the '{stage}' stage first")
    return path


def load_preproc(ctx, ses: SessionInput) -> tuple[np.ndarray, np.ndarray, Path]:
    """The model-ready image and its mask on the grid (numpy, float32 / bool) and the image path."""
    res = ctx.grid.res_label
    img_path = require(ctx.writer.path(**outputs.preproc_t1w(ses, res), extension=".nii.gz"), "preprocess")
    mask_path = require(ctx.writer.path(**outputs.brain_mask_grid(ses, res), extension=".nii.gz"), "preprocess")
    img = nib.load(str(img_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if tuple(data.shape) != tuple(ctx.grid.shape):
        raise MissingInputError(f"{img_path}: shape {data.shape} is not the model grid {tuple(ctx.grid.shape)}; "
                                "re-run preprocess with this model (--force)")
    return data, np.asarray(nib.load(str(mask_path)).dataobj) > 0, img_path


def ysem_columns(dim: int) -> list[str]:
    return [f"ysem_{i:03d}" for i in range(dim)]


def load_ysem(ctx, ses: SessionInput) -> tuple[np.ndarray, Path]:
    import pandas as pd

    path = require(ctx.writer.path(**outputs.ysem(ses), extension=".tsv"), "embed")
    df = pd.read_csv(path, sep="\t")
    return df.filter(like="ysem_").to_numpy(dtype=np.float32)[0], path


def load_xt(ctx, ses: SessionInput):
    from safetensors.torch import load_file

    path = require(ctx.writer.path(**outputs.xt(ses), extension=".safetensors"), "embed")
    return load_file(str(path))["x_T"], path


def grid_image(ctx, data: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(ctx.grid.affine, dtype=float))
