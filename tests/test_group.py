"""Group level on y_sem tables written as the embed stage writes them (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SessionInput
from ldae_bids.bids.writer import DerivativesWriter
from ldae_bids.cli.main import main


def _plant(bids, out, n, dim=16, seed=0, signal=True, volume=False):
    rng = np.random.default_rng(seed)
    parts = pd.read_csv(bids / "participants.tsv", sep="\t")
    w = DerivativesWriter(out, bids)
    for _, row in parts.iterrows():
        label = row["participant_id"][4:]
        y = rng.normal(size=dim)
        if signal:
            y[0] += (row["age"] - 50) / 10
            y[1] += 2.0 if row["sex"] == "F" else -2.0
        ses = SessionInput(label, None, bids / "x", {"subject": label})
        path = w.path(**outputs.ysem(ses), extension=".tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame([{"participant_id": f"sub-{label}", **{f"ysem_{i:03d}": v for i, v in enumerate(y)}}])
        df.to_csv(path, sep="\t", index=False)
        if volume:  # the preprocess sidecar's QC, with a brain volume that carries sex
            side = w.path(**outputs.preproc_t1w(ses, "2"), extension=".json")
            ml = 1100 + (150 if row["sex"] == "M" else 0) + rng.normal(0, 20)
            side.write_text(json.dumps({"QC": {"brain_volume_ml": ml}}))


@pytest.fixture
def cohort(bids_factory):
    rng = np.random.default_rng(1)
    spec = {f"{i:02d}": None for i in range(40)}
    meta = {k: {"age": round(float(rng.uniform(20, 80)), 1), "sex": "MF"[i % 2]} for i, k in enumerate(spec)}
    return bids_factory(spec, participants=meta)


def test_probe_stage_finds_planted_signal_and_beats_trivial(cohort, tmp_path):
    out = tmp_path / "out"
    _plant(cohort, out, 40)
    rc = main([str(cohort), str(out), "group", "--targets", "age", "sex", "--stage-option", "probe.n_boot=200",
               "-w", str(tmp_path / "w")])
    assert rc == 0
    m = pd.read_csv(out / "group" / "desc-probes_metrics.tsv", sep="\t")
    age = m[(m.target == "age") & (m.metric == "mae")].set_index("model")["value"]
    assert age["probe"] < 0.6 * age["trivial"]
    auc = m[(m.target == "sex") & (m.metric == "auroc")].set_index("model")
    assert auc.loc["probe", "value"] > 0.9 and auc.loc["probe", "ci_low"] <= auc.loc["probe", "value"]
    probe = json.loads((out / "group" / "target-age_desc-probe_probe.json").read_text())
    assert probe["target"] == "age"
    assert (out / "group" / "target-sex_desc-roc_figure.svg").is_file()
    assert (out / "group" / "target-age_desc-oof_predictions.tsv").is_file()
    assert "Linear probes" in (out / "group.html").read_text()
    # second run: nothing changed, stage skipped
    stamp = (out / "logs" / "stamps" / "group" / "probe.json").read_text()
    assert main([str(cohort), str(out), "group", "--targets", "age", "sex", "--stage-option", "probe.n_boot=200",
                 "-w", str(tmp_path / "w")]) == 0
    assert (out / "logs" / "stamps" / "group" / "probe.json").read_text() == stamp
    # third run without age: the age probe's files go (manipulate's default would otherwise still find its probe)
    assert main([str(cohort), str(out), "group", "--targets", "sex", "--stage-option", "probe.n_boot=200",
                 "-w", str(tmp_path / "w")]) == 0
    assert not list((out / "group").glob("target-age_*")) and (out / "group" / "target-sex_desc-probe_probe.json").is_file()
    m = pd.read_csv(out / "group" / "desc-probes_metrics.tsv", sep="\t")
    assert set(m.target) == {"sex"} and "target-age" not in (out / "group.html").read_text()


def test_brain_volume_covariate(cohort, tmp_path):
    """collect-embeddings carries the preprocess brain volume; probe.covariates adds it to y_sem."""
    out = tmp_path / "out"
    _plant(cohort, out, 40, signal=False, volume=True)
    assert main([str(cohort), str(out), "group", "--targets", "sex", "--stage-option", "probe.n_boot=100",
                 "--stage-option", "probe.covariates=brain_volume_ml", "-w", str(tmp_path / "w")]) == 0
    table = pd.read_csv(out / "group" / "desc-ysem_features.tsv", sep="\t")
    assert list(table.columns[:2]) == ["participant_id", "brain_volume_ml"] and table.brain_volume_ml.notna().all()
    m = pd.read_csv(out / "group" / "desc-probes_metrics.tsv", sep="\t")
    auc = m[m.metric == "auroc"].set_index("model")["value"]
    assert auc["probe+covariates"] > 0.9 and auc["covariates"] > 0.9 and auc["probe"] < 0.8
    oof = pd.read_csv(out / "group" / "target-sex_desc-oof_predictions.tsv", sep="\t")
    assert "probe+covariates_p_M" in oof.columns


def test_unknown_covariate_is_a_usage_error(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    _plant(cohort, out, 40)
    rc = main([str(cohort), str(out), "group", "--targets", "sex", "--stage-option", "probe.covariates=icv",
               "-w", str(tmp_path / "w")])
    assert rc == 64
    crash = next((out / "logs").glob("crash-*-probe.txt")).read_text()
    assert "no column icv for probe.covariates" in crash and "desc-ysem_features.tsv" in crash


def test_probe_on_noise_is_not_better_than_chance(cohort, tmp_path):
    out = tmp_path / "out"
    _plant(cohort, out, 40, signal=False)
    assert main([str(cohort), str(out), "group", "--targets", "sex", "--stage-option", "probe.n_boot=200",
                 "-w", str(tmp_path / "w")]) == 0
    m = pd.read_csv(out / "group" / "desc-probes_metrics.tsv", sep="\t")
    auc = m[(m.metric == "auroc") & (m.model == "probe")].iloc[0]
    assert auc.ci_low < 0.5 < auc.ci_high or auc.value < 0.75


def test_targets_naming_the_same_files_are_refused(bids_factory, tmp_path, capsys):
    meta = {f"{i:02d}": {"age": 20.0 + i, "age_": 30.0 + i} for i in range(12)}
    bids = bids_factory({k: None for k in meta}, participants=meta)
    out = tmp_path / "out"
    _plant(bids, out, 12, signal=False)
    assert main([str(bids), str(out), "group", "--targets", "age", "age_", "-w", str(tmp_path / "w")]) == 64
    assert "'age' and 'age_'" in capsys.readouterr().err
    assert not list((out / "group").glob("target-*_probe.json"))


def test_custom_plugin_probe_reuses_embeddings(cohort, tmp_path):
    out = tmp_path / "out"
    _plant(cohort, out, 40)
    assert main([str(cohort), str(out), "group", "--stages", "example-knn-probe", "--targets", "age",
                 "-w", str(tmp_path / "w")]) == 0
    m = pd.read_csv(out / "group" / "desc-knnprobe_metrics.tsv", sep="\t")
    assert m.loc[0, "metric"] == "MAE" and m.loc[0, "n"] == 40


def test_group_without_participant_outputs_exits_66(cohort, tmp_path, capsys):
    assert main([str(cohort), str(tmp_path / "empty"), "group", "-w", str(tmp_path / "w")]) == 66
    assert "participant level" in capsys.readouterr().err


def test_group_level_on_a_small_pilot_runs_without_probes(bids_factory, tmp_path, caplog):
    bids = bids_factory({"01": None, "02": None})
    out = tmp_path / "out"
    _plant(bids, out, 2)
    assert main([str(bids), str(out), "group", "-w", str(tmp_path / "w")]) == 0
    assert (out / "group" / "desc-ysem_features.tsv").is_file()
    assert not (out / "group" / "desc-probes_metrics.tsv").exists()
    assert (out / "group.html").is_file()
