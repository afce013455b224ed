"""Simulated longitudinal data: monotone, known change; a BIDS tree pybids can index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldae_bids.analysis.longitudinal import session_times
from ldae_bids.analysis.simulate import (
    VENTRICLE_LABELS,
    AtrophySettings,
    label_stats,
    make_phantom,
    simulate_phantom_dataset,
    simulate_sessions,
)

REPO = Path(__file__).resolve().parents[1]
MONTHS = (0, 6, 12, 24, 36)


@pytest.fixture(scope="module")
def phantom_sessions():
    t1, seg, _ = make_phantom((40, 48, 40))
    return t1, seg, simulate_sessions(t1, seg, (2.0, 2.0, 2.0), MONTHS, seed=0)


def test_ventricles_grow_and_brain_shrinks_monotonically(phantom_sessions):
    _, _, sessions = phantom_sessions
    vent = [s.truth["ventricles_mm3"] for s in sessions]
    paren = [s.truth["parenchyma_mm3"] for s in sessions]
    assert np.all(np.diff(vent) > 0) and np.all(np.diff(paren) < 0)
    assert [s.label for s in sessions] == ["M00", "M06", "M12", "M24", "M36"]
    for s in sessions:
        assert s.truth["ventricles_mm3"] == pytest.approx(s.truth["ventricles_target_mm3"], rel=0.01)
        assert s.truth["parenchyma_mm3"] == pytest.approx(s.truth["parenchyma_target_mm3"], rel=0.01)
        assert s.truth["min_jacobian"] > 0.2
    # default 10 %/year for 3 years
    assert vent[-1] / vent[0] == pytest.approx(1.3, rel=0.01)


def test_baseline_is_the_input_and_change_is_local(phantom_sessions):
    t1, seg, sessions = phantom_sessions
    np.testing.assert_array_equal(sessions[0].t1w, t1)
    np.testing.assert_array_equal(sessions[0].dseg, seg)
    diff = np.abs(sessions[-1].t1w - t1)
    assert diff.max() > 0.05 * t1.max()
    # far from the brain (outer scalp corner) nothing moves
    assert diff[:3, :3, :3].max() < 1e-6 * t1.max()
    # the partial-volume ventricle map integrates to the truth
    pv = sessions[-1].ventricles_probseg
    assert pv.sum() * 8 == pytest.approx(sessions[-1].truth["ventricles_mm3"], rel=1e-4)


def test_rates_scale_the_change():
    t1, seg, _ = make_phantom((40, 48, 40))
    slow = simulate_sessions(t1, seg, (2, 2, 2), (0, 12), AtrophySettings(ventricle_growth=0.05, brain_shrink=0.005))
    fast = simulate_sessions(t1, seg, (2, 2, 2), (0, 12), AtrophySettings(ventricle_growth=0.2, brain_shrink=0.02))
    g = lambda ss: ss[1].truth["ventricles_mm3"] / ss[0].truth["ventricles_mm3"] - 1  # noqa: E731
    assert g(slow) == pytest.approx(0.05, rel=0.05) and g(fast) == pytest.approx(0.2, rel=0.05)


def test_noise_is_seeded():
    t1, seg, _ = make_phantom((32, 40, 32))
    s = AtrophySettings(noise=0.02)
    a = simulate_sessions(t1, seg, (2, 2, 2), (0, 6), s, seed=1)
    b = simulate_sessions(t1, seg, (2, 2, 2), (0, 6), s, seed=1)
    np.testing.assert_array_equal(a[1].t1w, b[1].t1w)
    assert not np.array_equal(a[0].t1w, t1)


def test_writes_a_bids_tree_pybids_can_index(tmp_path):
    bids = pytest.importorskip("bids")
    root = simulate_phantom_dataset(tmp_path / "sim", n_subjects=2, months=(0, 6, 18), shape=(32, 40, 32))
    layout = bids.BIDSLayout(root, validate=True)
    assert sorted(layout.get_subjects()) == ["phantom01", "phantom02"]
    assert sorted(layout.get_sessions()) == ["M00", "M06", "M18"]
    assert len(layout.get(suffix="T1w", extension=".nii.gz")) == 6
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    ses = root / "sub-phantom01" / "sub-phantom01_sessions.tsv"
    t = session_times(ses)  # acq_time round trip gives the simulated months back
    assert t == pytest.approx({"M00": 0.0, "M06": 6.0, "M18": 18.0}, abs=1e-4)
    assert session_times(ses, source="age") == pytest.approx(t, abs=1e-2)
    truth = pd.read_csv(root / "derivatives" / "simulation" / "truth.tsv", sep="\t")
    assert len(truth) == 6 and {"participant_id", "session_id", "months", "ventricles_mm3"} <= set(truth.columns)
    for _, g in truth.groupby("participant_id"):
        assert g.sort_values("months")["ventricles_mm3"].is_monotonic_increasing
    assert (root / "derivatives" / "dlmuse" / "sub-phantom02" / "ses-M18" / "anat"
            / "sub-phantom02_ses-M18_desc-dlmuse_dseg.nii.gz").is_file()
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(parts["participant_id"]) == ["sub-phantom01", "sub-phantom02"]


@pytest.mark.ixi
def test_ixi_ventricle_labels(ixi):
    """51/52 are the lateral ventricles: right/left, dark, deep; the six labels make MUSE composite 509."""
    import nibabel as nib

    roi = pd.read_csv(ixi / "derivatives" / "dlmuse" / "roi_volumes.tsv", sep="\t")
    total = sum(roi[f"roi_{lab}_mm3"] for lab in VENTRICLE_LABELS)
    np.testing.assert_allclose(total, roi["roi_509_mm3"])
    sub = roi["participant_id"].iloc[0]
    img = nib.load(next((ixi / sub / "anat").glob("*_T1w.nii.gz")))
    seg = nib.load(next((ixi / "derivatives" / "dlmuse" / sub / "anat").glob("*_dseg.nii.gz")))
    stats = label_stats(img.get_fdata(dtype=np.float32), np.asarray(seg.dataobj), img.affine).set_index("label")
    assert stats.loc[51, "x"] > 0 > stats.loc[52, "x"]  # right, left (RAS world)
    assert stats.loc[[51, 52], "rel_intensity"].max() < 0.75  # CSF-dark
    assert stats.loc[[51, 52], "volume_ml"].min() > 2


@pytest.mark.ixi
@pytest.mark.slow
def test_benchmark_script_on_ixi(ixi, tmp_path):
    out = tmp_path / "ixi-long"
    cmd = [sys.executable, str(REPO / "benchmarks" / "simulate_longitudinal.py"), "--bids", str(ixi), "--out", str(out),
           "--n-subjects", "1", "--months", "0", "12", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    truth = pd.read_csv(out / "derivatives" / "simulation" / "truth.tsv", sep="\t")
    assert truth["ventricles_mm3"].iloc[1] == pytest.approx(1.1 * truth["ventricles_mm3"].iloc[0], rel=0.01)
    assert (truth["min_jacobian"] > 0).all()
