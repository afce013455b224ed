"""benchmarks/bench_reconstruction.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json

import pytest


def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_reconstruction")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import split_bundle_and_images

    bundle, _, data = split_bundle_and_images(tmp_path_factory.mktemp("recon"))
    return bundle, data


def _run(setup, out, batch, *extra):
    bundle, data = setup
    assert _bench().main(["--bundle", str(bundle), "--data", str(data), "--steps", "2,3", "--random-steps", "2",
                          "--batch-size", str(batch), "--threads", "1", "--device", "cpu", "--out", str(out),
                          *extra]) == 0
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
    assert len(one["ysem_use"]["gain"]) == 5 and "Does the denoiser use y_sem?" in md


def test_a_bundle_with_latent_channel_means_is_also_sampled_without_anchoring(tmp_path):
    from conftest import split_bundle_and_images

    bundle, _, data = split_bundle_and_images(tmp_path, latent_mean=(0.3, -0.3))
    res = _run((bundle, data), tmp_path / "out", 3, "--anchored-steps", "2")
    assert set(res["summary"]) == {"ae", "ldae_2", "ldae_3", "random", "random_free", "ldae_2_anchored"}
    assert "not anchored" in res["labels"]["random_free"] and "anchored" in res["labels"]["random"]
    # the same draws (and the same inversions), decoded two ways: different images
    assert all(r["methods"]["random"]["mse"] != r["methods"]["random_free"]["mse"] for r in res["subjects"])
    assert all(r["methods"]["ldae_2"]["mse"] != r["methods"]["ldae_2_anchored"]["mse"] for r in res["subjects"])
    md = (tmp_path / "out" / "reconstruction.md").read_text()
    assert "`random_free` decodes the same x_T without" in md
    assert "| steps | plain | anchored | anchored - plain (mean) | subjects better anchored |" in md
    assert md.count("/3 |") == 1  # one paired row, over the 3 validation subjects


def test_ysem_use_is_zero_exactly_when_the_denoiser_ignores_the_code():
    import torch

    from ldae_bids.model.config import preset
    from ldae_bids.model.pipeline import LdaePipeline
    from ldae_bids.model.stage2 import ysem_use

    torch.manual_seed(0)
    pipe = LdaePipeline(preset("tiny")[0]).eval()
    for blk in pipe.denoiser.modules():  # zero-initialised output convolutions: give them weights
        if hasattr(blk, "conv2"):
            torch.nn.init.normal_(blk.conv2.weight, std=0.1)
    torch.nn.init.normal_(pipe.denoiser.conv_out.weight, std=0.1)
    x = torch.rand(3, 1, 16, 16, 16)
    used = ysem_use(pipe, x)
    assert len(used["gain"]) == 5 and abs(used["mean_gain"]) > 1e-6
    for blk in pipe.denoiser.modules():
        if hasattr(blk, "cond_proj"):
            torch.nn.init.zeros_(blk.cond_proj.weight)
            torch.nn.init.zeros_(blk.cond_proj.bias)
    ignored = ysem_use(pipe, x)
    assert ignored["gain"] == [0.0] * 5
    with pytest.raises(ValueError, match="two"):
        ysem_use(pipe, x[:1])


def test_refined_rows_pair_each_method_with_its_refined_latent(setup, tmp_path):
    res = _run(setup, tmp_path / "r", 3, "--refine-steps", "2", "--refined-ddim-steps", "3")
    assert {"ae_refined", "ldae_3_refined"} <= set(res["summary"]) and "ldae_2_refined" not in res["summary"]
    assert res["refine_steps"] == 2 and res["refine_lr"] > 0
    for r in res["subjects"]:
        assert r["methods"]["ae_refined"]["mse"] != r["methods"]["ae"]["mse"]
        assert r["methods"]["ldae_3_refined"]["mse"] != r["methods"]["ldae_3"]["mse"]
    md = (tmp_path / "r" / "reconstruction.md").read_text()
    assert "| method | plain | refined | refined - plain (mean) | subjects better refined |" in md
    assert "| ae | " in md and "| ldae_3 | " in md
