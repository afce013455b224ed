"""Shared fixtures: synthetic BIDS trees from a spec, the real IXI data when present."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IXI = SHARED / "data" / "ixi"
TEMPLATEFLOW = SHARED / "templateflow"


def _nifti(path: Path, shape=(24, 28, 24), seed=0, zooms=(2.0, 2.0, 2.0)) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = rng.normal(100, 10, size=shape).astype(np.float32)
    c = np.array(shape) / 2
    idx = np.indices(shape).transpose(1, 2, 3, 0)
    data[((idx - c) ** 2 / (c * 0.7) ** 2).sum(-1) < 1] += 400
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def save_tiny_bundle(path: Path, metadata: dict, latent_mean: tuple[float, ...] | None = None, seed: int = 0):
    """A bundle of the tiny preset with random weights (``seed``) on a 10 mm grid centred like the compact one.

    ``metadata`` is completed with that grid; ``latent_mean``: the config's latent channel means (two values).
    Returns ``(path, grid)``.
    """
    import dataclasses

    import torch

    from ldae_bids.model.bundle import save_bundle
    from ldae_bids.model.config import preset
    from ldae_bids.model.pipeline import LdaePipeline
    from ldae_bids.preprocessing import Grid

    torch.manual_seed(seed)
    cfg, _ = preset("tiny")
    cfg = dataclasses.replace(cfg, latent_mean=latent_mean)
    grid = Grid.centred_like(Grid.compact(), cfg.image_shape, 10.0, name="tiny")
    save_bundle(path, LdaePipeline(cfg).eval(), {"grid": grid.to_dict(), **metadata})
    return path, grid


def split_bundle_and_images(root: Path, labels=("t1", "v1", "v2", "v3"), masks: bool = True,
                            latent_mean: tuple[float, ...] | None = None):
    """A tiny bundle whose split is ``t1`` (training) and ``v1``-``v3`` (validation), and model-ready images.

    The images (one random 8-voxel cube each, seed 0, in the order of ``labels``) are written to ``root/data``
    as ``sub-<label>_desc-preproc_T1w.nii.gz``, with a ``desc-brain_mask`` beside each when ``masks``; the
    layout ``bench_preprocess.py --save-dir`` writes. Returns ``(bundle, grid, data)``.
    """
    import nibabel as nib

    from ldae_bids.model.config import preset

    bundle, grid = save_tiny_bundle(root / "bundle", {
        "licence": "CC0", "training": {"split": {"train": ["t1"], "validation": ["v1", "v2", "v3"]}}},
        latent_mean=latent_mean)
    cfg, _ = preset("tiny")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for label in labels:
        img = np.zeros(cfg.image_shape, np.float32)
        img[4:12, 4:12, 4:12] = rng.random((8, 8, 8))
        nib.save(nib.Nifti1Image(img, np.asarray(grid.affine)), str(data / f"sub-{label}_desc-preproc_T1w.nii.gz"))
        if masks:
            nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), np.asarray(grid.affine)),
                     str(data / f"sub-{label}_desc-brain_mask.nii.gz"))
    return bundle, grid, data


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_bids(root: Path, spec: dict[str, list[str] | None], participants: dict[str, dict] | None = None,
              runs: dict[tuple[str, str | None], int] | None = None) -> Path:
    """A small BIDS dataset: ``spec`` maps subject label -> session labels (None: no sessions)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tage\tsex"]
    for i, (sub, sessions) in enumerate(sorted(spec.items())):
        meta = (participants or {}).get(sub, {"age": 20 + i, "sex": "MF"[i % 2]})
        rows.append(f"sub-{sub}\t{meta.get('age', 'n/a')}\t{meta.get('sex', 'n/a')}")
        for ses in sessions or [None]:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            n = (runs or {}).get((sub, ses), 1)
            for r in range(1, n + 1):
                run = f"_run-{r}" if n > 1 else ""
                _nifti(folder / f"{name}{run}_T1w.nii.gz", seed=zlib.crc32(f"{sub}{ses}{r}".encode()))
        if sessions:
            lines = ["session_id\tacq_time"] + [f"ses-{s}\t2020-0{1 + k}-01T10:00:00" for k, s in enumerate(sessions)]
            (root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text("\n".join(lines) + "\n")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def bids_factory(tmp_path):
    def factory(spec, name="bids", **kw):
        return make_bids(tmp_path / name, spec, **kw)

    return factory


@pytest.fixture(autouse=True)
def _offline_templateflow(tmp_path_factory, monkeypatch):
    """Every test sees a writable copy of the offline TemplateFlow home, never the network."""
    if TEMPLATEFLOW.is_dir():
        home = tmp_path_factory.getbasetemp() / "templateflow"
        if not home.exists():
            shutil.copytree(TEMPLATEFLOW, home)
        monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.getbasetemp()))
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def ixi() -> Path:
    if not IXI.is_dir():
        pytest.skip(f"real data not found at {IXI} (../shared/data/ixi beside the repository)")
    return IXI
