"""The model stages end to end on CPU with a tiny random bundle and synthetic model-ready images.

Preprocessing is tested on its own (test_preprocessing.py); here its outputs are written directly so
that embed, reconstruct, manipulate and fill-missing-sessions run through the real CLI in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SessionInput
from ldae_bids.bids.writer import DerivativesWriter
from ldae_bids.cli.main import main


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from conftest import save_tiny_bundle

    return save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", {
        "normalisation": "percentile", "licence": "CC0", "training_data": "none (random weights)"})


def _blob(shape, seed):
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).transpose(1, 2, 3, 0)
    c = np.array(shape) / 2 - 0.5
    mask = (((idx - c) / (np.array(shape) * 0.4)) ** 2).sum(-1) < 1
    img = np.where(mask, 0.5 + 0.3 * rng.random(shape), 0).astype(np.float32)
    return img, mask


@pytest.fixture
def prepared(bids_factory, tmp_path, tiny_bundle):
    """A dataset whose preprocess outputs already exist in OUT (as the preprocess stage writes them)."""
    bundle, grid = tiny_bundle
    bids = bids_factory({"01": ["M00", "M06", "M12"], "02": None})
    out = tmp_path / "out"
    w = DerivativesWriter(out, bids)
    k = 0
    for sub, sessions in (("01", ["M00", "M06", "M12"]), ("02", [None])):
        for ses in sessions:
            ents = {"subject": sub, **({"session": ses} if ses else {})}
            s = SessionInput(sub, ses, bids / "x", ents)
            img, mask = _blob(grid.shape, k)
            k += 1
            w.write_nifti(nib.Nifti1Image(img, grid.affine), outputs.preproc_t1w(s, grid.res_label),
                          {"SkullStripped": True})
            w.write_nifti(nib.Nifti1Image(mask.astype(np.uint8), grid.affine),
                          outputs.brain_mask_grid(s, grid.res_label))
    return bids, out, bundle


def _run(bids, out, bundle, *args):
    return main([str(bids), str(out), "participant", "--model", str(bundle), "--skip-bids-validation",
                 "--skip-stages", "preprocess", "--ddim-steps", "4", "-w", str(out.parent / "w"), *map(str, args)])


def test_embed_and_reconstruct(prepared):
    bids, out, bundle = prepared
    assert _run(bids, out, bundle, "--stages", "embed", "reconstruct", "--nprocs", "1") == 0  # host work serial
    anat = out / "sub-01" / "ses-M06" / "anat"
    y = pd.read_csv(anat / "sub-01_ses-M06_space-MNI152NLin2009cAsym_desc-ysem_features.tsv", sep="\t")
    assert list(y.columns[:2]) == ["participant_id", "session_id"] and y.filter(like="ysem_").shape == (1, 16)
    from safetensors.torch import load_file

    xt = load_file(str(anat / "sub-01_ses-M06_space-MNI152NLin2009cAsym_desc-xt_xt.safetensors"))["x_T"]
    assert xt.shape == (1, 2, 8, 8, 8)
    side = json.loads((anat / "sub-01_ses-M06_space-MNI152NLin2009cAsym_res-10_desc-reconstruction_T1w.json")
                      .read_text())
    assert set(side["Metrics"]) == {"ssim", "mse", "ssim_mask", "mse_mask"}
    assert side["GeneratedBy"]["ModelBundle"]["Name"] == "tiny"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert any(g["Name"] == "model bundle tiny" for g in desc["GeneratedBy"])
    assert (out / "sub-02" / "figures").is_dir() and (out / "sub-02.html").is_file()
    # the batch path (several subjects at once, their files written on two threads) gives the same outputs
    out2 = out.parent / "out2"
    shutil.copytree(out, out2, ignore=shutil.ignore_patterns("*desc-ysem*", "*desc-xt*", "*desc-reconstruction*",
                                                             "logs"))
    assert _run(bids, out2, bundle, "--stages", "embed", "reconstruct", "--batch-size", "2", "--nprocs", "2") == 0
    a = pd.read_csv(anat / "sub-01_ses-M06_space-MNI152NLin2009cAsym_desc-ysem_features.tsv", sep="\t")
    b = pd.read_csv(out2 / anat.relative_to(out) / "sub-01_ses-M06_space-MNI152NLin2009cAsym_desc-ysem_features.tsv",
                    sep="\t")
    np.testing.assert_allclose(a.filter(like="ysem_").to_numpy(), b.filter(like="ysem_").to_numpy(), atol=1e-4)
    files = sorted(p.relative_to(out) for p in out.rglob("sub-*/**/*") if p.is_file())
    assert files == sorted(p.relative_to(out2) for p in out2.rglob("sub-*/**/*") if p.is_file())
    recons = [p for p in files if "desc-reconstruction_T1w.nii.gz" in p.name]
    assert len(recons) == 4
    for rel in recons:
        np.testing.assert_allclose(nib.load(out / rel).get_fdata(), nib.load(out2 / rel).get_fdata(), atol=1e-4)
    assert len([p for p in files if p.suffix == ".svg" and "reconstruction" in p.name]) == 4


def test_manipulate_and_fill_missing(prepared, tmp_path):
    from ldae_bids.analysis.probe import fit_probe, save_probe

    bids, out, bundle = prepared
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 16))
    res = fit_probe(X, X[:, 0] * 3 + 40, np.arange(30), n_boot=0, target="age")
    probe = save_probe(res.probe, tmp_path / "age_probe.json")
    assert _run(bids, out, bundle, "--stages", "manipulate", "fill-missing-sessions", "--probe", probe,
                "--strengths", "-2", "2", "--fill-months", "3", "9", "30", "--session-time", "label",
                "--stage-option", "fill-missing-sessions.evaluate=yes") == 0
    anat = out / "sub-02" / "anat"
    plus = anat / "sub-02_space-MNI152NLin2009cAsym_res-10_desc-manipAgePlus2_T1w.nii.gz"
    minus_diff = anat / "sub-02_space-MNI152NLin2009cAsym_res-10_desc-manipAgeMinus2diff_T1w.nii.gz"
    assert plus.is_file() and minus_diff.is_file()
    side = json.loads(plus.with_name(plus.name.replace(".nii.gz", ".json")).read_text())
    assert side["Strength"] == 2.0 and "ProbeScoreManipulated" in side
    assert side["AnchoredLatentMean"] is False  # the tiny bundle records no latent channel means
    table = pd.read_csv(anat / "sub-02_desc-manipAge_predictions.tsv", sep="\t")
    assert list(table["strength"]) == [-2.0, 0.0, 2.0]
    # synthetic sessions at 3 and 9 months; 30 months would be an extrapolation and is skipped
    syn = sorted(p.name for p in (out / "sub-01").rglob("*desc-synthetic_T1w.nii.gz"))
    assert syn == ["sub-01_ses-M03_space-MNI152NLin2009cAsym_res-10_desc-synthetic_T1w.nii.gz",
                   "sub-01_ses-M09_space-MNI152NLin2009cAsym_res-10_desc-synthetic_T1w.nii.gz"]
    meta = json.loads(next((out / "sub-01").rglob("*ses-M09*desc-synthetic_T1w.json")).read_text())
    assert meta["Synthetic"] is True and meta["SourceSessions"] == ["ses-M06", "ses-M12"]
    assert abs(meta["Fraction"] - 0.5) < 0.05
    ev = pd.read_csv(out / "sub-01" / "anat" / "sub-01_desc-filleval_metrics.tsv", sep="\t")
    assert set(ev["method"]) == {"ldae", "nearest", "blend"} and set(ev["held_out"]) == {"ses-M06"}
    # other strengths: the new counterfactuals are written, those of -2 (no longer asked) are removed
    assert _run(bids, out, bundle, "--stages", "manipulate", "--probe", probe, "--strengths", "-0.25", "2") == 0
    assert (anat / "sub-02_space-MNI152NLin2009cAsym_res-10_desc-manipAgeMinus0p25_T1w.nii.gz").is_file()
    assert plus.is_file() and not minus_diff.exists()
    assert not list(anat.glob("*manipAgeMinus2*"))
    table = pd.read_csv(anat / "sub-02_desc-manipAge_predictions.tsv", sep="\t")
    assert list(table["strength"]) == [-0.25, 0.0, 2.0]
    # strengths as changes of the probe's prediction (years): alpha = change / (sqrt(d) |w|)
    from ldae_bids.analysis.probe import load_probe

    assert _run(bids, out, bundle, "--stages", "manipulate", "--probe", probe, "--strength-unit", "target",
                "--strengths", "5") == 0
    older = anat / "sub-02_space-MNI152NLin2009cAsym_res-10_desc-manipAgeDeltaPlus5_T1w.json"
    side = json.loads(older.read_text())
    assert side["StrengthUnit"] == "target" and side["Strength"] == 5.0
    assert side["Alpha"] == pytest.approx(5.0 / load_probe(probe).gain())
    assert not list(anat.glob("*manipAgePlus2*"))  # the alpha-unit files of the previous run are gone
    table = pd.read_csv(anat / "sub-02_desc-manipAge_predictions.tsv", sep="\t")
    assert list(table["strength"]) == [0.0, 5.0] and set(table["strength_unit"]) == {"target"}
    # a regression probe's output is its prediction: the change is the counterfactual's minus the reconstruction's
    assert table["change_reencoded"].iloc[1] == pytest.approx(
        table["score_reencoded"].iloc[1] - table["score_reencoded"].iloc[0])
    # two probes whose targets name the same files: refused before anything runs
    twin = shutil.copy(probe, tmp_path / "age_probe_copy.json")
    assert _run(bids, out, bundle, "--stages", "manipulate", "--probe", probe, "--probe", twin,
                "--strength-unit", "target", "--strengths", "5") == 64
    assert older.is_file()
    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe:
        proc = subprocess.run([exe, "--format", "json", str(out)], capture_output=True, text=True,
                              env={**os.environ, "NO_COLOR": "1"})
        errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
        assert errors == [], errors


def test_manipulate_without_probe_fails_clearly(prepared, capsys):
    bids, out, bundle = prepared
    assert _run(bids, out, bundle, "--stages", "manipulate") == 66
    assert "no saved probe" in capsys.readouterr().err


def test_manipulate_anchor_option_is_yes_or_no(prepared, tmp_path, capsys):
    from ldae_bids.analysis.probe import fit_probe, save_probe

    bids, out, bundle = prepared
    X = np.random.default_rng(0).normal(size=(30, 16))
    probe = save_probe(fit_probe(X, X[:, 0], np.arange(30), n_boot=0, target="age").probe, tmp_path / "p.json")
    assert _run(bids, out, bundle, "--stages", "manipulate", "--probe", probe,
                "--stage-option", "manipulate.anchor_mean=maybe") == 64
    assert "manipulate.anchor_mean=maybe: give one of yes, no" in capsys.readouterr().err


def test_missing_model_bundle_exits_66(prepared, tmp_path, capsys):
    bids, out, _ = prepared
    assert _run(bids, out, tmp_path / "nope", "--stages", "embed") == 66
    assert "nope" in capsys.readouterr().err


def test_corrupted_bundle_is_refused(prepared, tmp_path, capsys):
    bids, out, bundle = prepared
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert _run(bids, out, bad, "--stages", "embed") == 66
    assert "sha256" in capsys.readouterr().err


def test_embed_refine_latent_option(prepared):
    """embed.refine_latent=N refines the latent before the inversion: x_T changes (y_sem does not), the sidecar
    says so, reconstructions get closer to the input, and a run without the option keeps the default's key."""
    from safetensors.torch import load_file

    bids, out, bundle = prepared
    anat = out / "sub-02" / "anat"
    xt_path = anat / "sub-02_space-MNI152NLin2009cAsym_desc-xt_xt.safetensors"
    y_path = anat / "sub-02_space-MNI152NLin2009cAsym_desc-ysem_features.tsv"
    rec = anat / "sub-02_space-MNI152NLin2009cAsym_res-10_desc-reconstruction_T1w.json"

    def run(*extra):
        assert _run(bids, out, bundle, "--stages", "embed", "reconstruct", "--participant-label", "02",
                    "--ddim-steps", "20", *extra) == 0
        side = json.loads(xt_path.with_suffix(".json").read_text())
        return (load_file(str(xt_path))["x_T"], pd.read_csv(y_path, sep="\t").filter(like="ysem_").to_numpy(),
                side, json.loads(rec.read_text())["Metrics"])

    xt0, y0, side0, m0 = run()
    assert side0["LatentRefinementSteps"] == 0 and "refine_latent" not in side0["GeneratedBy"]["Parameters"]
    xt1, y1, side1, m1 = run("--stage-option", "embed.refine_latent=10")
    assert side1["LatentRefinementSteps"] == 10 and side1["GeneratedBy"]["Parameters"]["refine_latent"] == 10
    assert not np.allclose(xt0.numpy(), xt1.numpy(), atol=1e-3)
    np.testing.assert_allclose(y0, y1, atol=1e-5)
    assert m1["mse"] < m0["mse"]  # the refined latent decodes closer to the input
    stamp = xt_path.stat().st_mtime_ns
    assert _run(bids, out, bundle, "--stages", "embed", "--participant-label", "02", "--ddim-steps", "20",
                "--stage-option", "embed.refine_latent=10") == 0
    assert xt_path.stat().st_mtime_ns == stamp  # the same option again: up to date


def test_precision_is_recorded_and_enters_the_resume_key(prepared):
    """--precision reaches the model (bf16 autocast on the CPU too), the sidecars say which was used, and a
    run in the other precision recomputes the model stages instead of skipping them."""
    bids, out, bundle = prepared
    anat = out / "sub-02" / "anat"
    tsv = anat / "sub-02_space-MNI152NLin2009cAsym_desc-ysem_features.tsv"
    side = tsv.with_suffix(".json")

    def codes():
        return pd.read_csv(tsv, sep="\t").filter(like="ysem_").to_numpy(float)[0]

    assert _run(bids, out, bundle, "--stages", "embed", "--participant-label", "02", "--precision", "fp32") == 0
    assert json.loads(side.read_text())["GeneratedBy"]["Precision"] == "fp32"
    y32, stamp = codes(), tsv.stat().st_mtime_ns
    assert _run(bids, out, bundle, "--stages", "embed", "--participant-label", "02", "--precision", "fp32") == 0
    assert tsv.stat().st_mtime_ns == stamp  # same settings: skipped
    assert _run(bids, out, bundle, "--stages", "embed", "--participant-label", "02", "--precision", "bf16") == 0
    assert json.loads(side.read_text())["GeneratedBy"]["Precision"] == "bf16" and tsv.stat().st_mtime_ns != stamp
    y16 = codes()
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert 0 < rel < 0.05, rel  # bf16 arithmetic really ran, and gives nearly the same code
    # on the CPU, bf16 runs the networks with channels-last weights, fp32 with contiguous ones
    logs = sorted((out / "logs").glob("ldae-bids-*.log"), key=lambda f: f.stat().st_mtime_ns)
    assert "weights channels-last" in logs[-1].read_text()
    assert any("weights contiguous" in f.read_text() for f in logs[:-1])


def test_precision_auto_resolves_per_device(monkeypatch):
    import torch

    from ldae_bids import device as dev
    from ldae_bids.errors import UsageError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dev.resolve_precision(cuda, "auto") == "bf16" and dev.resolve_precision(cuda, "fp32") == "fp32"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.resolve_precision(cpu, "auto") == "fp32" and dev.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.resolve_precision(cpu, "auto") == "bf16"
    with pytest.raises(UsageError, match="precision"):
        dev.resolve_precision(cpu, "fp16")
    # weight layout: channels-last only where measured faster (CPU under bf16)
    assert dev.resolve_memory_format(cpu, "auto") == "channels_last"
    assert dev.resolve_memory_format(cpu, "fp32") == "contiguous"
    assert dev.resolve_memory_format(cuda, "bf16") == "contiguous"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.resolve_memory_format(cpu, "auto") == "contiguous"


def test_derivatives_input_is_resampled_and_precision_stays_out_of_its_key(bids_factory, tmp_path, tiny_bundle):
    """--derivatives: sMRIPrep-style template-space images are put on the model grid without running a network,
    so --precision neither enters the preprocess stage's resume key nor its sidecar."""
    from ldae_bids.preprocessing import Grid

    bundle, grid = tiny_bundle
    bids = bids_factory({"01": None})
    deriv = tmp_path / "smriprep" / "sub-01" / "anat"
    deriv.mkdir(parents=True)
    mni = Grid.compact()
    img, mask = _blob(mni.shape, 3)
    nib.save(nib.Nifti1Image(img * 800, mni.affine), deriv / "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), mni.affine),
             deriv / "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
    out = tmp_path / "out"

    def run(precision):
        return main([str(bids), str(out), "participant", "--model", str(bundle), "--skip-bids-validation",
                     "--stages", "preprocess", "--derivatives", str(tmp_path / "smriprep"), "--precision", precision,
                     "-w", str(tmp_path / "w")])

    assert run("fp32") == 0
    image = out / "sub-01" / "anat" / f"sub-01_space-MNI152NLin2009cAsym_res-{grid.res_label}_desc-preproc_T1w.nii.gz"
    data = np.asarray(nib.load(image).dataobj)
    assert data.shape == tuple(grid.shape) and data.max() == pytest.approx(1.0) and data.min() == 0.0
    side = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
    assert side["Parameters"]["input"] == "derivatives" and "Precision" not in json.dumps(side)
    stamp = image.stat().st_mtime_ns
    assert run("bf16") == 0
    assert image.stat().st_mtime_ns == stamp  # another --precision: nothing to redo
