"""Training data: find model-ready images, split subjects, load volumes, draw patches."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ldae_bids.errors import InputError, MissingInputError

PREPROC_GLOB = "**/*_desc-preproc_T1w.nii.gz"
_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


def find_images(inputs: list[Path]) -> list[Path]:
    """Model-ready images from files and folders (folders are searched for ``*_desc-preproc_T1w.nii.gz``)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(item.glob(PREPROC_GLOB)))
        elif item.is_file():
            found.append(item)
        else:
            raise MissingInputError(f"{item}: no such file or folder")
    if not found:
        raise MissingInputError(f"no *_desc-preproc_T1w.nii.gz image under {', '.join(map(str, inputs))}")
    return sorted(set(found))


def subject_of(path: Path) -> str:
    """BIDS subject label of an image path (the file stem when there is none)."""
    match = _SUBJECT.search(Path(path).name) or _SUBJECT.search(str(path))
    return match.group(1) if match else Path(path).name.split(".")[0]


def split_subjects(subjects: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded subject-level split; returns sorted (train, validation) labels.

    At least one subject goes to validation when ``val_fraction > 0`` and there are
    two subjects or more.
    """
    unique = sorted(set(subjects))
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) > 1:
        n_val = min(max(n_val, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(set(unique) - set(val))
    return train, val


def mask_path_for(image: Path) -> Path | None:
    """The ``desc-brain_mask`` next to a ``desc-preproc_T1w`` image, if present."""
    name = Path(image).name.replace("_desc-preproc_T1w.nii.gz", "_desc-brain_mask.nii.gz")
    candidate = Path(image).with_name(name)
    return candidate if candidate.exists() and candidate != Path(image) else None


def load_volume(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A model-ready volume as float32 in [0, 1], checked against ``shape``."""
    import nibabel as nib

    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types
        raise InputError(f"{path}: cannot read image ({exc})") from exc
    data = np.squeeze(data)
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise InputError(f"{path}: shape {list(data.shape)} does not match the model grid {list(shape)}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: image contains NaN or infinite values")
    return np.clip(data, 0.0, 1.0)


def grid_of(path: Path, template: str) -> dict:
    """Grid dict (shape, spacing, affine, template) of a model-ready image."""
    import nibabel as nib

    img = nib.load(str(path))
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = zooms[0] if max(zooms) - min(zooms) < 1e-4 else zooms
    return {"shape": [int(s) for s in img.shape[:3]], "spacing": spacing,
            "affine": np.round(img.affine, 6).tolist(), "template": template}


class VolumeStore:
    """Volumes held in memory as float16 tensors (1, D, H, W), loaded once (on the GPU when they fit: :func:`place`)."""

    def __init__(self, paths: list[Path], shape: tuple[int, ...]):
        self.paths = list(paths)
        self.volumes = [torch.from_numpy(load_volume(p, shape)).half()[None] for p in self.paths]

    def __len__(self) -> int:
        return len(self.volumes)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.volumes)

    def to(self, device) -> "VolumeStore":
        """Hold the volumes on ``device`` (a GPU: batches are then stacked there, with no host copy per step)."""
        self.volumes = [v.to(device) for v in self.volumes]
        return self

    def batch(self, indices) -> torch.Tensor:
        """(B, 1, D, H, W) float32 batch of the given indices, on the store's device."""
        return torch.stack([self.volumes[int(i)].float() for i in indices])


def random_patches(images: torch.Tensor, size: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """One random crop of ``size`` per item of a (B, C, D, H, W) batch."""
    out = []
    for img in images:
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(img.shape[1:], size)]
        sl = tuple(slice(a, a + p) for a, p in zip(starts, size))
        out.append(img[(slice(None), *sl)])
    return torch.stack(out)


def place(stores, device, fraction: float = 0.25) -> bool:
    """Move the training (and validation) volumes onto a CUDA ``device`` when together they take at most ``fraction``
    of its free memory, so each step's batch is stacked on the GPU (no host stacking and copy per step). Returns
    whether they moved; on the CPU, or when they do not fit, they stay in host memory."""
    stores = [s for s in stores if s is not None]
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if sum(s.nbytes() for s in stores) > fraction * free:
        return False
    for s in stores:
        s.to(device)
    return True
