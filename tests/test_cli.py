"""The BIDS App contract: arguments, exit codes, discovery, resume, plugins, outputs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ldae_bids.cli.argv import expand_argv
from ldae_bids.cli.main import main


def run(*args: str) -> int:
    return main([str(a) for a in args])


def qc(bids: Path, out: Path, *extra: str) -> int:
    return run(bids, out, "participant", "--stages", "example-qc", "--skip-bids-validation",
               "-w", out.parent / "work", *extra)


def tree(root: Path) -> dict[str, float]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------- argv / usage
def test_expand_argv_multi_values_and_underscore_spelling():
    argv = ["/d", "/o", "participant", "--participant_label", "01", "sub-02", "--strengths", "-2", "1.5", "-v"]
    assert expand_argv(argv) == ["/d", "/o", "participant", "--participant-label", "01",
                                 "--participant-label", "sub-02", "--strengths", "-2", "--strengths", "1.5", "-v"]


def test_version_through_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ldae_bids", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ldae-bids ")


@pytest.mark.parametrize("args", [[], ["only-one"], ["/d", "/o", "participant", "--no-such-option"],
                                  ["/d", "/o", "participant", "--nprocs", "many"],
                                  ["/d", "/o", "participant", "--strengths", "0.125"],
                                  ["/d", "/o", "participant", "--strengths", "1e3"],
                                  ["/d", "/o", "participant", "--mem", "lots"],
                                  ["/d", "/o", "participant", "--precision", "fp16"],
                                  ["/d", "/o", "participant", "--strength-unit", "years"],
                                  ["/d", "/o", "participant", "--strength-unit", "target"],  # needs --strengths
                                  ["/d", "/o", "participant", "--strength-unit", "target", "--strengths", "1e7"]])
def test_usage_errors_exit_64(args, capsys):
    assert run(*args) == 64
    assert "error" in capsys.readouterr().err


def test_usage_error_exit_64_through_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldae_bids", str(tmp_path), str(tmp_path / "o"), "participant",
                           "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 64, proc.stderr


def test_unknown_level_exits_17(bids_factory, tmp_path, capsys):
    bids = bids_factory({"01": None})
    assert run(bids, tmp_path / "out", "session") == 17
    assert "unknown analysis level" in capsys.readouterr().err


def test_missing_bids_dir_exits_66(tmp_path, capsys):
    assert run(tmp_path / "nope", tmp_path / "out", "participant") == 66
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_invalid_bids_exits_16(tmp_path, capsys):
    (tmp_path / "notbids" / "sub-01").mkdir(parents=True)
    assert run(tmp_path / "notbids", tmp_path / "out", "participant") == 16
    assert "dataset_description.json" in capsys.readouterr().err


def test_unknown_label_exits_18(bids_factory, tmp_path, capsys):
    bids = bids_factory({"01": None})
    assert qc(bids, tmp_path / "out", "--participant-label", "99") == 18
    assert "99" in capsys.readouterr().err


def test_session_filter_matching_nothing_exits_18(bids_factory, tmp_path):
    bids = bids_factory({"01": ["A", "B"]})
    assert qc(bids, tmp_path / "out", "--session-label", "Z") == 18


def test_unwritable_output_exits_73(bids_factory, tmp_path, capsys):
    bids = bids_factory({"01": None})
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert qc(bids, blocker / "out") == 73
    assert "cannot create output" in capsys.readouterr().err


def test_missing_template_stops_the_run_once_with_66(bids_factory, tmp_path, monkeypatch, capsys):
    bids = bids_factory({"01": None, "02": None})
    empty = tmp_path / "tf-empty"
    empty.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(empty))
    monkeypatch.setenv("LDAE_TEMPLATEFLOW_OFFLINE", "1")
    out = tmp_path / "out"
    assert run(bids, out, "participant", "--stages", "preprocess", "--skip-bids-validation",
               "-w", tmp_path / "work") == 66
    err = capsys.readouterr().err
    assert "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz not found" in err and str(empty) in err
    # one message for the run: no crash file per subject, nothing half-written
    assert not list(out.glob("logs/crash-*")) and not list(out.glob("sub-*"))


def test_bad_filter_file_exits_64(bids_factory, tmp_path):
    bids = bids_factory({"01": None})
    bad = tmp_path / "f.json"
    bad.write_text("{not json")
    assert qc(bids, tmp_path / "out", "--bids-filter-file", bad) == 64


def test_unknown_stage_exits_64(bids_factory, tmp_path, capsys):
    bids = bids_factory({"01": None})
    assert run(bids, tmp_path / "out", "participant", "--stages", "nope", "--skip-bids-validation") == 64
    assert "unknown stage 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------- running
def test_labels_with_and_without_prefix_and_resume(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None, "03": None})
    out = tmp_path / "out"
    assert qc(bids, out, "--participant-label", "01", "sub-02") == 0
    assert (out / "sub-01" / "anat" / "sub-01_desc-rawqc_features.tsv").is_file()
    assert (out / "sub-02" / "anat" / "sub-02_desc-rawqc_features.tsv").is_file()
    assert not (out / "sub-03").exists()
    before = tree(out / "sub-01")
    # second run: both skipped, nothing rewritten
    assert qc(bids, out, "--participant-label", "01", "02") == 0
    assert tree(out / "sub-01") == before
    # a changed parameter re-runs the stage; --force re-runs too
    assert qc(bids, out, "--participant-label", "01", "--stage-option", "example-qc.corner=4") == 0
    assert tree(out / "sub-01") != before
    mid = tree(out / "sub-01")
    assert qc(bids, out, "--participant-label", "01", "--stage-option", "example-qc.corner=4", "--force") == 0
    assert tree(out / "sub-01") != mid


def test_sessions_and_runs(bids_factory, tmp_path):
    bids = bids_factory({"01": ["A", "B"], "02": None}, runs={("02", None): 2})
    out = tmp_path / "out"
    assert qc(bids, out) == 0
    assert (out / "sub-01" / "ses-A" / "anat" / "sub-01_ses-A_desc-rawqc_features.tsv").is_file()
    assert (out / "sub-01" / "ses-B" / "anat" / "sub-01_ses-B_desc-rawqc_features.tsv").is_file()
    # policy 'first': one image for sub-02, named without run
    assert [p.name for p in (out / "sub-02" / "anat").glob("*.tsv")] == ["sub-02_desc-rawqc_features.tsv"]
    out2 = tmp_path / "out2"
    assert qc(bids, out2, "--t1w-policy", "all") == 0
    assert sorted(p.name for p in (out2 / "sub-02" / "anat").glob("*.tsv")) == [
        "sub-02_run-1_desc-rawqc_features.tsv", "sub-02_run-2_desc-rawqc_features.tsv"]


def test_read_only_bids_dir_is_never_written(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None})
    before = tree(bids)
    for p in [bids, *bids.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        assert qc(bids, tmp_path / "out") == 0
        assert tree(bids) == before
    finally:
        for p in [bids, *bids.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_database_dir_inside_bids_is_refused(bids_factory, tmp_path):
    bids = bids_factory({"01": None})
    assert qc(bids, tmp_path / "out", "--bids-database-dir", bids / "db") == 64


def test_broken_subject_fails_alone_with_crash_file(bids_factory, tmp_path, capsys):
    bids = bids_factory({"01": None, "02": None})
    bad = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    assert qc(bids, out) == 1
    assert (out / "sub-01" / "anat" / "sub-01_desc-rawqc_features.tsv").is_file()
    assert not list((out / "sub-02").rglob("*.tsv")) if (out / "sub-02").exists() else True
    crashes = list((out / "logs").glob("crash-*-sub-02-example-qc.txt"))
    assert len(crashes) == 1 and "Traceback" in crashes[0].read_text()
    err = capsys.readouterr().err
    assert "sub-02" in err and "failed" in err


def test_resource_log_has_a_row_per_stage_call(bids_factory, tmp_path):
    """logs/resources-<run>.tsv: seconds and peak memory of each stage call, failed calls marked."""
    import pandas as pd

    bids = bids_factory({"01": None, "02": None})
    (bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert qc(bids, out) == 1
    (path,) = (out / "logs").glob("resources-*.tsv")
    rows = pd.read_csv(path, sep="\t")
    assert list(rows["unit"]) == ["sub-01", "sub-02"] and set(rows["stage"]) == {"example-qc"}
    assert list(rows["status"]) == ["done", "failed"]
    assert (rows["seconds"] >= 0).all() and (rows["peak_rss_mb"] > 10).all()
    assert (rows["seconds_per_subject"] == rows["seconds"]).all()


def test_stop_on_first_crash(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None})
    (bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert qc(bids, out, "--stop-on-first-crash") != 0
    assert not (out / "sub-02").exists()


def test_config_file_repeats_a_run(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None})
    out = tmp_path / "out"
    assert qc(bids, out, "--participant-label", "01", "--stage-option", "example-qc.corner=3") == 0
    config = next((out / "logs").glob("config-*.toml"))
    text = config.read_text()
    assert "corner" in text and "participant_label" in text
    out2 = tmp_path / "out2"
    assert run(bids, out2, "participant", "--config-file", config) == 0
    a = (out / "sub-01" / "anat" / "sub-01_desc-rawqc_features.json").read_text()
    b = (out2 / "sub-01" / "anat" / "sub-01_desc-rawqc_features.json").read_text()
    assert json.loads(a)["GeneratedBy"]["Parameters"] == json.loads(b)["GeneratedBy"]["Parameters"] == {"corner": 3}
    assert not (out2 / "sub-02").exists()


def test_labels_file(bids_factory, tmp_path):
    bids = bids_factory({"01": None, "02": None, "03": None})
    labels = tmp_path / "labels.txt"
    labels.write_text("sub-03\n")
    out = tmp_path / "out"
    assert qc(bids, out, "--participant-label-file", labels) == 0
    assert [p.name for p in out.glob("sub-*") if p.is_dir()] == ["sub-03"]


def test_outputs_pass_the_bids_validator(bids_factory, tmp_path):
    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe is None:
        pytest.skip("bids-validator-deno not installed (it is in the 'test' extra)")
    bids = bids_factory({"01": ["A"], "02": None})
    out = tmp_path / "out"
    assert qc(bids, out) == 0
    proc = subprocess.run([exe, "--format", "json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"})
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["ldae-bids", "ldae-bids-example"]


def test_list_stages_shows_builtin_and_example_plugin(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert run("--list-stages") == 0
    out = capsys.readouterr().out
    assert "example-qc" in out and "ldae-bids-example" in out and "participant" in out
    # the declared --stage-options, built-in and plugin
    assert "example-qc.corner" in out and "reconstruct.mask" in out and "yes|no, default yes" in out


@pytest.mark.parametrize("option, says", [
    ("example-qc.coner=4", "stage 'example-qc' has no option 'coner' (its options: corner)"),
    ("example-qc.corner=big", "example-qc.corner=big: not a whole number"),
    ("example-qc.corner=0", "example-qc.corner=0: must be at least 1"),
    ("exampleqc.corner=4", "no stage 'exampleqc' is installed"),
])
def test_bad_stage_option_stops_the_run_before_it_starts(bids_factory, tmp_path, capsys, option, says):
    bids = bids_factory({"01": None})
    out = tmp_path / "out"
    assert qc(bids, out, "--stage-option", option) == 64
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (out / "sub-01").exists()  # no subject was started
