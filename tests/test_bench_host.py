"""benchmarks/bench_memory.py and bench_host_io.py on two real IXI subjects with a tiny random bundle (CPU).

What is checked is the plumbing: peaks come from the app's own resources log of each batch size, the
``--mem`` check records what the app did, and the host-I/O phases time the stages' own code paths and
write what the stages write. The figures on this machine are not asserted on.
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from conftest import save_tiny_bundle

    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_tiny_bundle(path, {"licence": "CC0", "training": {"data": "none (random weights)"}})[0]


def test_bench_memory_measures_each_batch_size_and_checks_mem(ixi, tiny_bundle, tmp_path):
    from conftest import load_benchmark

    bench = load_benchmark("bench_memory")
    out = tmp_path / "results"
    rc = bench.main(["--bids", str(ixi), "--model", str(tiny_bundle), "--batch-sizes", "1", "2", "--ddim-steps", "2",
                     "--nprocs", "1", "--check-mem", "64GB", "--work", str(tmp_path / "work"), "--out", str(out),
                     "--stage-option", "embed.refine_latent=1"])
    assert rc == 0
    rep = json.loads((out / "memory.json").read_text())
    assert [r["batch_size"] for r in rep["runs"]] == [1, 2]
    for r in rep["runs"]:
        assert set(r["peak_rss_mb"]) == {"preprocess", "embed", "reconstruct"}
        assert all(v > 100 for v in r["peak_rss_mb"].values())
    assert set(rep["fits"]) == {"preprocess", "embed", "reconstruct"}
    assert rep["estimate"]["per_subject_mb"] > 0 and rep["estimate"]["grid"] == [16, 16, 16]
    # a limit far above the estimate leaves the batch size asked for
    assert rep["check_mem"]["batch_sizes"] == [2] and rep["check_mem"]["mem_mb"] == 65536
    md = (out / "memory.md").read_text()
    assert "within the limit" in md
    # the stage option reached every app call, and the estimate is the one for latent refinement
    assert rep["settings"]["stage_options"] == ["embed.refine_latent=1"] and rep["estimate"]["refine"] is True
    assert "`--stage-option embed.refine_latent=1`" in md and "with latent refinement" in md
    xt_side = next((tmp_path / "work" / "batch-1" / "out").rglob("*_desc-xt_xt.json"))
    assert json.loads(xt_side.read_text())["LatentRefinementSteps"] == 1


def test_bench_host_io_times_the_stages_own_writes(ixi, tiny_bundle, tmp_path):
    from conftest import load_benchmark

    bench = load_benchmark("bench_host_io")
    out = tmp_path / "results"
    work = tmp_path / "work"
    rc = bench.main(["--bids", str(ixi), "--model", str(tiny_bundle), "--n-subjects", "2", "--threads", "1", "2",
                     "--repeats", "1", "--nprocs", "1", "--work", str(work), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "host_io.json").read_text())
    assert set(rep["timings"]) == {"1", "2"}
    for timing in rep["timings"].values():
        assert list(timing) == list(bench.PHASES) and all(p["seconds"] > 0 for p in timing.values())
    # the timed phases wrote what the two stages write: per subject a preprocessed image, a reconstruction, figures
    for threads in ("1", "2"):
        written = sorted(p.name for p in (work / f"timing-{threads}").rglob("sub-*/**/*") if p.is_file())
        assert sum("desc-preproc_T1w.nii.gz" in n for n in written) == 2
        assert sum("desc-reconstruction_T1w.nii.gz" in n for n in written) == 2
        assert sum(n.endswith(".svg") for n in written) == 4
        side = json.loads(next((work / f"timing-{threads}").rglob("*desc-reconstruction_T1w.json")).read_text())
        assert set(side["Metrics"]) == {"ssim", "mse", "ssim_mask", "mse_mask"}
    assert "all host work" in (out / "host_io.md").read_text()
