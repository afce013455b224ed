"""benchmarks/bench_reconstruction.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest



def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_reconstruction")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import save_tiny_bundle
    from ldae_bids.model.config import preset

    root = tmp_path_factory.mktemp("recon")
    bundle, grid = save_tiny_bundle(root / "bundle", {
        "licence": "CC0", "training": {"split": {"train": ["t1"], "validation": ["v1", "v2", "v3"]}}})
    cfg, _ = preset("tiny")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for label in ("t1", "v1", "v2", "v3"):
        img = np.zeros(cfg.image_shape, np.float32)
        img[4:12, 4:12, 4:12] = rng.random((8, 8, 8))
        nib.save(nib.Nifti1Image(img, np.asarray(grid.affine)), str(data / f"sub-{label}_desc-preproc_T1w.nii.gz"))
        nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), np.asarray(grid.affine)),
                 str(data / f"sub-{label}_desc-brain_mask.nii.gz"))
    return bundle, data


def _run(setup, out, batch):
    bundle, data = setup
    assert _bench().main(["--bundle", str(bundle), "--data", str(data), "--steps", "2,3", "--random-steps", "2",
                          "--batch-size", str(batch), "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    return json.loads((out / "reconstruction.json").read_text())


def test_validation_subjects_only_and_batching_does_not_change_scores(setup, tmp_path):
    one = _run(setup, tmp_path / "b1", 1)
    three = _run(setup, tmp_path / "b3", 3)
    assert [r["subject"] for r in one["subjects"]] == ["v1", "v2", "v3"]  # never the training subject
    assert set(one["summary"]) == {"ae", "ldae_2", "ldae_3", "random"}
    for r1, r3 in zip(one["subjects"], three["subjects"]):
        for method in ("ae", "ldae_2", "ldae_3"):
            for key in ("ssim", "mse", "ssim_mask", "mse_mask"):
                assert r1["methods"][method][key] == pytest.approx(r3["methods"][method][key], abs=1e-5)
    for r in one["subjects"]:  # zeroing outside the mask of a skull-stripped input can only help
        for m in r["methods"].values():
            assert m["ssim_written"] >= m["ssim"] - 1e-6
    md = (tmp_path / "b3" / "reconstruction.md").read_text()
    assert "3 validation subjects" in md and "batch 3" in md
