"""The group-level QC table (collect-qc) on sidecars written as the participant stages write them (no model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SessionInput
from ldae_bids.bids.writer import DerivativesWriter
from ldae_bids.cli.main import main
from ldae_bids.stages.qc import MIN_FOR_OUTLIERS, flag_sessions, modified_z


def _plant_qc(bids, out, labels, *, odd_volume=None, failed=None, recon=True, seed=0):
    """Preprocess sidecars (QC) and reconstruct sidecars (Metrics) for every subject; one brain volume far off
    (``odd_volume``) and one failed registration check (``failed``) when asked."""
    rng = np.random.default_rng(seed)
    w = DerivativesWriter(out, bids)
    for label in labels:
        ses = SessionInput(label, None, bids / "x", {"subject": label})
        ncc = 0.48 + rng.normal(0, 0.01)
        qc = {"brain_volume_ml": 3000.0 if label == odd_volume else 1400 + rng.normal(0, 60),
              "ncc_to_template": 0.2 if label == failed else ncc,
              "mask_dice_to_template": 0.96 + rng.normal(0, 0.004), "registration_ok": label != failed}
        side = w.path(**outputs.preproc_t1w(ses, "2"), extension=".json")
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps({"QC": qc}))
        if recon:
            metrics = {"ssim": 0.92 + rng.normal(0, 0.005), "ssim_mask": 0.84 + rng.normal(0, 0.01),
                       "mse": 0.002 + rng.normal(0, 1e-4), "mse_mask": 0.005}
            w.path(**outputs.reconstruction(ses, "2"), extension=".json").write_text(json.dumps({"Metrics": metrics}))


def test_modified_z():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0] * 5)
    z = modified_z(x)
    # median 3, MAD 1: z = 0.6745 (x - 3)
    assert z[0] == pytest.approx(0.6745 * -2) and z[4] == pytest.approx(0.6745 * 97)
    assert np.isnan(modified_z(x[:MIN_FOR_OUTLIERS - 1])).all()  # too few values to judge
    assert np.isnan(modified_z(np.ones(30))).all()  # no spread: nothing is an outlier
    y = x.copy()
    y[1] = np.nan
    assert np.isnan(modified_z(y)[1]) and np.isfinite(modified_z(y)[0])


def test_flag_sessions_sides():
    n = 30
    rng = np.random.default_rng(0)
    table = pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(n)], "registration_ok": [True] * n,
        "brain_volume_ml": 1400 + rng.normal(0, 50, n), "ncc_to_template": 0.48 + rng.normal(0, 0.01, n),
        "mask_dice_to_template": 0.96 + rng.normal(0, 0.004, n),
        "reconstruction_ssim": 0.92 + rng.normal(0, 0.005, n),
        "reconstruction_ssim_brain": 0.84 + rng.normal(0, 0.01, n),
        "reconstruction_mse": 0.002 + rng.normal(0, 1e-4, n)})
    table.loc[0, "ncc_to_template"] = 0.9  # far off, but a high NCC is no problem
    table.loc[1, "ncc_to_template"] = 0.2  # a low one is
    table.loc[2, "brain_volume_ml"] = 500.0  # volume: either side
    table.loc[3, "reconstruction_mse"] = 0.01  # a high MSE
    table.loc[4, "registration_ok"] = False
    flag_sessions(table, 3.5)
    flagged = dict(zip(table.participant_id[table.qc_flagged], table.qc_flags[table.qc_flagged]))
    assert set(flagged) == {"sub-01", "sub-02", "sub-03", "sub-04"}
    assert flagged["sub-01"].startswith("ncc_to_template low") and "brain_volume_ml low" in flagged["sub-02"]
    assert "reconstruction_mse high" in flagged["sub-03"] and flagged["sub-04"] == "registration check failed"
    assert table.loc[0, "z_ncc_to_template"] > 3.5 and pd.isna(table.qc_flags[5])


def _collect_qc(bids_factory, tmp_path, n, planted=None, **plant):
    """``n`` subjects, QC sidecars planted for ``planted`` of them (default all), then ``group --stages
    collect-qc``; returns the dataset, the output folder and the QC table."""
    labels = [f"{i:02d}" for i in range(n)]
    bids = bids_factory({k: None for k in labels})
    out = tmp_path / "out"
    _plant_qc(bids, out, labels[:planted], **plant)
    assert main([str(bids), str(out), "group", "--stages", "collect-qc", "-w", str(tmp_path / "w")]) == 0
    return bids, out, pd.read_csv(out / "group" / "desc-qc_metrics.tsv", sep="\t")


def test_collect_qc_group_table_report_and_figure(bids_factory, tmp_path):
    bids, out, table = _collect_qc(bids_factory, tmp_path, 30, odd_volume="07", failed="11")
    path = out / "group" / "desc-qc_metrics.tsv"
    assert list(table.columns[:3]) == ["participant_id", "qc_flagged", "qc_flags"] and len(table) == 30
    assert sorted(table.participant_id[table.qc_flagged]) == ["sub-07", "sub-11"]
    row = table.set_index("participant_id").loc["sub-11"]
    assert "registration check failed" in row.qc_flags and not row.registration_ok
    assert table.reconstruction_ssim.notna().all()
    assert "n/a" in path.read_text()  # unflagged sessions' reasons are n/a, never an empty cell
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["OutlierZ"] == 3.5 and side["brain_volume_ml"]["Units"] == "ml" and side["MissingSessions"] == []
    assert all(c in side for c in table.columns if c not in ("participant_id", "session_id"))  # every column described
    assert (out / "group" / "desc-groupqc_figure.svg").is_file()
    page = (out / "group.html").read_text()
    assert "Quality control" in page and "<b>2</b> flagged" in page and "href='sub-07.html'" in page
    # a stricter threshold flags at least as many; the option enters the resume key (the stage reruns)
    assert main([str(bids), str(out), "group", "--stages", "collect-qc", "--stage-option", "collect-qc.outlier_z=1",
                 "-w", str(tmp_path / "w")]) == 0
    strict = pd.read_csv(path, sep="\t")
    assert strict.qc_flagged.sum() > 2 and json.loads(path.with_suffix(".json").read_text())["OutlierZ"] == 1


def test_collect_qc_without_reconstructions_and_with_missing_sessions(bids_factory, tmp_path):
    _, out, table = _collect_qc(bids_factory, tmp_path, 25, planted=23, recon=False)  # two not preprocessed yet
    assert len(table) == 23 and table.reconstruction_ssim.isna().all()
    side = json.loads((out / "group" / "desc-qc_metrics.json").read_text())
    assert side["MissingSessions"] == ["sub-23", "sub-24"]
    assert "Outliers are judged only" not in (out / "group.html").read_text()  # 23 sessions: judged


def test_collect_qc_few_sessions_says_outliers_are_not_judged(bids_factory, tmp_path):
    _, out, table = _collect_qc(bids_factory, tmp_path, 5, odd_volume="01", failed="03")
    assert list(table.participant_id[table.qc_flagged]) == ["sub-03"]  # the failed check; no z with 5 values
    assert table.z_brain_volume_ml.isna().all()
    assert "Outliers are judged only with at least 20 sessions" in (out / "group.html").read_text()


@pytest.mark.parametrize("value, message", [("abc", "not a number"), ("nan", "not a finite number"),
                                            ("-1", "must be at least 0")])
def test_collect_qc_bad_threshold_is_a_usage_error(bids_factory, tmp_path, capsys, value, message):
    bids = bids_factory({"01": None})
    assert main([str(bids), str(tmp_path / "out"), "group", "--stages", "collect-qc", "--stage-option",
                 f"collect-qc.outlier_z={value}", "-w", str(tmp_path / "w")]) == 64
    assert f"collect-qc.outlier_z={value}: {message}" in capsys.readouterr().err


def test_collect_qc_runs_by_default_and_warns_without_sidecars(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None})
    out = tmp_path / "out"
    w = DerivativesWriter(out, bids)
    for label in ("01", "02"):  # y_sem only, as in a run whose preprocess outputs were removed
        ses = SessionInput(label, None, bids / "x", {"subject": label})
        path = w.path(**outputs.ysem(ses), extension=".tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"participant_id": f"sub-{label}", "ysem_000": 0.1}]).to_csv(path, sep="\t", index=False)
    assert main([str(bids), str(out), "group", "-w", str(tmp_path / "w")]) == 0
    log = next((out / "logs").glob("ldae-bids-*.log")).read_text()
    assert "collect-qc: no preprocess sidecar with QC" in log
    assert not (out / "group" / "desc-qc_metrics.tsv").exists()


def test_collect_qc_removes_its_earlier_table_when_it_writes_none(bids_factory, tmp_path):
    """A group stage's outputs match the current inputs: once the sidecars are gone, the next run removes the
    table, its sidecar and figure written from them (like a participant stage's outputs no longer asked for)."""
    bids, out, _ = _collect_qc(bids_factory, tmp_path, 3)
    written = [out / "group" / n for n in ("desc-qc_metrics.tsv", "desc-qc_metrics.json", "desc-groupqc_figure.svg")]
    assert all(p.is_file() for p in written)
    for side in out.glob("sub-*/anat/*desc-preproc_T1w.json"):
        side.unlink()  # by hand: no stamp changed, hence --force
    assert main([str(bids), str(out), "group", "--stages", "collect-qc", "--force", "-w", str(tmp_path / "w")]) == 0
    assert not any(p.exists() for p in written)
    log = "".join(p.read_text() for p in (out / "logs").glob("ldae-bids-*.log"))  # two runs may share a second
    assert "removed group/desc-qc_metrics.tsv (written by an earlier run of collect-qc" in log
