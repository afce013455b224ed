"""benchmarks/bench_probe_ceiling.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np


def test_every_representation_is_probed_in_the_same_folds(tmp_path):
    from conftest import load_benchmark, save_tiny_bundle
    from ldae_bids.model.config import preset

    bundle, grid = save_tiny_bundle(tmp_path / "bundle", {"licence": "CC0"})
    cfg, _ = preset("tiny")
    data, bids = tmp_path / "data", tmp_path / "bids"
    data.mkdir()
    (bids / "derivatives" / "dlmuse").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pattern = rng.random((8, 8, 8)).astype(np.float32)
    people, roi = ["participant_id\tage\tsex"], ["participant_id\troi_1_mm3\troi_2_mm3"]
    for i in range(16):
        label, age = f"S{i:02d}", 20 + 4 * i
        img = np.zeros(cfg.image_shape, np.float32)
        # age is written into the image (a linear read-out of the voxels finds it); sex is not
        img[4:12, 4:12, 4:12] = 0.2 + 0.6 * pattern * (age / 100) + 0.01 * rng.random((8, 8, 8))
        nib.save(nib.Nifti1Image(img, np.asarray(grid.affine)), str(data / f"sub-{label}_desc-preproc_T1w.nii.gz"))
        nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), np.asarray(grid.affine)),
                 str(data / f"sub-{label}_desc-brain_mask.nii.gz"))
        people.append(f"sub-{label}\t{age}\t{'MF'[i % 2]}")
        roi.append(f"sub-{label}\t{1000 + rng.normal()}\t{2000 + rng.normal()}")
    (bids / "participants.tsv").write_text("\n".join(people) + "\n")
    (bids / "derivatives" / "dlmuse" / "roi_volumes.tsv").write_text("\n".join(roi) + "\n")
    out = tmp_path / "out"
    bench = load_benchmark("bench_probe_ceiling")
    assert bench.main(["--data", str(data), "--bids", str(bids), "--bundle", str(bundle), "--n-splits", "4",
                       "--n-boot", "50", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "probe_ceiling.json").read_text())
    assert res["n_subjects"] == 16 and res["kinds"] == {"age": "regression", "sex": "classification"}
    feats = res["features"]
    assert set(feats) == {"voxels", "latent", "y_sem", "roi"}
    assert feats["voxels"]["dim"] == 8 ** 3 and feats["y_sem"]["dim"] == cfg.semantic_encoder.emb_dim
    assert feats["latent"]["dim"] == int(np.prod(cfg.latent_shape)) and feats["roi"]["dim"] == 2
    # the voxels carry age exactly; the noise ROI volumes do not: rows are aligned with the right subjects
    assert feats["voxels"]["targets"]["age"]["value"] < 0.3 * res["trivial"]["age"]
    assert feats["roi"]["targets"]["age"]["value"] > 0.6 * res["trivial"]["age"]
    assert "| voxels | 512 |" in (out / "probe_ceiling.md").read_text()


def test_skips_without_data(tmp_path, capsys):
    from conftest import load_benchmark

    assert load_benchmark("bench_probe_ceiling").main(["--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out
