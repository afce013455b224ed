"""Derivatives writer: names from entities, path safety, atomic writes, roll-back, sidecars."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ldae_bids.bids.io import atomic_write_text
from ldae_bids.bids.writer import DerivativesWriter, update_dataset_description
from ldae_bids.errors import OutputError


@pytest.fixture
def writer(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.9.0"}))
    return DerivativesWriter(tmp_path / "out", bids)


def test_paths_from_entities(writer):
    p = writer.path(subject="01", session="A", space="MNI152NLin2009cAsym", res="2", desc="preproc",
                    suffix="T1w", extension=".nii.gz")
    assert p.relative_to(writer.output_dir.resolve()).as_posix() == \
        "sub-01/ses-A/anat/sub-01_ses-A_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz"
    x = writer.path(subject="01", **{"from": "T1w", "to": "MNI152NLin2009cAsym"}, mode="image", suffix="xfm",
                    extension=".txt")
    assert x.name == "sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt"
    g = writer.path(target="age", desc="probe", suffix="probe", extension=".json")
    assert g.relative_to(writer.output_dir.resolve()).as_posix() == "group/target-age_desc-probe_probe.json"


@pytest.mark.parametrize("bad", ["../../etc", "01/../../x", "a b", "a_b", "ä", ""])
def test_labels_from_file_names_cannot_escape(writer, bad):
    with pytest.raises(OutputError):
        writer.path(subject=bad, suffix="T1w", extension=".nii.gz")


def test_inside_refuses_escape(writer):
    with pytest.raises(OutputError, match="outside"):
        writer.inside("../evil.txt")


def test_sidecar_sources_and_provenance(writer):
    import nibabel as nib

    w = writer.for_stage("demo", {"StageVersion": "3"})
    src = writer.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    path = w.write_nifti(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
                         {"subject": "01", "desc": "demo", "suffix": "T1w"}, {"SkullStripped": True}, sources=[src])
    side = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert side["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert side["GeneratedBy"]["Stage"] == "demo" and side["SkullStripped"] is True
    assert len(w.written) == 2
    w.remove_written()
    assert not path.exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x" / "file.txt"

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    from ldae_bids.bids.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list((tmp_path / "x").iterdir()) == []
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"


def test_dataset_description_concurrent_updates(writer):
    out = writer.output_dir
    threads = [threading.Thread(target=update_dataset_description,
                                args=(out, writer.bids_dir, [{"Name": f"plugin{i}", "Version": "1"}]))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "ldae-bids"
    assert sorted(g["Name"] for g in desc["GeneratedBy"][1:]) == [f"plugin{i}" for i in range(6)]
    assert (out / ".bidsignore").read_text().startswith("logs\n")
