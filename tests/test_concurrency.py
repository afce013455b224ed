"""Participant runs of different subjects into one output folder at the same time (Slurm arrays)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _exe(name: str) -> list[str]:
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"ldae-bids": "ldae_bids", "ldae-bids-tools": "ldae_bids.cli.tools"}[name]
    return [sys.executable, "-m", module]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LDAE_TEMPLATEFLOW_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    return env


@pytest.fixture
def dataset(bids_factory):
    return bids_factory({"01": None, "02": None, "03": ["A", "B"]})


def _start(bids: Path, out: Path, label: str, work: Path, db: Path) -> subprocess.Popen:
    cmd = _exe("ldae-bids") + [str(bids), str(out), "participant", "--participant-label", label,
                                "--stages", "example-qc", "--skip-bids-validation", "-w", str(work),
                                "--bids-database-dir", str(db), "--nprocs", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def test_parallel_participants_share_one_output_folder(dataset, tmp_path):
    out, db = tmp_path / "out", tmp_path / "bids-db"
    # The submit script builds the shared index once, before the array starts.
    listing = subprocess.run(_exe("ldae-bids-tools") + ["list-participants", str(dataset), "--bids-database-dir",
                                                        str(db)], capture_output=True, text=True, env=_env())
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["01", "02", "03"]
    assert (db / "layout_index.sqlite").is_file()

    procs = {label: _start(dataset, out, label, tmp_path / f"work-{label}", db) for label in ("01", "02", "03")}
    results = {label: p.communicate(timeout=300) + (p.returncode,) for label, p in procs.items()}
    for label, (_, err, code) in results.items():
        assert code == 0, f"sub-{label} exited {code}:\n{err}"

    # every subject's outputs and resume stamp
    stamps = out / "logs" / "stamps"
    assert sorted(p.name for p in stamps.iterdir()) == ["sub-01", "sub-02", "sub-03"]
    for label in ("01", "02", "03"):
        stamp = json.loads((stamps / f"sub-{label}" / "example-qc.json").read_text())
        assert stamp["files"] and all((out / f).is_file() for f in stamp["files"])
    assert (out / "sub-03" / "ses-B" / "anat" / "sub-03_ses-B_desc-rawqc_features.tsv").is_file()

    # one description, valid JSON, each GeneratedBy entry once
    desc = json.loads((out / "dataset_description.json").read_text())
    names = [g["Name"] for g in desc["GeneratedBy"]]
    assert names.count("ldae-bids") == 1 and names.count("ldae-bids-example") == 1
    assert desc["DatasetType"] == "derivative"
    ignored = (out / ".bidsignore").read_text().splitlines()
    assert any(line.rstrip("/") == "logs" for line in ignored) and len(ignored) == len(set(ignored))

    # per-run files never collide: three runs, three configs, three logs, three citations
    logs = out / "logs"
    for pattern in ("config-*.toml", "ldae-bids-*.log", "CITATION-*.md"):
        assert len(list(logs.glob(pattern))) == 3, pattern
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
    assert not list(out.glob(".write-test-*"))

    # the group level reads what the three tasks wrote (report only: example-knn-probe needs y_sem)
    group = subprocess.run(_exe("ldae-bids") + [str(dataset), str(out), "group", "--reports-only", "-w",
                                                str(tmp_path / "work-group"), "--bids-database-dir", str(db)],
                           capture_output=True, text=True, env=_env())
    assert group.returncode == 0, group.stderr
    assert (out / "group.html").is_file()
    listing = subprocess.run(_exe("ldae-bids-tools") + ["list-participants", str(dataset), "--bids-database-dir",
                                                        str(db), "--participant-label", "01", "03"],
                             capture_output=True, text=True, env=_env())
    assert listing.stdout.split() == ["01", "03"]


def test_parallel_participants_without_a_prebuilt_index(dataset, tmp_path):
    """No list-participants first: every task indexes, they race to cache the index; all must succeed."""
    out, db = tmp_path / "out", tmp_path / "bids-db"
    procs = [_start(dataset, out, label, tmp_path / f"work-{label}", db) for label in ("01", "02", "03")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert sorted(p.name for p in (out / "logs" / "stamps").iterdir()) == ["sub-01", "sub-02", "sub-03"]
    json.loads((out / "dataset_description.json").read_text())
    leftovers = [p.name for p in db.parent.iterdir() if p.name.startswith(".bids-db.")]
    assert not leftovers, f"temporary index folders left behind: {leftovers}"


def test_same_output_from_two_hosts_with_equal_pids(dataset, tmp_path, monkeypatch):
    """The output write test must not clash between processes with the same pid (Docker: pid 1, other nodes)."""
    from ldae_bids.app import _check_output
    from ldae_bids.config import build_settings

    out = tmp_path / "out"
    out.mkdir()
    settings = build_settings(bids_dir=dataset, output_dir=out, analysis_level="participant", work_dir=tmp_path / "w")
    # another host's probe with our pid sits there (it would be removed under its feet, or ours under ours)
    (out / f".write-test-{os.getpid()}").write_text("")
    _check_output(settings)
    assert (out / f".write-test-{os.getpid()}").exists(), "another process's write-test file was removed"
    shutil.rmtree(out)
