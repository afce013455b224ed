"""benchmarks/train_kit.py: model-ready images packed for a GPU machine and unpacked there, as training reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark


def _model_ready(root, labels, shape=(16, 16, 16), affine=None):
    import nibabel as nib

    affine = np.diag([2.0, 2, 2, 1]) if affine is None else affine
    rng = np.random.default_rng(0)
    volumes = {}
    for label in labels:
        data = np.clip(rng.random(shape).astype(np.float32) * 1.1 - 0.05, 0, 1)  # includes exact 0 and 1
        data[:3] = 0.0  # background
        path = root / f"sub-{label}" / "anat" / f"sub-{label}_desc-preproc_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        volumes[label] = data
    return volumes


def test_pack_unpack_round_trip_within_the_quantisation_step(tmp_path):
    from ldae_bids.model.data import find_images, grid_of, load_volume, subject_of

    kit = load_benchmark("train_kit")
    volumes = _model_ready(tmp_path / "deriv", ["A01", "B02", "C03"])
    index = kit.pack(tmp_path / "deriv", tmp_path / "kit")
    assert index["subjects"] == ["A01", "B02", "C03"] and index["shape"] == [16, 16, 16]
    assert json.loads((tmp_path / "kit" / "index.json").read_text())["bytes"] == (tmp_path / "kit" / "images.xz").stat().st_size
    written = kit.unpack(tmp_path / "kit", tmp_path / "out")
    found = find_images([tmp_path / "out"])
    assert found == sorted(written) and [subject_of(p) for p in found] == ["A01", "B02", "C03"]
    for path in found:
        got, want = load_volume(path, (16, 16, 16)), volumes[subject_of(path)]
        assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6  # round(255 x) / 255
        assert got[:3].max() == 0.0 and got.max() == pytest.approx(1.0)
    assert grid_of(found[0], "MNI152NLin2009cAsym")["affine"] == grid_of(
        tmp_path / "deriv" / "sub-A01" / "anat" / "sub-A01_desc-preproc_T1w.nii.gz", "MNI152NLin2009cAsym")["affine"]


def test_pack_refuses_mixed_grids_and_a_truncated_kit(tmp_path):
    kit = load_benchmark("train_kit")
    _model_ready(tmp_path / "deriv", ["A01"])
    _model_ready(tmp_path / "deriv", ["B02"], shape=(16, 16, 12))
    with pytest.raises(SystemExit, match="grid differs"):
        kit.pack(tmp_path / "deriv", tmp_path / "kit")
    assert not list((tmp_path / "kit").iterdir())  # nothing half-written
    _model_ready(tmp_path / "ok", ["A01", "B02"])
    kit.pack(tmp_path / "ok", tmp_path / "kit2")
    index = json.loads((tmp_path / "kit2" / "index.json").read_text())
    index["subjects"].append("C03")  # the index promises an image the data does not hold
    (tmp_path / "kit2" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="bytes for 3 images"):
        kit.unpack(tmp_path / "kit2", tmp_path / "out")


def test_unpack_writes_only_bids_labels_under_its_folder(tmp_path):
    kit = load_benchmark("train_kit")
    _model_ready(tmp_path / "ok", ["A01"])
    kit.pack(tmp_path / "ok", tmp_path / "kit")
    index = json.loads((tmp_path / "kit" / "index.json").read_text())
    index["subjects"] = ["../../escape"]
    (tmp_path / "kit" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="not a BIDS label"):
        kit.unpack(tmp_path / "kit", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("escape*"))


def test_a_corrupt_image_is_one_line_naming_it(tmp_path, capsys):
    kit = load_benchmark("train_kit")
    _model_ready(tmp_path / "deriv", ["A01", "B02"])
    bad = tmp_path / "deriv" / "sub-B02" / "anat" / "sub-B02_desc-preproc_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    assert kit.main(["pack", "--data", str(tmp_path / "deriv"), "--out", str(tmp_path / "kit")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sub-B02" in err
    assert not list((tmp_path / "kit").iterdir())
