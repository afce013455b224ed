"""benchmarks/registration_starts.py: the rotated starts, and its run on one real subject (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _bench():
    from conftest import load_benchmark

    return load_benchmark("registration_starts")


def test_starts_rotate_about_the_centre():
    bench = _bench()
    init = np.eye(4)
    init[:3, 3] = [1.0, 2.0, 3.0]
    centre = np.array([10.0, -5.0, 7.0])
    s = bench.starts(init, centre, ["pitch", "yaw"], [-10.0, 10.0])
    assert list(s) == ["usual", "pitch -10", "pitch +10", "yaw -10", "yaw +10"]
    assert np.array_equal(s["usual"], init)
    for name, m in s.items():
        lin = m[:3, :3]
        assert np.allclose(lin @ lin.T, np.eye(3)) and np.isclose(np.linalg.det(lin), 1.0)  # a rotation
        assert np.allclose(m @ np.append(centre, 1.0), init @ np.append(centre, 1.0))  # the centre stays put
    assert np.allclose(s["pitch +10"][:3, 0], [1, 0, 0])  # pitch turns about the left-right axis
    assert np.isclose(np.degrees(np.arccos(s["yaw +10"][0, 0])), 10.0)


def test_registration_from_rotated_starts_on_one_subject(ixi, tmp_path):
    bench = _bench()
    assert bench.main(["--bids", str(ixi), "--participant-label", "IXI012", "--degrees", "15", "--axes", "yaw",
                       "--threads", "2", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "registration_starts.json").read_text())
    rows = rep["subjects"][0]["starts"]
    assert list(rows) == ["usual", "yaw +15"]
    # a 15-degree turn of the start is undone: both end at the same alignment
    assert rows["yaw +15"]["ncc_to_template"] == pytest.approx(rows["usual"]["ncc_to_template"], abs=0.002)
    assert rows["usual"]["mask_dice_to_template"] > 0.9
    assert "| sub-IXI012 |" in (tmp_path / "registration_starts.md").read_text()


def test_missing_data_folder_skips(tmp_path, capsys):
    assert _bench().main(["--bids", str(tmp_path / "none"), "--participant-label", "01", "--out",
                          str(tmp_path / "r")]) == 0
    assert "nothing measured" in capsys.readouterr().out


def test_tilted_input_mode(ixi, tmp_path):
    from ldae_bids.preprocessing.register import START_KEEP_STEP

    bench = _bench()
    assert bench.main(["--bids", str(ixi), "--participant-label", "IXI013", "--tilt-input", "--degrees", "10",
                       "--axes", "roll", "--threads", "2", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "registration_tilt.json").read_text())
    rows = rep["subjects"][0]["starts"]
    assert rep["tilt_input"] and rep["extra_starts"] and list(rows) == ["usual", "roll +10"]
    assert rep["keep_step"] == START_KEEP_STEP  # the preprocess stage's, unless --keep-step says
    assert rows["roll +10"]["ncc_to_template"] == pytest.approx(rows["usual"]["ncc_to_template"], abs=0.003)
    text = (tmp_path / "registration_tilt.md").read_text()
    assert "worst: NCC below usual" in text and f"best start after coarse-level step {START_KEEP_STEP}" in text
