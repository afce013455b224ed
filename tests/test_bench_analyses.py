"""benchmarks/bench_analyses.py end to end on a tiny random bundle and synthetic model-ready images.

The real app runs in subprocesses (as the benchmark drives it); the longitudinal part needs the IXI data
and DLMUSE labels, so it is left out here.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest



def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_analyses")


def _blob(shape, seed):
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).transpose(1, 2, 3, 0)
    c = np.array(shape) / 2 - 0.5
    mask = (((idx - c) / (np.array(shape) * (0.3 + 0.01 * (seed % 10)))) ** 2).sum(-1) < 1
    img = np.where(mask, 0.5 + 0.3 * rng.random(shape), 0).astype(np.float32)
    return img, mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_bids, save_tiny_bundle

    root = tmp_path_factory.mktemp("bench")
    labels = [f"{i:02d}" for i in range(1, 21)]
    bundle, grid = save_tiny_bundle(root / "tiny", {
        "licence": "CC0",
        "training": {"data": "none (random weights)", "split": {"seed": 0, "train": labels[:10],
                                                                "validation": labels[10:]}}})
    bids = make_bids(root / "bids", {s: None for s in labels},
                     participants={s: {"age": 20 + 3 * i, "sex": "MF"[i % 2]} for i, s in enumerate(labels)})
    cache = root / "cache"
    cache.mkdir()
    rng = np.random.default_rng(0)
    rows = ["participant_id\troi_a\troi_b"]
    for i, s in enumerate(labels):
        img, mask = _blob(grid.shape, i)
        nib.save(nib.Nifti1Image(img, grid.affine), str(cache / f"sub-{s}_desc-preproc_T1w.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), grid.affine), str(cache / f"sub-{s}_desc-brain_mask.nii.gz"))
        rows.append(f"sub-{s}\t{1000 - 5 * i + rng.normal():.1f}\t{rng.normal(500, 10):.1f}")
    (cache / "DONE").touch()
    roi = root / "roi.tsv"
    roi.write_text("\n".join(rows) + "\n")
    return root, bids, bundle, cache, roi, grid


def test_bench_analyses_runs_the_app(setup):
    root, bids, bundle, cache, roi, _ = setup
    bench = _bench()
    out = root / "results"
    code = bench.main(["--bids", str(bids), "--model", str(bundle), "--work", str(root / "work"), "--out", str(out),
                       "--preprocessed", str(cache), "--baseline-features", str(roi), "--ddim-steps", "2",
                       "--manip-subjects", "2", "--nprocs", "1", "--in-process", "--skip", "fill"])
    assert code == 0
    rep = json.loads((out / "analyses.json").read_text())
    assert rep["errors"] == {}
    assert rep["participant"]["embed"]["seconds_per_subject"]["n"] == 20
    rows = rep["group"]["metrics_all_subjects"]
    assert {(r["target"], r["model"]) for r in rows if r["metric"] in ("mae", "auroc")} >= {
        ("age", "probe"), ("age", "trivial"), ("age", "classical"), ("sex", "probe"), ("sex", "classical")}
    val = rep["group"]["validation_subjects"]
    assert val["validation_subjects_embedded"] == 10 and val["validation_cv"] and val["train_to_validation"]
    man = rep["manipulation"]
    assert man["n_subjects"] == 2 and all(s["validation_subject"] for s in man["subjects"])
    assert set(man["mean_predicted_age_by_strength"]) == {"-2", "-1", "-0.5", "0", "0.5", "1", "2"}
    assert 0 <= man["n_monotonic_within_1"] <= man["n_subjects"]
    years = man["target_units"]  # --strength-unit target run: realised change of the re-encoded age per change asked
    assert years["n_subjects"] == 2 and set(years["mean_change_by_asked"]) == {"-20", "-10", "-5", "0", "5", "10", "20"}
    assert np.isfinite(years["realised_per_asked_year"]["mean"])
    # alpha per year asked is the probe's 1 / (sqrt(d) |w|), the same for every subject
    assert years["alpha_per_year"]["mean"] > 0 and years["alpha_per_year"]["sd"] == pytest.approx(0, abs=1e-9)
    md = (out / "analyses.md").read_text()
    assert "## 2. Probes" in md and "## 3. Manipulation" in md and "Strengths in years" in md and rep["bundle"]["content_hash"] in md
    # a re-run finds y_sem up to date, except for the two manipulated subjects: their embed stamp now says x_T
    assert bench.main(["--bids", str(bids), "--model", str(bundle), "--work", str(root / "work"), "--out",
                       str(out), "--preprocessed", str(cache), "--baseline-features", str(roi), "--ddim-steps", "2",
                       "--manip-subjects", "2", "--nprocs", "1", "--in-process", "--skip", "fill", "group",
                       "manipulate"]) == 0
    assert json.loads((out / "analyses.json").read_text())["participant"]["embed"]["n_embedded_this_run"] == 2
    # --stage-option reaches every app call: the manipulation again, its x_T now from refined latents
    assert bench.main(["--bids", str(bids), "--model", str(bundle), "--work", str(root / "work"), "--out",
                       str(out), "--ddim-steps", "2", "--manip-subjects", "2", "--nprocs", "1", "--in-process",
                       "--changes", "--skip", "participant", "group", "fill",
                       "--stage-option", "embed.refine_latent=2"]) == 0
    rep = json.loads((out / "analyses.json").read_text())
    assert rep["settings"]["stage_options"] == ["embed.refine_latent=2"] and rep["manipulation"]["n_subjects"] == 2
    assert rep["calls"] and all("embed.refine_latent=2" in c["argv"] for c in rep["calls"])
    side = next((root / "work" / "out" / "sub-11" / "anat").glob("*_desc-xt_xt.json"))
    assert json.loads(side.read_text())["LatentRefinementSteps"] == 2
    assert "`--stage-option embed.refine_latent=2`" in (out / "analyses.md").read_text()


def test_preprocessed_cache_on_another_grid_is_refused(setup, tmp_path):
    root, bids, bundle, cache, _, grid = setup
    bench = _bench()
    other = tmp_path / "cache"
    other.mkdir()
    img, mask = _blob((8, 8, 8), 0)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(other / "sub-01_desc-preproc_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), str(other / "sub-01_desc-brain_mask.nii.gz"))
    with pytest.raises(bench.BenchError, match="do not match the bundle grid"):
        bench.import_preprocessed(other, bids, tmp_path / "out", {"01": bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"},
                                  grid.to_dict())


def test_missing_data_folder_skips(tmp_path, capsys):
    assert _bench().main(["--bids", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 0
    assert "not found; skipping" in capsys.readouterr().out
