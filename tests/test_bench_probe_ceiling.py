"""benchmarks/bench_probe_ceiling.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest


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
    # paired to y_sem on the same draws: the difference of the two point values
    d = feats["voxels"]["targets"]["age"]["minus_y_sem"]
    assert d["value"] == pytest.approx(feats["voxels"]["targets"]["age"]["value"] - feats["y_sem"]["targets"]["age"]["value"])
    assert "minus_y_sem" not in feats["y_sem"]["targets"]["age"]


def test_skips_without_data(tmp_path, capsys):
    from conftest import load_benchmark

    assert load_benchmark("bench_probe_ceiling").main(["--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_views_and_paired_differences_to_y_sem(tmp_path):
    import torch

    from conftest import load_benchmark

    bench = load_benchmark("bench_probe_ceiling")
    # the mirror maps crop index i to 78 - i (the template midline in the compact crop): an image symmetric
    # that way is unchanged, everywhere but the last index (rolled in from the other side)
    x = torch.rand(1, 1, 80, 3, 2)
    x = (x + x[:, :, torch.arange(78, -2, -1).clamp(0, 79)]) / 2
    x[:, :, 79] = 0
    m = bench.mirror_lr(x)
    assert torch.allclose(m[:, :, :79], x[:, :, :79])
    assert len(bench.shifted_views(x)) == 7

    # paired differences: the same rows and draws, reference y_sem
    from ldae_bids.analysis.probe import fit_probe

    rng = np.random.default_rng(1)
    age = rng.uniform(20, 80, 40)
    groups = np.array([f"s{i}" for i in range(40)])
    good = np.c_[age + rng.normal(0, 2, 40), rng.normal(size=(40, 3))]
    fits = {name: fit_probe(X, age, groups, n_splits=4, n_boot=200, target="age", feature_name=name)
            for name, X in (("y_sem", rng.normal(size=(40, 4))), ("roi", good))}
    d = bench.paired_to_y_sem(fits, 200, 0)["roi"]
    mae = {k: f.metrics["mae"].value for k, f in fits.items()}
    assert d["value"] == pytest.approx(mae["roi"] - mae["y_sem"])
    assert d["ci_high"] < 0  # the informative features beat noise, on the same draws


def test_compare_data_rows_are_paired_to_the_same_representation(tmp_path):
    from conftest import load_benchmark, save_tiny_bundle
    from ldae_bids.model.config import preset

    bundle, grid = save_tiny_bundle(tmp_path / "bundle", {"licence": "CC0"})
    cfg, _ = preset("tiny")
    bids = tmp_path / "bids"
    bids.mkdir()
    rng = np.random.default_rng(1)
    pattern = rng.random((8, 8, 8)).astype(np.float32)
    people = ["participant_id\tage"]
    for name in ("plain", "other"):
        (tmp_path / name).mkdir()
    for i in range(16):
        label, age = f"S{i:02d}", 20 + 4 * i
        people.append(f"sub-{label}\t{age}")
        for name, signal in (("plain", age / 100), ("other", rng.random())):  # age only in the plain images
            img = np.zeros(cfg.image_shape, np.float32)
            img[4:12, 4:12, 4:12] = 0.2 + 0.6 * pattern * signal + 0.01 * rng.random((8, 8, 8))
            nib.save(nib.Nifti1Image(img, np.asarray(grid.affine)),
                     str(tmp_path / name / f"sub-{label}_desc-preproc_T1w.nii.gz"))
    (tmp_path / "other" / "sub-S00_desc-preproc_T1w.nii.gz").unlink()  # only subjects with both images count
    (bids / "participants.tsv").write_text("\n".join(people) + "\n")
    out = tmp_path / "out"
    bench = load_benchmark("bench_probe_ceiling")
    assert bench.main(["--data", str(tmp_path / "plain"), "--compare-data", str(tmp_path / "other"),
                       "--compare-label", "alt", "--bids", str(bids), "--bundle", str(bundle), "--targets", "age",
                       "--features", "voxels", "y_sem", "--n-splits", "3", "--n-boot", "50", "--threads", "1",
                       "--out", str(out)]) == 0
    res = json.loads((out / "probe_ceiling.json").read_text())
    assert res["n_subjects"] == 15 and res["compare"]["label"] == "alt"
    feats = res["features"]
    assert list(feats) == ["voxels", "y_sem", "voxels:alt", "y_sem:alt"]
    base, alt = feats["voxels"]["targets"]["age"], feats["voxels:alt"]["targets"]["age"]
    assert alt["value"] > 2 * base["value"]  # the other images do not carry age
    assert alt["minus_base"]["value"] == pytest.approx(alt["value"] - base["value"])
    assert "minus_y_sem" not in alt and "minus_base" not in base
    md = (out / "probe_ceiling.md").read_text()
    assert "| voxels:alt | 4,096 |" in md and "age: alt minus --data (paired)" in md  # no masks: every voxel

    # the same images encoded by another bundle (e.g. one trained on them): the voxels are the same, y_sem is not
    other, _ = save_tiny_bundle(tmp_path / "other-bundle", {"licence": "CC0"}, seed=1)
    out2 = tmp_path / "out2"
    assert bench.main(["--data", str(tmp_path / "plain"), "--compare-data", str(tmp_path / "plain"),
                       "--compare-bundle", str(other), "--compare-label", "b1", "--bids", str(bids), "--bundle",
                       str(bundle), "--targets", "age", "--features", "voxels", "y_sem", "--n-splits", "3",
                       "--n-boot", "50", "--threads", "1", "--out", str(out2)]) == 0
    res = json.loads((out2 / "probe_ceiling.json").read_text())
    from ldae_bids.model.bundle import load_bundle

    assert res["compare"]["bundle"]["content_hash"] == load_bundle(other).content_hash != res["bundle"]["content_hash"]
    feats = res["features"]
    assert feats["voxels:b1"]["targets"]["age"]["minus_base"]["value"] == 0
    assert feats["y_sem:b1"]["targets"]["age"]["value"] != feats["y_sem"]["targets"]["age"]["value"]
    assert "encoded by bundle" in (out2 / "probe_ceiling.md").read_text()
