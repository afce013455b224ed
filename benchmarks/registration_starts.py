#!/usr/bin/env python
"""Is a registration at its optimum? The affine registration of each subject from rotated starts (issue 7, QC).

For each ``--participant-label`` subject of a BIDS dataset: deepbet's brain mask, then the preprocess stage's
registration (``register_batch``, default schedule) started from the usual initialisation (centres of mass and
volume) and from that initialisation rotated about the template brain's centre by each of ``--degrees`` around
one axis at a time (``--axes``: pitch = left-right axis, roll = front-back, yaw = up-down). All starts of a
subject run as one batch. For each start: NCC to the template inside its brain mask and the Dice of the warped
mask with the template's (``alignment_qc``, what the preprocess sidecar's QC records).

If every start ends at the same figures, the usual start found the optimum of the registration's objective, and a
subject that the group QC flags (``collect-qc``) differs from the template at that optimum; if a rotated start
ends higher, the usual start stopped in a local optimum.

With ``--tilt-input``, the input head is turned instead (its affine rotated by each angle about each axis, as a
scan of a tilted head would be), and registered as the preprocess stage does (``--starts default``: with the
extra coarse-level starts of ``register.DEFAULT_STARTS``; ``none``: from the centres-of-mass start alone, as before
they existed): a registration that recovers the tilt ends at the untilted figures.

Usage::

    python benchmarks/registration_starts.py --participant-label IXI335 IXI012 [--bids ../shared/data/ixi]
        [--degrees -20 -10 10 20] [--axes pitch] [--threads 2] [--out benchmarks/results]
    python benchmarks/registration_starts.py --participant-label IXI012 --tilt-input --starts none|default ...

Writes ``registration_starts.json`` and ``.md`` (``registration_tilt.*`` with ``--tilt-input``) to ``--out``;
exits 0 with a message when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

AXES = {"pitch": 0, "roll": 1, "yaw": 2}  # rotation about the RAS x (left-right), y (front-back), z (up-down) axis


def starts(init: np.ndarray, centre: np.ndarray, axes: list[str], degrees: list[float]) -> dict[str, np.ndarray]:
    """The usual template-to-native start and its rotations about the template point ``centre``."""
    from ldae_bids.preprocessing.register import rotation_about

    out = {"usual": init}
    for name in axes:
        for deg in degrees:
            out[f"{name} {deg:+g}"] = init @ rotation_about(AXES[name], deg, centre)
    return out


def run(args) -> dict:
    import nibabel as nib
    import torch

    from ldae_bids.preprocessing import brain as bet
    from ldae_bids.preprocessing.pipeline import load_template
    from ldae_bids.preprocessing.register import (DEFAULT_STARTS, START_KEEP_STEP, alignment_qc, initial_transform,
                                                  mask_centre_world, register_batch)

    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    tpl = load_template()
    subjects = []
    for label in args.participant_label:
        label = label.removeprefix("sub-")
        path = args.bids / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        img = nib.load(str(path))
        mask = np.asarray(bet.brain_mask(img, dev, precision="bf16").dataobj) > 0
        data = np.asarray(img.dataobj, dtype=np.float32)
        if args.tilt_input:  # the head turned, registered as the preprocess stage does
            turns = starts(np.eye(4), mask_centre_world(mask, img.affine), args.axes, args.degrees)
            affines = {name: turn @ img.affine for name, turn in turns.items()}  # about the brain's centre
            extra = DEFAULT_STARTS if args.starts == "default" else ()
            t0 = time.perf_counter()
            found = register_batch([data] * len(affines), [mask] * len(affines), list(affines.values()), tpl, dev,
                                   starts=extra, keep_step=START_KEEP_STEP if args.keep_step is None else args.keep_step)
            secs = time.perf_counter() - t0
            rows = {name: alignment_qc(data, mask, a, m, tpl, dev) for (name, a), m in zip(affines.items(), found)}
        else:
            inits = starts(initial_transform(mask, img.affine, tpl), tpl.centre_of_mass, args.axes, args.degrees)
            t0 = time.perf_counter()
            found = register_batch([data] * len(inits), [mask] * len(inits), [img.affine] * len(inits), tpl, dev,
                                   init=list(inits.values()), starts=())
            secs = time.perf_counter() - t0
            rows = {name: alignment_qc(data, mask, img.affine, m, tpl, dev) for name, m in zip(inits, found)}
        best = max(rows, key=lambda k: rows[k]["ncc_to_template"])
        subjects.append({"subject": f"sub-{label}", "starts": rows, "best_start": best,
                         "ncc_gain_over_usual": rows[best]["ncc_to_template"] - rows["usual"]["ncc_to_template"],
                         "seconds": secs})
        print(f"sub-{label}: usual NCC {rows['usual']['ncc_to_template']:.4f} Dice "
              f"{rows['usual']['mask_dice_to_template']:.4f}; best start {best} "
              f"(+{subjects[-1]['ncc_gain_over_usual']:.4f} NCC)", flush=True)
    return {"command": "python benchmarks/registration_starts.py " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "axes": args.axes, "degrees": args.degrees,
            "tilt_input": args.tilt_input, "starts": args.starts if args.tilt_input else "rotated (this benchmark's)",
            "extra_starts": [list(s) for s in DEFAULT_STARTS] if args.tilt_input and args.starts == "default" else [],
            "keep_step": (START_KEEP_STEP if args.keep_step is None else args.keep_step)
            if args.tilt_input and args.starts == "default" else None,
            "subjects": subjects}


def markdown(rep: dict) -> str:
    if rep.get("tilt_input"):
        L = ["# Registration of tilted heads", "", f"Date: {rep['date']}. Command: `{rep['command']}`", "",
             "Per subject: NCC to the template inside its brain mask / Dice of the warped brain mask with the "
             "template's, after the preprocess stage's registration of the head as scanned (`usual`) and turned by "
             "each angle about its brain's centre; extra coarse-level starts: "
             + (", ".join(f"axis {a} {d:+g} degrees" for a, d in rep["extra_starts"]) or "none")
             + (f" (each subject keeps its best start after coarse-level step {rep['keep_step']})"
                if rep.get("keep_step") is not None else "") + ".", ""]
    else:
        L = ["# Registration from rotated starts", "", f"Date: {rep['date']}. Command: `{rep['command']}`", "",
             "Per subject: NCC to the template inside its brain mask / Dice of the warped brain mask with the "
             "template's, after the preprocess stage's registration from the usual start and from rotated ones.", ""]
    names = list(rep["subjects"][0]["starts"]) if rep["subjects"] else []
    last = "worst: NCC below usual" if rep.get("tilt_input") else "best start: NCC gain"
    L += ["| subject | " + " | ".join(names) + f" | {last} |", "|---" * (len(names) + 2) + "|"]
    for s in rep["subjects"]:
        rows = s["starts"]
        cells = [f"{rows[n]['ncc_to_template']:.4f} / {rows[n]['mask_dice_to_template']:.4f}" for n in names]
        if rep.get("tilt_input"):
            worst = min(rows, key=lambda k: rows[k]["ncc_to_template"])
            tail = f"{worst}: {rows[worst]['ncc_to_template'] - rows['usual']['ncc_to_template']:+.4f}"
        else:
            tail = f"{s['best_start']}: {s['ncc_gain_over_usual']:+.4f}"
        L.append(f"| {s['subject']} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--participant-label", nargs="+", required=True)
    ap.add_argument("--degrees", nargs="+", type=float, default=[-20, -10, 10, 20])
    ap.add_argument("--axes", nargs="+", choices=sorted(AXES), default=["pitch"])
    ap.add_argument("--tilt-input", action="store_true", help="turn the input head instead of the start")
    ap.add_argument("--starts", choices=["default", "none"], default="default",
                    help="with --tilt-input: the registration's extra coarse-level starts, or none")
    ap.add_argument("--keep-step", type=int, default=None,
                    help="with --starts default: the coarse-level step after which each subject keeps its best start "
                    "(default: the preprocess stage's, register.START_KEEP_STEP; 100 = the level's end)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.bids.is_dir():
        print(f"registration_starts: {args.bids} not found (../shared absent?); nothing measured")
        return 0
    if not os.environ.get("TEMPLATEFLOW_HOME") and (REPO.parent / "shared" / "templateflow").is_dir():
        os.environ["TEMPLATEFLOW_HOME"] = str(REPO.parent / "shared" / "templateflow")
    rep = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "registration_tilt" if args.tilt_input else "registration_starts"
    (args.out / f"{name}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
