"""benchmarks/bench_participant.py on four real IXI subjects with a tiny random bundle (CPU).

What is checked is the benchmark's plumbing: every participant-level stage ran through the app and
its seconds and peak memory come from the app's own resources log; the figures of a random tiny model
mean nothing and are not asserted on.
"""

from __future__ import annotations

import json

import pytest



def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_participant")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from conftest import save_tiny_bundle

    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_tiny_bundle(path, {"licence": "CC0", "training": {"data": "none (random weights)"}})[0]


@pytest.fixture
def age_probe(tmp_path):
    """A probe on the tiny model's 16-d y_sem (random directions: only its shape matters here)."""
    import numpy as np

    from ldae_bids.analysis.probe import fit_probe, save_probe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 16))
    res = fit_probe(X, 50 + 10 * X[:, 0], [f"s{i}" for i in range(20)], n_boot=0, target="age")
    return save_probe(res.probe, tmp_path / "target-age_desc-probe_probe.json")


def test_bench_participant_times_every_stage(ixi, tiny_bundle, age_probe, tmp_path):
    bench = _bench()
    out = tmp_path / "results"
    rc = bench.main(["--bids", str(ixi), "--model", str(tiny_bundle), "--n-subjects", "4", "--ddim-steps", "2",
                     "--device", "cpu", "--batch-size", "2", "--work", str(tmp_path / "work"), "--out", str(out),
                     "--probe", str(age_probe), "--n-long", "1", "--in-process",
                     "--stage-option", "embed.refine_latent=1"])
    assert rc == 0
    rep = json.loads((out / "participant.json").read_text())
    stages = rep["stages"]
    assert set(stages) == {"preprocess", "embed", "reconstruct", "manipulate", "fill-missing-sessions"}
    assert stages["preprocess"]["n_subjects"] == 4 and stages["preprocess"]["batch_sizes"] == [2, 2]
    assert stages["reconstruct"]["batch_sizes"] == [2, 2]  # batched across subjects, like embed
    assert stages["manipulate"]["n_subjects"] == 2 and stages["fill-missing-sessions"]["n_subjects"] == 1
    for s in stages.values():
        assert s["seconds_per_subject"]["mean"] > 0 and s["peak_rss_mb"] > 0 and s["subjects_per_hour"] > 0
    pre, emb = stages["preprocess"]["seconds_per_subject"]["mean"], stages["embed"]["seconds_per_subject"]["mean"]
    assert rep["participant_level_seconds_per_subject"] == pytest.approx(pre + emb)
    md = (out / "participant.md").read_text()
    assert "| preprocess | 4 |" in md
    # --stage-option reaches the app: the participant call's x_T comes from refined latents
    assert rep["settings"]["stage_options"] == ["embed.refine_latent=1"]
    assert "`--stage-option embed.refine_latent=1`" in md
    sides = sorted((tmp_path / "work" / "out").glob("sub-*/anat/*_desc-xt_xt.json"))
    assert len(sides) == 4 and all(json.loads(p.read_text())["LatentRefinementSteps"] == 1 for p in sides)
    digest = json.loads((tiny_bundle / "checksums.json").read_text())["content_hash"]
    assert rep["bundle"]["content_hash"] == digest and digest in md  # which model made the figures


def test_missing_data_folder_skips(tmp_path, capsys):
    assert _bench().main(["--bids", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 0
    assert "nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()
