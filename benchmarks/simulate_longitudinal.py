#!/usr/bin/env python
"""Make a simulated longitudinal BIDS dataset from single-session T1w scans with DLMUSE labels.

Each chosen subject's one real scan becomes sessions ses-M00, ses-M06... in which the ventricles
grow and the brain shrinks away from the skull by known amounts that grow with time (see
``ldae_bids.analysis.simulate``). Output: a raw BIDS dataset (sessions.tsv with acq_time and age,
participants.tsv, dataset_description.json, README), ``derivatives/dlmuse`` (warped labels) and
``derivatives/simulation`` (truth.tsv: the ventricle and parenchyma volume of every session, and the
partial-volume ventricle maps).

Example::

    python benchmarks/simulate_longitudinal.py --bids ../shared/data/ixi --out /tmp/ixi-long \\
        --n-subjects 4 --months 0 6 12 24 36 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bids", required=True, type=Path, help="source BIDS dataset (one T1w per subject)")
    p.add_argument("--out", required=True, type=Path, help="folder for the simulated dataset")
    p.add_argument("--labels-dir", type=Path, default=None,
                   help="DLMUSE derivatives with sub-*/anat/*_desc-dlmuse_dseg.nii.gz "
                        "(default: BIDS/derivatives/dlmuse)")
    p.add_argument("--n-subjects", type=int, default=4)
    p.add_argument("--participant-label", nargs="+", default=None, help="use these subjects instead of a random draw")
    p.add_argument("--months", type=float, nargs="+", default=[0, 6, 12, 24, 36], help="session times after baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ventricle-growth", type=float, default=0.10, help="fraction of ventricle volume per year")
    p.add_argument("--brain-shrink", type=float, default=0.01, help="fraction of parenchyma volume per year")
    p.add_argument("--sigma-mm", type=float, default=4.0, help="smoothness of the deformation fields")
    p.add_argument("--noise", type=float, default=0.0, help="Rician noise sd per session, fraction of brain p99")
    p.add_argument("--min-age", type=float, default=None, help="draw only subjects at least this old")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def choose_subjects(bids: Path, labels_dir: Path, args) -> list[dict]:
    import numpy as np
    import pandas as pd

    parts = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = []
    for rec in parts.to_dict("records"):
        sub = rec["participant_id"].removeprefix("sub-")
        t1 = sorted((bids / f"sub-{sub}" / "anat").glob(f"sub-{sub}*_T1w.nii.gz"))
        seg = sorted((labels_dir / f"sub-{sub}" / "anat").glob(f"sub-{sub}*_desc-dlmuse_dseg.nii.gz"))
        try:
            age = float(rec.get("age", "n/a"))
        except ValueError:
            age = None
        if not t1 or not seg or age is None:
            continue
        if args.min_age is not None and age < args.min_age:
            continue
        rows.append({"sub": sub, "t1": t1[0], "seg": seg[0], "age": age, "sex": rec.get("sex") or None})
    if args.participant_label:
        wanted = {s.removeprefix("sub-") for s in args.participant_label}
        chosen = [r for r in rows if r["sub"] in wanted]
        missing = wanted - {r["sub"] for r in chosen}
        if missing:
            sys.exit(f"error: no usable T1w + labels + age for {', '.join(sorted(missing))}")
        return chosen
    if len(rows) < args.n_subjects:
        sys.exit(f"error: only {len(rows)} usable subjects, {args.n_subjects} asked")
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.choice(len(rows), size=args.n_subjects, replace=False))
    return [rows[i] for i in pick]


def main(argv=None) -> int:
    args = parse_args(argv)
    import json

    import nibabel as nib
    import numpy as np

    from ldae_bids.analysis.simulate import AtrophySettings, simulate_subject_from_arrays, write_dataset, write_subject

    bids = args.bids.resolve()
    labels_dir = (args.labels_dir or bids / "derivatives" / "dlmuse").resolve()
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            sys.exit(f"error: {args.out} exists and is not empty (use --overwrite)")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = AtrophySettings(ventricle_growth=args.ventricle_growth, brain_shrink=args.brain_shrink,
                               sigma_mm=args.sigma_mm, noise=args.noise)
    subjects = choose_subjects(bids, labels_dir, args)
    src_desc = json.loads((bids / "dataset_description.json").read_text())
    base = datetime(2020, 1, 6, 9, 0, 0)
    rows, truth = [], []
    for i, s in enumerate(subjects):
        t0 = time.time()
        img, seg = nib.load(s["t1"]), nib.load(s["seg"])
        if img.shape[:3] != seg.shape[:3] or not np.allclose(img.affine, seg.affine, atol=1e-3):
            sys.exit(f"error: {s['seg']} is not on the grid of {s['t1']}")
        subj = simulate_subject_from_arrays(
            s["sub"], img.get_fdata(dtype=np.float32), np.asarray(seg.dataobj), img.affine, args.months,
            settings, args.seed + i, s["age"], s["sex"], source=f"bids::sub-{s['sub']}/anat/{s['t1'].name}",
        )
        truth += write_subject(args.out, subj, base + timedelta(days=7 * i), header=img.header)
        rows.append({"participant_id": f"sub-{s['sub']}", "age": s["age"], "sex": s["sex"],
                     "source_participant": f"sub-{s['sub']}"})
        last = subj.sessions[-1].truth
        first = subj.sessions[0].truth
        print(f"sub-{s['sub']}: ventricles {first['ventricles_mm3'] / 1000:.1f} -> "
              f"{last['ventricles_mm3'] / 1000:.1f} mL, "
              f"parenchyma {first['parenchyma_mm3'] / 1000:.0f} -> {last['parenchyma_mm3'] / 1000:.0f} mL, "
              f"min Jacobian {min(x.truth['min_jacobian'] for x in subj.sessions):.2f} ({time.time() - t0:.1f} s)",
              flush=True)
    write_dataset(
        args.out, rows, truth, settings,
        name=f"{src_desc.get('Name', bids.name)}: simulated longitudinal ({len(rows)} subjects)",
        source={"URL": str(bids), "Version": src_desc.get("Name", "")},
        license=src_desc.get("License"), acknowledgements=src_desc.get("Acknowledgements"), seed=args.seed,
    )
    print(f"wrote {args.out} ({len(rows)} subjects x {len(args.months)} sessions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
