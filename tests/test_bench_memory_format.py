"""benchmarks/bench_memory_format.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json


def test_both_layouts_are_timed_and_compared_in_each_precision(tmp_path):
    from conftest import load_benchmark, split_bundle_and_images

    bundle, _, data = split_bundle_and_images(tmp_path, masks=False)
    out = tmp_path / "out"
    bench = load_benchmark("bench_memory_format")
    assert bench.main(["--bundle", str(bundle), "--data", str(data), "--steps", "2", "--batch", "1", "2",
                       "--batch-size", "2", "--repeats", "1", "--threads", "1", "--device", "cpu", "--training",
                       "--out", str(out)]) == 0
    res = json.loads((out / "memory_format.json").read_text())
    assert res["subjects"] == ["v1", "v2", "v3"]  # validation subjects only
    assert "fp32: contiguous" in res["app_choice"]
    for prec in ("fp32", "bf16"):
        for fmt in ("contiguous", "channels_last"):
            run = res["runs"][prec][fmt]
            assert set(run["networks"]) == {"1", "2"} and run["reconstruct_s_per_subject"] > 0
            assert all(v > 0 for v in run["networks"]["2"].values()) and len(run["ssim"]) == 3
            assert set(run["training"]) == {"decoder_step_b2", "denoiser_step_b8"}
        moved = res["runs"][prec]["channels_last"]["moved"]
        assert all(len(v) == 3 for v in moved.values())
    # fp32: the same maths to rounding; bf16: a little more, still the same image
    assert max(res["runs"]["fp32"]["channels_last"]["moved"]["images"]) < 1e-4
    assert max(res["runs"]["bf16"]["channels_last"]["moved"]["images"]) < 0.05
    md = (out / "memory_format.md").read_text()
    assert "| bf16 | training: decoder step (forward + backward), batch 2 |" in md
    assert "| bf16 | denoiser step, one call, batch 2 |" in md and "reconstruct, 2 steps, per subject" in md
    # --render writes the same Markdown from the JSON alone (a GPU run brings back the JSON only)
    (out / "memory_format.md").unlink()
    assert bench.main(["--render", str(out / "memory_format.json")]) == 0
    assert (out / "memory_format.md").read_text() == md
    # --any-images: whatever model-ready images lie under --data (an app output folder), not the split
    app = tmp_path / "app" / "sub-GPU000" / "anat"
    app.mkdir(parents=True)
    (data / "sub-t1_desc-preproc_T1w.nii.gz").rename(app / "sub-GPU000_space-X_res-2_desc-preproc_T1w.nii.gz")
    assert bench.main(["--bundle", str(bundle), "--data", str(tmp_path / "app"), "--any-images", "--steps", "1",
                       "--batch", "1", "--precisions", "fp32", "--repeats", "1", "--threads", "1", "--device", "cpu",
                       "--out", str(tmp_path / "out2")]) == 0
    assert json.loads((tmp_path / "out2" / "memory_format.json").read_text())["subjects"] == ["GPU000"]


def test_skips_without_data(tmp_path, capsys):
    from conftest import load_benchmark

    assert load_benchmark("bench_memory_format").main(["--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out
