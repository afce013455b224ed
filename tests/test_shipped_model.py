"""The model shipped in the package, and the README's main job with it on two IXI subjects.

The README promises: ``ldae-bids ../shared/data/ixi OUT participant --participant-label IXI012 IXI013``
works out of the box, its output passes the BIDS validator, a second run skips both subjects, and the
group level then runs on the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldae_bids.model.bundle import default_bundle_path

BUNDLE = default_bundle_path()
needs_bundle = pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file(),
                                  reason=f"no model bundle shipped at {BUNDLE}")


@needs_bundle
def test_shipped_bundle_is_complete_and_licensed():
    from ldae_bids.model.bundle import load_bundle

    mb = load_bundle(BUNDLE)  # verifies checksums, config keys and weight shapes
    meta = mb.metadata
    assert tuple(mb.config.image_shape) == (80, 96, 80) and meta["grid"]["template"] == "MNI152NLin2009cAsym"
    split = meta["training"]["split"]
    assert len(split["validation"]) >= 10 and not set(split["train"]) & set(split["validation"])
    assert meta["training"]["n_train_subjects"] + meta["training"]["n_val_subjects"] == 134
    assert meta["licence"] == "CC-BY-SA-3.0" and "IXI" in meta["training"]["data"]
    assert "CC BY-SA 3.0" in (BUNDLE / "LICENSE").read_text() and "IXI" in (BUNDLE / "README.md").read_text()
    assert meta["intensity"]["normalisation"] == "percentile" and "bias_correction" in meta["intensity"]
    assert 0 < meta["latent_scale"] < 100
    size = sum(p.stat().st_size for p in BUNDLE.iterdir())
    assert size < 40 * 2**20, f"bundle is {size / 2**20:.1f} MB"


def _tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@needs_bundle
@pytest.mark.slow
@pytest.mark.ixi
def test_readme_main_job_on_two_ixi_subjects(ixi, tmp_path):
    app = shutil.which("ldae-bids") or pytest.fail("the ldae-bids console script is not installed")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "COLUMNS": "200"}

    def ldae(*args):
        return subprocess.run([app, str(ixi), str(out), *args, "-w", str(work)], capture_output=True, text=True,
                              env=env, timeout=1200)

    first = ldae("participant", "--participant-label", "IXI012", "IXI013")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for sub in ("IXI012", "IXI013"):
        anat = out / f"sub-{sub}" / "anat"
        stem = f"sub-{sub}_space-MNI152NLin2009cAsym"
        ysem = (anat / f"{stem}_desc-ysem_features.tsv").read_text().splitlines()
        header, row = ysem[0].split("\t"), ysem[1].split("\t")
        assert len(ysem) == 2 and header[0] == "participant_id" and row[0] == f"sub-{sub}"
        assert sum(h.startswith("ysem_") for h in header) == 512 and len(row) == len(header)
        assert (anat / f"{stem}_desc-xt_xt.safetensors").is_file()
        side = json.loads((anat / f"{stem}_res-2_desc-reconstruction_T1w.json").read_text())
        # a trained model reconstructs the brain it was given (a random one scores near 0)
        assert side["Metrics"]["ssim_mask"] > 0.5, side["Metrics"]
        assert (out / f"sub-{sub}.html").is_file()

    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    assert exe, "bids-validator-deno (test extra) is not installed"
    proc = subprocess.run([exe, "--format", "json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"})
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors

    before = _tree(out / "sub-IXI012")
    second = ldae("participant", "--participant-label", "IXI012", "IXI013")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _tree(out / "sub-IXI012") == before  # both skipped, nothing rewritten

    group = ldae("group")
    assert group.returncode == 0, group.stdout[-3000:] + group.stderr[-3000:]
    hits = [p for p in out.rglob("*desc-ysem_features.tsv") if not p.name.startswith("sub-")]
    assert len(hits) == 1, sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tsv"))
    rows = hits[0].read_text().splitlines()
    assert len(rows) == 3 and {r.split("\t")[0] for r in rows[1:]} == {"sub-IXI012", "sub-IXI013"}, rows[:3]
    assert (out / "group.html").is_file()
    # the group QC table: both sessions, registration checked, reconstruction scored (too few to judge outliers)
    qc = (out / "group" / "desc-qc_metrics.tsv").read_text().splitlines()
    header = qc[0].split("\t")
    cells = [dict(zip(header, r.split("\t"))) for r in qc[1:]]
    assert [c["participant_id"] for c in cells] == ["sub-IXI012", "sub-IXI013"]
    assert all(c["registration_ok"] == "True" and float(c["reconstruction_ssim_brain"]) > 0.5 for c in cells), cells
    assert "Quality control" in (out / "group.html").read_text()


@needs_bundle
def test_self_check_finds_the_shipped_model():
    proc = subprocess.run([sys.executable, "-m", "ldae_bids.cli.tools", "self-check"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})
    assert "missing: default model bundle" not in " ".join(proc.stdout.split()), proc.stdout
    assert proc.returncode == 0, proc.stdout
