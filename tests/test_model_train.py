"""Model training: resume from a checkpoint, and DDP with two gloo processes (tiny preset, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Six synthetic 'model-ready' subjects on a 16^3 grid (a derivatives-like folder)."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("deriv")
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij")
    for i in range(6):
        r = 0.6 + 0.2 * rng.random()
        d = zz**2 + yy**2 + xx**2
        img = np.where(d < r**2, 0.5 + 0.3 * np.cos(5 * d + rng.random()), 0).astype(np.float32)
        anat = root / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 2, 2, 1])), anat / f"sub-{i:02d}_desc-preproc_T1w.nii.gz")
    return root


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def run_cli(args: list[str]):
    from ldae_bids.cli.train import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_training_exports_a_bundle_and_resumes(synth, tmp_path):
    from ldae_bids.model.bundle import load_bundle

    out = tmp_path / "train"
    base = [str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "4",
            "--ae-full-volume-steps", "1", "--checkpoint-every", "2", "--val-every", "100"]
    run_cli(base + ["--ldae-steps", "3"])
    state = json.loads((out / "state.json").read_text())
    assert state["stage"] == "done" and state["ae_step"] == 5 and state["ldae_step"] == 3
    phases = {r["step"]: r["full_volume"] for r in records(out) if r.get("stage") == "ae" and "full_volume" in r}
    assert phases == {1: False, 2: False, 3: False, 4: False, 5: True}  # 4 crop steps, then 1 whole-volume step
    split = json.loads((out / "split.json").read_text())
    assert len(split["validation"]) == 1 and not set(split["train"]) & set(split["validation"])
    mb = load_bundle(out / "bundle")
    assert mb.metadata["training"]["split"]["validation"] == split["validation"]
    assert mb.metadata["latent_scale"] == pytest.approx(state["latent_scale"])
    from safetensors.torch import load_file

    train_latents = load_file(str(out / "latents.safetensors"))["train"]  # scaled, the training subjects only
    assert mb.config.latent_mean == pytest.approx(train_latents.mean(dim=(0, 2, 3, 4)).tolist(), abs=1e-6)
    assert mb.pipeline.latent_mean is not None and mb.metadata["latent_mean"] == list(mb.config.latent_mean)
    assert mb.metadata["intensity"]["normalisation"] == "percentile"
    assert mb.metadata["intensity"]["bias_correction"] is None
    assert (out / "report" / "loss_curves.png").exists()

    # more stage-2 steps: continues from step 3, the autoencoder is not retrained. Records of steps that ran
    # after the last checkpoint of an interrupted run (here two made-up ones and a line cut short) are dropped
    # on resume: those steps run again and are logged once.
    n_before = len(records(out))
    with (out / "logs" / "train.jsonl").open("a") as fh:
        fh.write('{"stage": "ldae", "step": 4, "loss": 99.0}\n{"stage": "ldae", "step": 5, "loss": 99.0}\n{"sta')
    run_cli(base + ["--ldae-steps", "6"])
    new = records(out)[n_before:]
    assert new and all(r["stage"] == "ldae" for r in new)
    assert [r["step"] for r in new if "loss" in r] == [4, 5, 6]
    assert 99.0 not in [r.get("loss") for r in new]
    assert json.loads((out / "state.json").read_text())["ldae_step"] == 6

    # more stage-1 steps once stage 2 has begun: refused (stage 2's cached latents came from these weights)
    n_before = len(records(out))
    run_cli([str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "8",
             "--ae-full-volume-steps", "1", "--checkpoint-every", "2", "--val-every", "100", "--ldae-steps", "7"])
    state = json.loads((out / "state.json").read_text())
    assert state["ae_step"] == 5 and state["ldae_step"] == 7
    assert all(r["stage"] == "ldae" for r in records(out)[n_before:])


def test_checkpoint_weights_reload_exactly(synth, tmp_path):
    from ldae_bids.model import checkpoint as ckpt
    from ldae_bids.model.config import preset
    from ldae_bids.model.networks import build_autoencoder

    out = tmp_path / "t"
    run_cli([str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "2",
             "--ae-full-volume-steps", "0", "--ldae-steps", "1", "--val-every", "100"])
    cfg, _ = preset("tiny")
    a, b = build_autoencoder(cfg.autoencoder), build_autoencoder(cfg.autoencoder)
    ckpt.load_modules(out, "ae", {"autoencoder": a})
    ckpt.load_modules(out, "ae", {"autoencoder": b})
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    opt = torch.optim.Adam(a.parameters())
    ckpt.load_optimizers(out, "ae", {"autoencoder": opt})
    assert opt.state_dict()["state"]  # Adam moments came back (weights_only load)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(synth, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ldae_bids.cli.train", str(synth), "-o", str(out),
           "--preset", "tiny", "--device", "cpu", "--ae-steps", "3", "--ae-full-volume-steps", "1",
           "--ldae-steps", "3", "--checkpoint-every", "2", "--val-every", "100",
           # a wall-clock budget ends the decoder refinement: the ranks must agree on the step it ends at
           "--decoder-steps", "100000", "--decoder-max-minutes", "0.002"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert state["ae_step"] == 4 and state["ldae_step"] == 3 and state["stage"] == "done"
    assert 0 < state["dec_step"] < 100000
    assert (out / "bundle" / "model.safetensors").exists()
    losses = [r for r in records(out) if "loss" in r and r["stage"] != "decoder"]
    assert len(losses) == 7  # one logger (rank 0) only


def test_init_from_bundle_fine_tunes(synth, tmp_path):
    """--init-from starts a new run from a bundle's weights; its training subjects stay in training."""
    from safetensors.torch import load_file

    from ldae_bids.model.bundle import load_bundle

    first = tmp_path / "first"
    common = ["--preset", "tiny", "--threads", "1", "--checkpoint-every", "2", "--val-every", "100"]
    run_cli([str(synth), "-o", str(first), *common, "--ae-steps", "3", "--ae-full-volume-steps", "1",
             "--ldae-steps", "2", "--val-fraction", "0.3"])
    old = load_bundle(first / "bundle")
    # stage 1 gets no steps: the new bundle's autoencoder must be exactly the old one
    second = tmp_path / "second"
    run_cli([str(synth), "-o", str(second), *common, "--ae-steps", "0", "--ae-patch-size", "0",
             "--ldae-steps", "2", "--val-fraction", "0.5", "--seed", "7", "--init-from", str(first / "bundle")])
    new = load_bundle(second / "bundle")
    a, b = load_file(str(first / "bundle" / "model.safetensors")), load_file(str(second / "bundle" / "model.safetensors"))
    ae_keys = [k for k in a if k.startswith("autoencoder.")]
    assert ae_keys and all(torch.equal(a[k], b[k]) for k in ae_keys)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("denoiser."))  # stage 2 did train
    split = new.metadata["training"]["split"]
    assert split["train"] == old.metadata["training"]["split"]["train"]  # other seed and fraction, same sides
    assert split["validation"] == old.metadata["training"]["split"]["validation"]
    assert new.metadata["training"]["init_from"]["content_hash"] == old.content_hash
    assert new.metadata["training"]["init_from"]["carried"] == ["autoencoder", "semantic_encoder", "denoiser"]
    assert new.metadata["training"]["init_from"]["decoder_steps"] == old.metadata["training"]["decoder_steps"]
    assert f"started from: {old.name} (content hash {old.content_hash[:16]}" in (second / "bundle" / "README.md").read_text()

    # resumed without --init-from (more stage-2 steps): the checkpointed starting autoencoder is kept, not a
    # freshly initialised one (the cached latents came from the checkpointed weights)
    run_cli([str(synth), "-o", str(second), *common, "--ae-steps", "0", "--ae-patch-size", "0",
             "--ldae-steps", "3", "--val-fraction", "0.5", "--seed", "7"])
    c = load_file(str(second / "bundle" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in ae_keys)
    assert json.loads((second / "state.json").read_text())["ldae_step"] == 3

    # no steps at all: the bundle is re-exported as it was (e.g. under another name or licence), y_sem's
    # standardisation included (carried, not recalibrated), also in another precision than it was trained in
    third = tmp_path / "third"
    run_cli([str(synth), "-o", str(third), *common, "--ae-steps", "0", "--ae-patch-size", "0", "--ldae-steps", "0",
             "--init-from", str(first / "bundle"), "--bundle-name", "renamed", "--licence", "CC0-1.0",
             "--precision", "fp32"])
    same = load_bundle(third / "bundle")
    d = load_file(str(third / "bundle" / "model.safetensors"))
    assert same.name == "renamed" and same.metadata["licence"] == "CC0-1.0"
    assert any(".out_norm." in k for k in a) and all(torch.equal(a[k], d[k]) for k in a)
    # latents encoded in fp32 in both runs (the re-export's autoencoder is the bundle's float16-rounded weights)
    assert same.metadata["latent_scale"] == pytest.approx(old.metadata["latent_scale"], rel=2e-3)


def test_init_from_bundle_with_other_semantic_encoder_carries_the_rest(synth, tmp_path):
    """A bundle made with the older mean-pooling semantic encoder: --init-from carries its autoencoder
    and denoiser exactly, starts the preset's (flatten) semantic encoder fresh, and records that."""
    import dataclasses

    from safetensors.torch import load_file

    from ldae_bids.model.bundle import load_bundle, save_bundle
    from ldae_bids.model.pipeline import LdaePipeline

    first = tmp_path / "first"
    common = ["--preset", "tiny", "--threads", "1", "--checkpoint-every", "2", "--val-every", "100"]
    run_cli([str(synth), "-o", str(first), *common, "--ae-steps", "2", "--ae-full-volume-steps", "1",
             "--ldae-steps", "1"])
    flat = load_bundle(first / "bundle")
    assert flat.config.semantic_encoder.pooling == "flatten"
    mean_cfg = dataclasses.replace(flat.config, semantic_encoder=dataclasses.replace(
        flat.config.semantic_encoder, pooling="mean", grid=None))
    old_pipe = LdaePipeline(mean_cfg, {"autoencoder": flat.pipeline.autoencoder,
                                       "semantic_encoder": LdaePipeline(mean_cfg).semantic_encoder,
                                       "denoiser": flat.pipeline.denoiser})
    save_bundle(tmp_path / "old", old_pipe, flat.metadata)
    second = tmp_path / "second"
    run_cli([str(synth), "-o", str(second), *common, "--ae-steps", "0", "--ae-patch-size", "0",
             "--ae-full-volume-steps", "0", "--ldae-steps", "1", "--init-from", str(tmp_path / "old")])
    new = load_bundle(second / "bundle")
    a, b = load_file(str(tmp_path / "old" / "model.safetensors")), load_file(str(second / "bundle" / "model.safetensors"))
    keys = [k for k in a if k.startswith("autoencoder.")]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    keys = [k for k in a if k.startswith("denoiser.") and a[k].is_floating_point()]
    # one warm-up step (lr 3e-6) away from the carried weights; a fresh network would differ by ~0.1
    assert keys and all(torch.allclose(a[k].float(), b[k].float(), atol=2e-3) for k in keys)
    assert new.config.semantic_encoder.pooling == "flatten"
    assert any(k.startswith("semantic_encoder.reduce.") for k in b)
    assert not any(k.startswith("semantic_encoder.reduce.") for k in a)
    assert new.metadata["training"]["init_from"]["carried"] == ["autoencoder", "denoiser"]


def test_init_from_other_preset_is_refused(synth, tmp_path):
    from ldae_bids.cli.train import app

    first = tmp_path / "first"
    run_cli([str(synth), "-o", str(first), "--preset", "tiny", "--threads", "1", "--ae-steps", "1",
             "--ae-full-volume-steps", "1", "--ldae-steps", "1", "--val-every", "100"])
    result = CliRunner().invoke(app, [str(synth), "-o", str(tmp_path / "x"), "--preset", "compact",
                                      "--init-from", str(first / "bundle")])
    assert result.exit_code != 0
    assert "bundle networks differ" in result.output and str(first / "bundle") in result.output
    assert not (tmp_path / "x" / "split.json").exists()


def test_init_from_other_intensity_needs_adapt_intensity(synth, tmp_path):
    """A bundle trained without N4 is refused for an N4 run unless --adapt-intensity says so; the adapted bundle
    records the new spec (which the preprocess stage then applies) and, under init_from, the old one."""
    from ldae_bids.cli.train import app
    from ldae_bids.model.bundle import load_bundle

    first = tmp_path / "first"
    common = ["--preset", "tiny", "--threads", "1", "--val-every", "100"]
    run_cli([str(synth), "-o", str(first), *common, "--ae-steps", "1", "--ae-full-volume-steps", "1",
             "--ldae-steps", "1"])
    adapt = [str(synth), *common, "--ae-steps", "0", "--ae-patch-size", "0", "--ldae-steps", "1",
             "--init-from", str(first / "bundle"), "--bias-correction", "n4"]
    refused = CliRunner().invoke(app, [*adapt, "-o", str(tmp_path / "x")])
    assert refused.exit_code != 0
    assert "bias correction None" in refused.output and "--adapt-intensity" in refused.output
    assert not (tmp_path / "x" / "split.json").exists()
    lone = CliRunner().invoke(app, [str(synth), "-o", str(tmp_path / "y"), *common, "--adapt-intensity"])
    assert lone.exit_code == 64 and "--adapt-intensity needs --init-from" in lone.output

    run_cli([*adapt, "-o", str(tmp_path / "second"), "--adapt-intensity"])
    new = load_bundle(tmp_path / "second" / "bundle")
    assert new.metadata["intensity"]["bias_correction"] == "n4"
    record = new.metadata["training"]["init_from"]
    assert record["intensity"]["bias_correction"] is None
    assert record["content_hash"] == load_bundle(first / "bundle").content_hash


def test_time_budget_end_checkpoints_the_autoencoder_that_stage_2_sees(synth, tmp_path):
    """A stage-1 time budget that ends training between checkpoints must still checkpoint: the cached
    latents (stage 2's data) and the exported bundle have to come from the same autoencoder weights."""
    from safetensors.torch import load_file

    from ldae_bids.model.bundle import load_bundle

    out = tmp_path / "train"
    run_cli([str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-patch-size", "0",
             "--ae-steps", "1000", "--ae-max-minutes", "0.0001", "--checkpoint-every", "500", "--val-every", "1000",
             "--ldae-steps", "1", "--precision", "fp32"])  # latents cached in fp32, compared with an fp32 encode
    state = json.loads((out / "state.json").read_text())
    assert 0 < state["ae_step"] == state["ae_end"] < 1000
    mb = load_bundle(out / "bundle")
    saved = load_file(str(out / "latents.safetensors"))
    split = json.loads((out / "split.json").read_text())
    import nibabel as nib

    first = split["images"][split["train"][0]][0]
    x = torch.from_numpy(np.asarray(nib.load(first).dataobj, dtype=np.float32))[None, None]
    # the bundle holds float16 weights: equal to that rounding, far closer than another image's latent
    z = mb.pipeline.encode_latent(x)
    err = float((z - saved["train"][:1]).norm() / saved["train"][:1].norm())
    other = float((saved["train"][1:2] - saved["train"][:1]).norm() / saved["train"][:1].norm())
    assert err < 5e-3 and err < other / 10, (err, other)


def test_stage_2_stopped_by_its_time_budget_continues_with_a_larger_one(synth, tmp_path):
    """A stage-2 run that its --ldae-max-minutes stopped goes on, from its checkpoint, when called again with a
    larger budget (the budget counts stage-2 time over all calls: the same budget again adds no step)."""
    out = tmp_path / "train"
    common = [str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "1",
              "--ae-full-volume-steps", "0", "--checkpoint-every", "1000", "--val-every", "1000", "--ldae-steps", "1000"]
    run_cli(common + ["--ldae-max-minutes", "0.0001"])
    stopped = json.loads((out / "state.json").read_text())["ldae_step"]
    assert 0 < stopped < 1000
    run_cli(common + ["--ldae-max-minutes", "0.0001"])
    assert json.loads((out / "state.json").read_text())["ldae_step"] == stopped
    n_before = len(records(out))
    common[-1] = str(stopped + 2)
    run_cli(common + ["--ldae-max-minutes", "60"])
    assert json.loads((out / "state.json").read_text())["ldae_step"] == stopped + 2
    steps = [r["step"] for r in records(out)[n_before:] if "loss" in r]
    assert steps and min(steps) > stopped and max(steps) == stopped + 2


def test_loss_curves_show_the_y_sem_gain(tmp_path, monkeypatch):
    """The training report plots the validation y_sem gain next to the losses (a stage-2-only folder too)."""
    import matplotlib.pyplot as plt

    from ldae_bids.model.report import plot_losses

    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"stage": "ldae", "step": s, "loss": 0.2 / s ** 0.1} for s in range(10, 410, 10)]
    rows += [{"stage": "ldae", "step": s, "val_recon_ssim": 0.8, "val_sample_ssim": 0.5, "val_ysem_gain": g}
             for s, g in ((200, 0.002), (400, 0.004))]
    (logs / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        seen["gain"] = [list(line.get_ydata()) for line in fig.axes[3].get_lines()]
        seen["texts"] = [t.get_text() for t in fig.axes[0].texts]
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    out = plot_losses(tmp_path, tmp_path / "curves.png")
    assert out.stat().st_size > 0
    assert [0.002, 0.004] in seen["gain"]
    assert seen["texts"] and "no steps" in seen["texts"][0]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_under_cpu_bf16_autocast(synth, tmp_path, monkeypatch, caplog, precision):
    """Training's mixed-precision path (bf16 autocast on CUDA) through --precision bf16 on the CPU: both
    stages, validation and export run, every convolution PyTorch runs (training steps and, under autocast,
    validation) is in bf16 (fp32 with --precision fp32), and the bundle loads."""
    from ldae_bids.model import loop
    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.model.pipeline import LdaePipeline

    from ldae_bids.model import stage2

    monkeypatch.setattr(loop, "_PRECISION", None)  # the run sets it; restored after the test
    dtypes, validation, latent_dtypes = set(), [], set()
    real = torch.nn.Conv3d._conv_forward
    real_autocast = LdaePipeline.autocast
    real_encode_all = stage2.encode_all
    caching = []

    layouts = set()  # weight layouts of the convolutions in training steps (gradients on, a 3x3x3 kernel or more)

    def spy(self, x, weight, bias):
        out = real(self, x, weight, bias)
        (latent_dtypes if caching else dtypes).add(out.dtype)
        if torch.is_grad_enabled() and weight.shape[1] > 1 and weight.shape[2:].numel() > 1:
            layouts.add("channels_last" if weight.is_contiguous(memory_format=torch.channels_last_3d) else "contiguous")
        return out

    def encode_all(*args, **kwargs):
        caching.append(True)
        try:
            return real_encode_all(*args, **kwargs)
        finally:
            caching.pop()

    monkeypatch.setattr(stage2, "encode_all", encode_all)

    def pipeline_autocast(self):
        ctx = real_autocast(self)
        validation.append(type(ctx).__name__)
        return ctx

    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", spy)
    monkeypatch.setattr(LdaePipeline, "autocast", pipeline_autocast)
    out = tmp_path / "bf16"
    with caplog.at_level("INFO", logger="ldae_bids"):
        run_cli([str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "2",
                 "--ae-full-volume-steps", "1", "--ldae-steps", "2", "--checkpoint-every", "2", "--val-every", "2",
                 "--precision", precision])
    assert f"precision: {precision} on cpu (--precision {precision})" in caplog.text
    assert dtypes == {getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[precision])}
    assert latent_dtypes == {torch.float32}  # stage 2's cached latents: float32 whatever the precision
    # on the CPU the autoencoder trains with channels-last weights (both precisions), the denoiser contiguous
    assert layouts == {"channels_last", "contiguous"}
    assert "autoencoder: channels-last weights" in caplog.text
    # the validation pipeline follows the run's precision (autocast in bf16, none in fp32)
    assert validation and set(validation) == {"autocast" if precision == "bf16" else "nullcontext"}
    mb = load_bundle(out / "bundle")
    vals = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert any("val_recon_ssim" in r and r["stage"] == "ldae" for r in vals)
    assert mb.metadata["training"]["ldae_steps"] == 2


def test_decoder_refinement_keeps_the_encoder_and_stage_2(synth, tmp_path):
    """--decoder-steps added to a finished run trains the decoder only: encoder, latents and stage 2 are
    untouched, the bundle carries the refined decoder, and a further call resumes the phase."""
    from safetensors.torch import load_file

    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.model.stage1 import DECODER_PREFIXES

    out = tmp_path / "dec"
    base = [str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "3",
            "--ae-full-volume-steps", "1", "--ldae-steps", "2", "--checkpoint-every", "2", "--val-every", "100"]
    run_cli(base)
    before = load_bundle(out / "bundle")
    latents = load_file(str(out / "latents.safetensors"))["train"]
    run_cli(base + ["--decoder-steps", "3", "--decoder-batch-size", "2", "--decoder-lr", "1e-2"])
    state = json.loads((out / "state.json").read_text())
    assert state["dec_step"] == 3 and state["ldae_step"] == 2 and state["stage"] == "done"
    new = [r for r in records(out) if r["stage"] == "decoder"]
    assert [r["step"] for r in new if "loss" in r] == [1, 2, 3] and "ssim_loss" in new[0]
    assert any("val_ssim" in r for r in new)
    after = load_bundle(out / "bundle")
    old_ae, new_ae = before.pipeline.autoencoder.state_dict(), after.pipeline.autoencoder.state_dict()
    changed = {k for k in old_ae if not torch.equal(old_ae[k], new_ae[k])}
    assert changed and all(k.startswith(DECODER_PREFIXES) for k in changed)
    for net in ("semantic_encoder", "denoiser"):
        a, b = getattr(before.pipeline, net).state_dict(), getattr(after.pipeline, net).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(str(out / "latents.safetensors"))["train"], latents)
    assert after.metadata["latent_scale"] == before.metadata["latent_scale"]
    assert after.metadata["training"]["decoder_steps"] == 3
    assert "decoder refinement 3" in (out / "bundle" / "README.md").read_text()
    assert after.content_hash != before.content_hash

    # more decoder steps: resumes at 3 (stage 1 and stage 2 not rerun)
    n = len(records(out))
    run_cli(base + ["--decoder-steps", "5", "--decoder-batch-size", "2", "--decoder-lr", "1e-2"])
    assert [r["step"] for r in records(out)[n:] if "loss" in r] == [4, 5]
    assert json.loads((out / "state.json").read_text())["dec_step"] == 5


def test_decoder_options_are_checked(synth, tmp_path):
    from ldae_bids.cli.train import app

    for args in (["--decoder-steps", "-1"], ["--decoder-batch-size", "0"], ["--decoder-ssim-weight", "-0.5"]):
        result = CliRunner().invoke(app, [str(synth), "-o", str(tmp_path / "x"), "--preset", "tiny"] + args)
        assert result.exit_code == 64, result.output
        assert "--decoder" in result.output


def test_export_only_exports_the_folder_given(synth, tmp_path):
    """--export-only on a copied training folder exports the copy (settings.json records the original's path)."""
    import shutil

    from ldae_bids.model.bundle import load_bundle

    first = tmp_path / "first"
    run_cli([str(synth), "-o", str(first), "--preset", "tiny", "--threads", "1", "--ae-steps", "2",
             "--ae-full-volume-steps", "0", "--ldae-steps", "1", "--val-every", "100"])
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    # a folder of an earlier version has no latent_mean in its state: the export takes it from the cached latents
    state = json.loads((copy / "state.json").read_text())
    mean = state.pop("latent_mean")
    (copy / "state.json").write_text(json.dumps(state))
    run_cli([str(synth), "-o", str(copy), "--preset", "tiny", "--export-only", "--bundle", str(tmp_path / "b")])
    mb = load_bundle(tmp_path / "b")
    assert mb.metadata["training"]["ldae_steps"] == 1
    assert mb.config.latent_mean == pytest.approx(mean, abs=1e-6)


def test_learning_rate_schedules():
    from ldae_bids.model.loop import lr_at

    # warm-up, then constant
    assert lr_at(1.0, 0, 1000, warmup=100) == pytest.approx(0.01)
    assert lr_at(1.0, 99, 1000) == lr_at(1.0, 999, 1000) == 1.0
    # cosine: full rate after the warm-up, half way at mid-stage, the floor at the planned end (and after it)
    assert lr_at(1.0, 500, 1000, "cosine") == pytest.approx(0.5)
    assert lr_at(1.0, 1000, 1000, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_at(1.0, 5000, 1000, "cosine", 0.1) == pytest.approx(0.1)
    rates = [lr_at(1.0, s, 1000, "cosine") for s in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1.0, 1, 10, "linear")


def test_cosine_schedule_is_saved_and_logged(synth, tmp_path):
    out = tmp_path / "cos"
    base = [str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-steps", "2",
            "--ae-full-volume-steps", "0", "--val-every", "100", "--checkpoint-every", "5",
            "--lr-schedule", "cosine", "--lr-min-fraction", "0.2", "--ldae-lr", "1e-3"]
    run_cli(base + ["--ldae-steps", "10"])
    lrs = {r["step"]: r["lr"] for r in records(out) if r.get("stage") == "ldae" and "lr" in r}
    from ldae_bids.model.loop import lr_at

    # the step-10 record holds the rate used by the last step (index 9)
    assert lrs[10] == pytest.approx(lr_at(1e-3, 9, 10, "cosine", 0.2))
    from ldae_bids.model.train import load_settings

    saved = load_settings(out).train
    assert (saved.lr_schedule, saved.lr_min_fraction, saved.ldae_lr) == ("cosine", 0.2, 1e-3)
    from ldae_bids.cli.train import app

    result = CliRunner().invoke(app, base + ["--ldae-steps", "10", "--lr-schedule", "step"])
    assert result.exit_code == 64 and "--lr-schedule must be constant or cosine" in result.output


def test_over_budget_single_process():
    import time

    from ldae_bids.model.distributed import DistInfo
    from ldae_bids.model.loop import over_budget

    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    now = time.time()
    assert not over_budget(one, 0.0, now, None)  # no budget
    assert not over_budget(one, 0.0, now, 1.0)
    assert over_budget(one, 120.0, now, 1.0)  # two minutes spent by earlier calls on the folder


def test_step_plan_fits_the_budget_and_is_kept_on_resume(monkeypatch):
    from ldae_bids.model import loop
    from ldae_bids.model.distributed import DistInfo

    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    state: dict = {}
    plan = loop.StepPlan("ldae", state, minutes=1.0, enabled=True, limit=100_000, step=0)
    assert plan.pending and plan.total == 100_000
    total = None
    for step in range(1, 26):  # 0.1 s per step; 2.5 s of the 60 s budget spent after 25 steps
        clock["t"] += 0.1
        total = plan.observe(one, step, spent_seconds=clock["t"])
    # 0.95 x 57.5 s left at 0.1 s per step: 546 more steps after step 25
    assert total == 25 + int(0.95 * 57.5 / 0.1) and not plan.pending
    assert state["ldae_plan"] == {"minutes": 1.0, "steps": total, "sec_per_step": pytest.approx(0.1)}
    # a resumed call with the same budget keeps the plan (the same learning-rate curve); another budget plans anew;
    # the steps asked cap the plan; no budget or no flag: the steps asked
    again = loop.StepPlan("ldae", state, 1.0, True, 100_000, step=300)
    assert not again.pending and again.total == total
    assert loop.StepPlan("ldae", state, 2.0, True, 100_000, step=300).pending
    assert loop.StepPlan("ldae", state, 1.0, True, 400, step=300).total == 400
    assert loop.StepPlan("ldae", {}, None, True, 50, step=0).total == 50
    assert not loop.StepPlan("ldae", {}, 1.0, False, 50, step=0).pending


def test_steps_from_budget_plans_the_cosine_to_end_with_the_budget(synth, tmp_path):
    from ldae_bids.model.loop import lr_at

    out = tmp_path / "plan"
    run_cli([str(synth), "-o", str(out), "--preset", "tiny", "--threads", "1", "--ae-patch-size", "0",
             "--ae-steps", "100000", "--ae-max-minutes", "0.08", "--ae-ssim-weight", "0.5", "--ae-lr", "1e-3",
             "--ldae-steps", "100000", "--ldae-max-minutes", "0.08", "--ldae-lr", "1e-3",
             "--lr-schedule", "cosine", "--lr-min-fraction", "0.05", "--steps-from-budget",
             "--val-every", "100000", "--checkpoint-every", "100000"])
    state = json.loads((out / "state.json").read_text())
    for name, stage, last in (("ae", "ae", state["ae_step"]), ("ldae", "ldae", state["ldae_step"])):
        plan = state[f"{name}_plan"]
        assert plan["minutes"] == 0.08 and 25 < plan["steps"] < 100_000
        assert last <= plan["steps"]  # the plan ends the phase (or the budget, when later steps ran slower)
        lrs = {r["step"]: r["lr"] for r in records(out) if r.get("stage") == stage and "lr" in r}
        # once planned, every rate follows the cosine to the planned end (the record of step s holds step s-1's)
        for s, rate in lrs.items():
            if s > 25:
                assert rate == pytest.approx(lr_at(1e-3, s - 1, plan["steps"], "cosine", 0.05))
    assert [r for r in records(out) if r.get("stage") == "ae" and "ssim" in r]  # the SSIM term was on
    from ldae_bids.model.bundle import load_bundle

    training = load_bundle(out / "bundle").metadata["training"]
    assert training["step_plans"]["ldae"] == state["ldae_plan"]
    assert training["ldae_steps_planned"] == state["ldae_plan"]["steps"]


def test_autoencoder_ssim_loss_is_the_reported_ssim():
    from ldae_bids.metrics import ssim
    from ldae_bids.model.losses import AutoencoderLoss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 12, 12, 12, generator=g)
    recon = (x + 0.2 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    mu, sigma = torch.zeros(2, 2, 3, 3, 3), torch.ones(2, 2, 3, 3, 3)
    total, parts = AutoencoderLoss(kl_weight=0.0, ssim_weight=0.5)(recon, x, mu, sigma)
    clamped = recon.detach().clamp(0, 1).numpy()
    reported = np.mean([ssim(clamped[i, 0], x.numpy()[i, 0]) for i in range(2)])
    assert parts["ssim"] == pytest.approx(1.0 - float(reported), abs=1e-5)
    assert parts["l1"] > 0 and float(total.detach()) == pytest.approx(parts["l1"] + 0.5 * parts["ssim"], rel=1e-5)
    total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_ae_options_are_checked(synth, tmp_path):
    from ldae_bids.cli.train import app

    for args, message in ((["--ae-lr", "0"], "--ae-lr must be positive"),
                          (["--ae-ssim-weight", "-1"], "--ae-ssim-weight must be 0 or more")):
        result = CliRunner().invoke(app, [str(synth), "-o", str(tmp_path / "x"), "--preset", "tiny", *args])
        assert result.exit_code == 64 and message in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_volumes_are_placed_on_the_gpu(synth):
    from ldae_bids.model import data as mdata

    store = mdata.VolumeStore(mdata.find_images([synth]), (16, 16, 16))
    assert not mdata.place([store], "cpu")
    assert mdata.place([store, None], "cuda")
    batch = store.batch([0, 1])
    assert batch.is_cuda and batch.dtype == torch.float32 and batch.shape == (2, 1, 16, 16, 16)


def test_autoencoder_layout_is_channels_last_on_the_cpu_and_contiguous_under_ddp_or_cuda():
    """Channels-last autoencoder weights for CPU training (faster there in fp32 and bf16), contiguous under DDP
    (ranks must not all-reduce gradients of mismatched layouts) and on CUDA (not measured yet)."""
    from types import SimpleNamespace

    from ldae_bids.model import loop
    from ldae_bids.model.config import preset
    from ldae_bids.model.networks import build_autoencoder

    cfg, _ = preset("tiny")
    ae = build_autoencoder(cfg.autoencoder)
    cpu = torch.device("cpu")
    big = [p for p in ae.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1]
    assert loop.lay_out_autoencoder(ae, SimpleNamespace(enabled=False, device=cpu)) == "channels_last"
    assert big and all(not p.is_contiguous() for p in big)
    assert loop.lay_out_autoencoder(ae, SimpleNamespace(enabled=True, device=cpu)) == "contiguous"
    assert all(p.is_contiguous() for p in ae.parameters())
    assert loop.lay_out_autoencoder(ae, SimpleNamespace(enabled=False, device=torch.device("cuda"))) == "contiguous"
