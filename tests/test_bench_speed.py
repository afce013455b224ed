"""benchmarks/bench_speed.py on the tiny preset: report structure, composition arithmetic, shared DDIM loop."""

from __future__ import annotations

import json

import pytest



def _bench():
    from conftest import load_benchmark

    return load_benchmark("bench_speed")


def test_compose_adds_fixed_costs_and_steps():
    bench = _bench()
    costs = {"semantic_encoder": 1.0, "ae_encoder": 2.0, "ae_decoder": 3.0, "ldae_step": 0.5, "image_step": 5.0}
    out = bench.compose(costs, 10)
    assert out["ldae"]["encode"] == pytest.approx(2.0 + 1.0 + 5.0)
    assert out["ldae"]["decode"] == pytest.approx(5.0 + 3.0)
    assert out["image_space"]["encode"] == pytest.approx(1.0 + 50.0)
    assert out["image_space"]["reconstruct"] == pytest.approx(101.0)
    assert out["ratio"]["decode"] == pytest.approx(50.0 / 8.0)


def test_image_space_baseline_runs_the_same_loop_on_voxels():
    import torch

    bench = _bench()
    pipe, img = bench.build("tiny", None, torch.device("cpu"))
    assert img.semantic_encoder is pipe.semantic_encoder
    assert img.denoiser.conv_in.in_channels == 1
    # the same widths as the latent denoiser, only the input channels differ
    assert img.denoiser.conv_in.out_channels == pipe.denoiser.conv_in.out_channels
    x = torch.rand(1, 1, *pipe.config.image_shape)
    with torch.no_grad():
        y = img.semantic_encoder(x)
    x_T = img.ddim(x, y, 5, invert=True)
    assert x_T.shape == x.shape
    # freshly initialised denoisers predict zero noise: inversion then sampling returns the input
    assert torch.allclose(img.ddim(x_T, y, 5), x, atol=1e-4)


def test_report_on_the_tiny_preset(tmp_path):
    bench = _bench()
    assert bench.main(["--grids", "tiny", "--batch", "1", "2", "--steps", "2", "4", "--repeats", "1",
                       "--check-steps", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    (grid,) = report["grids"]
    assert grid["grid"] == "tiny" and [b["batch"] for b in grid["batches"]] == [1, 2]
    for b in grid["batches"]:
        assert set(b["per_call_s"]) == {"semantic_encoder", "ae_encoder", "ae_decoder", "ldae_step", "image_step"}
        assert all(v > 0 for v in b["per_call_s"].values())
        assert [s["steps"] for s in b["steps"]] == [2, 4]
        assert b["calls_timed"] == dict.fromkeys(b["per_call_s"], 1)  # tiny calls: all well under --single-call-s
    assert grid["check"]["steps"] == 2 and grid["check"]["measured"]["ldae"] > 0
    md = (tmp_path / "speed.md").read_text()
    assert "image-space" in md and "| 4 | reconstruct |" in md


def test_a_call_longer_than_single_call_s_is_timed_once():
    """The paper grid's image-space step takes minutes on a CPU: its warm-up call is the measurement."""
    import time

    import torch

    bench = _bench()
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    seconds, n = bench.timed(slow, torch.device("cpu"), repeats=3, single_call_s=0.01)
    assert n == 1 and len(calls) == 1 and seconds >= 0.05
    calls.clear()
    seconds, n = bench.timed(slow, torch.device("cpu"), repeats=3, single_call_s=10.0)
    assert n == 3 and len(calls) == 4  # warm-up + 3 timed
    calls.clear()
    assert bench.timed(slow, torch.device("cpu"), repeats=2)[1] == 2 and len(calls) == 3
