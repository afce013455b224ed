"""benchmarks/bench_precision.py on a tiny random bundle and synthetic model-ready images."""

from __future__ import annotations

import json


def test_both_precisions_are_timed_and_scored_on_the_validation_subjects(tmp_path):
    from conftest import load_benchmark, split_bundle_and_images

    labels = ["t1", "v1", "v2", "v3"] + [f"x{k}" for k in range(8)]
    bundle, _, data = split_bundle_and_images(tmp_path, labels)
    bids = tmp_path / "bids"
    bids.mkdir()
    people = ["participant_id\tage\tsex"]
    people += [f"sub-{label}\t{20 + 5 * i}\t{'MF'[i % 2]}" for i, label in enumerate(labels)]
    (bids / "participants.tsv").write_text("\n".join(people) + "\n")
    out = tmp_path / "out"
    bench = load_benchmark("bench_precision")
    assert bench.main(["--bundle", str(bundle), "--data", str(data), "--bids", str(bids), "--steps", "2",
                       "--batch-size", "2", "--repeats", "1", "--n-boot", "20", "--threads", "1", "--device", "cpu",
                       "--out", str(out)]) == 0
    res = json.loads((out / "precision.json").read_text())
    assert res["subjects"] == ["v1", "v2", "v3"]  # validation subjects only
    for p in ("fp32", "bf16"):
        sec = res["precisions"][p]["seconds"]
        assert set(sec) == {"semantic_encoder", "ae_encoder", "ae_decoder", "denoiser_step", "reconstruct",
                            "autoencode"} and all(v > 0 for v in sec.values())
        assert len(res["precisions"][p]["per_subject"]["ldae_ssim"]) == 3
    # bf16 really ran: its codes differ from fp32, by little
    assert all(0 < r < 0.1 for r in res["codes"]["ysem_rel"])
    assert set(res["probes"]) == {"age", "sex"} and res["probes"]["age"]["metric"] == "mae"
    assert res["probes"]["age"]["fp32"]["n"] == 12
    md = (out / "precision.md").read_text()
    assert "| semantic encoder, one call, batch 1 |" in md and "## Probes" in md


def test_skips_without_data(tmp_path, capsys):
    from conftest import load_benchmark

    assert load_benchmark("bench_precision").main(["--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_preprocess_compare_pairs_subjects(tmp_path):
    from conftest import load_benchmark

    def result(path, precision, dice):
        rows = [{"subject": s, "bet_dice_vs_dlmuse": d, "ncc_to_template": 0.4} for s, d in dice.items()]
        path.write_text(json.dumps({"precision": precision, "subjects": rows}))
        return path

    base = result(tmp_path / "a.json", "fp32", {"sub-1": 0.98, "sub-2": 0.97, "sub-3": 0.96})
    other = result(tmp_path / "b.json", "bf16", {"sub-0": None, "sub-1": 0.981, "sub-2": 0.965, "sub-4": 0.5})
    data = json.loads(base.read_text())
    data["subjects"].insert(0, {"subject": "sub-0", "bet_dice_vs_dlmuse": 0.9, "ncc_to_template": 0.4})
    base.write_text(json.dumps(data))  # sub-0 has no Dice in the other run: left out of that metric
    bench = load_benchmark("bench_preprocess")
    assert bench.main(["--compare", str(base), str(other), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "preprocess_compare.json").read_text())
    dice = res["metrics"]["bet_dice_vs_dlmuse"]
    assert res["n_common"] == 3 and res["other_precision"] == "bf16"  # sub-3 and sub-4 are not in both
    assert abs(dice["diff_mean"] - (0.001 - 0.005) / 2) < 1e-9 and dice["worst_subject"] == "sub-2"
    assert res["metrics"]["ncc_to_template"]["diff_max"] == 0
