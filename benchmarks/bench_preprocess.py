"""Benchmark of ldae_bids preprocessing on a BIDS dataset with DLMUSE reference masks.

Measures, per subject: brain-mask Dice of deepbet vs the DLMUSE reference (label > 0),
alignment to the template (NCC inside the template brain mask, Dice of the warped brain
mask vs the template brain mask), and seconds per step. Writes ``preprocess.json`` and
``preprocess.md`` to ``--out``; with ``--save-dir``, also every subject's model-ready image
``sub-<label>_desc-preproc_T1w.nii.gz`` and ``sub-<label>_desc-brain_mask.nii.gz`` (plus a
``DONE`` file when all are written).

Optional studies: ``--sweep`` (deepbet threshold/dilation vs Dice), normalisation
(percentile vs min-max, always on; cheap).

``--precision bf16`` runs the brain extraction network under bf16 autocast (the app's ``--precision``);
``--compare BASE.json OTHER.json`` only compares two earlier results subject by subject.

Usage::

    python benchmarks/bench_preprocess.py --bids ../shared/data/ixi --out benchmarks/results \
        [--save-dir DIR] [--limit N] [--device auto] [--precision fp32] [--grid compact] [--sweep]
    python benchmarks/bench_preprocess.py --compare benchmarks/results/preprocess.json \
        benchmarks/results/preprocess-bf16/preprocess.json --out benchmarks/results/preprocess-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SWEEP_DILATE = (-1, 0, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / s) if s else 1.0


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"


def find_subjects(bids: Path) -> list[tuple[str, Path, Path | None]]:
    out = []
    for t1 in sorted(bids.glob("sub-*/anat/sub-*_T1w.nii.gz")):
        sub = t1.name.split("_")[0]
        ref = sorted((bids / "derivatives" / "dlmuse" / sub / "anat").glob(f"{sub}*_desc-dlmuse_dseg.nii.gz"))
        out.append((sub, t1, ref[0] if ref else None))
    return out


def summarise(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {}
    return {
        "n": int(v.size),
        "median": float(np.median(v)),
        "mean": float(v.mean()),
        "min": float(v.min()),
        "p05": float(np.percentile(v, 5)),
        "max": float(v.max()),
    }


def normalisation_stats(image: np.ndarray, mask: np.ndarray, wm: np.ndarray | None = None) -> dict:
    """Brain-intensity quantiles (and the WM median) after each normalisation."""
    from ldae_bids.preprocessing import normalise

    out = {}
    for method in ("percentile", "minmax"):
        norm, _ = normalise(image, mask, method)
        q = np.percentile(norm[mask], [25, 50, 75, 99])
        out[method] = {"q25": float(q[0]), "median": float(q[1]), "q75": float(q[2]), "q99": float(q[3])}
        if wm is not None and (wm & mask).any():
            out[method]["wm_median"] = float(np.median(norm[wm & mask]))
    return out


WM_LABELS = tuple(range(81, 89))  # DLMUSE/MUSE lobar white matter (frontal, occipital, parietal, temporal; R/L)


def n4_correct(data: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """N4 bias-field correction (SimpleITK defaults, 4 levels x 50 iterations, shrink 2) inside ``mask``."""
    import SimpleITK as sitk

    spacing = [float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))]
    img = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).astype(np.float32))
    img.SetSpacing(spacing)
    msk = sitk.GetImageFromArray(np.transpose(mask, (2, 1, 0)).astype(np.uint8))
    msk.CopyInformation(img)
    small = sitk.Shrink(img, [2, 2, 2])
    small_mask = sitk.Shrink(msk, [2, 2, 2])
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50] * 4)
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    corrected = img / sitk.Exp(log_field)
    return np.transpose(sitk.GetArrayFromImage(corrected), (2, 1, 0)).astype(np.float32)


def wm_uniformity(data: np.ndarray, dseg: np.ndarray) -> dict:
    """Within-subject white-matter uniformity: voxel CV and CV of the 8 lobar WM medians."""
    wm = np.isin(dseg, WM_LABELS)
    vals = data[wm]
    medians = np.array([np.median(data[dseg == lab]) for lab in WM_LABELS if (dseg == lab).any()])
    return {"wm_voxel_cv": float(vals.std() / vals.mean()), "wm_lobe_median_cv": float(medians.std() / medians.mean())}


def n4_study(subjects, dev, n: int) -> dict:
    """With vs without N4 on ``n`` subjects: WM uniformity, deepbet Dice, registration quality, time."""
    import nibabel as nib

    from ldae_bids.preprocessing import load_t1w, load_template
    from ldae_bids.preprocessing import brain as bet
    from ldae_bids.preprocessing.register import alignment_qc, register_batch

    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        print("bench_preprocess: SimpleITK not installed; N4 study skipped.")
        return {}
    tpl = load_template()
    rows = []
    for sub, t1, ref in [s for s in subjects if s[2] is not None][:n]:
        img = load_t1w(t1)
        data = img.get_fdata(dtype=np.float32)
        dseg = np.rint(np.asarray(nib.load(str(ref)).dataobj)).astype(np.int32)
        refm = dseg > 0
        mask = np.asarray(bet.brain_mask(img, dev).dataobj) > 0
        t0 = time.perf_counter()
        corr = n4_correct(data, mask, img.affine)
        n4_s = time.perf_counter() - t0
        mask_n4 = np.asarray(bet.brain_mask(nib.Nifti1Image(corr, img.affine), dev).dataobj) > 0
        row = {"subject": sub, "n4_seconds": n4_s}
        for tag, d, m in (("raw", data, mask), ("n4", corr, mask_n4)):
            row[tag] = {**wm_uniformity(d, dseg), "bet_dice_vs_dlmuse": dice(m, refm)}
            (pull_m,) = register_batch([d], [m], [img.affine], tpl, dev)
            row[tag].update(alignment_qc(d, m, img.affine, pull_m, tpl, dev))
        rows.append(row)
        print(f"n4 {sub}: " + " ".join(f"{k}={row['raw'][k]:.4f}->{row['n4'][k]:.4f}" for k in row["raw"]), flush=True)
    summary = {}
    for key in rows[0]["raw"] if rows else []:
        raw = np.array([r["raw"][key] for r in rows])
        n4v = np.array([r["n4"][key] for r in rows])
        summary[key] = {"raw_median": float(np.median(raw)), "n4_median": float(np.median(n4v)),
                        "median_change": float(np.median(n4v - raw)), "n_improved": int((
                            (n4v < raw) if "cv" in key else (n4v > raw)).sum())}
    summary["n4_seconds_mean"] = float(np.mean([r["n4_seconds"] for r in rows])) if rows else None
    return {"n": len(rows), "summary": summary, "subjects": rows}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        "# Preprocessing benchmark",
        "",
        f"Data: `{report['bids']}` ({report['n_subjects']} subjects, {report['n_failed']} failed). "
        f"Device: {report['device']}, {report.get('threads', '?')} threads, brain extraction in "
        f"{report.get('precision', 'fp32')}. Grid: {report['grid']['name']} {report['grid']['shape']} "
        f"at {report['grid']['spacing']} mm. Date: {report['date']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| metric | median | mean | min | 5th pct | max |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in [
        ("bet_dice_vs_dlmuse", "brain-mask Dice vs DLMUSE (native)"),
        ("ncc_to_template", "NCC to template (in template brain mask)"),
        ("mask_dice_to_template", "Dice warped mask vs template mask"),
        ("brain_volume_ml", "brain volume (ml)"),
    ]:
        if s.get(key):
            v = s[key]
            lines.append(
                f"| {label} | {v['median']:.4f} | {v['mean']:.4f} | {v['min']:.4f} | {v['p05']:.4f} | {v['max']:.4f} |"
            )
    touching = s.get("subjects_with_mask_on_grid_face", {})
    lines += [
        "",
        "Subjects whose grid brain mask touches a face of the grid (i0/i1 = left/right, j0/j1 = "
        "back/front, k0/k1 = bottom/top): " + ", ".join(f"{k}: {v}" for k, v in touching.items()),
    ]
    lines += ["", "Seconds per subject per step (mean / median):", ""]
    lines += ["| step | mean s | median s |", "|---|---|---|"]
    for step, v in s["seconds"].items():
        lines.append(f"| {step} | {v['mean']:.2f} | {v['median']:.2f} |")
    lines += [
        "",
        "Timings on a shared 2-core CPU are noisy (other jobs run beside it); registration time is the batch",
        "time divided by the batch size.",
        "",
    ]
    for key, label in [
        ("bet_dice_vs_dlmuse", "Worst 5 brain masks (Dice vs DLMUSE)"),
        ("ncc_to_template", "Worst 5 alignments by NCC"),
        ("mask_dice_to_template", "Worst 5 alignments by mask Dice"),
    ]:
        rows = [r for r in report["subjects"] if r.get(key) is not None]
        rows.sort(key=lambda r: r[key])
        lines += [f"## {label}", "", "| subject | Dice vs DLMUSE | NCC | mask Dice to template |", "|---|---|---|---|"]
        for r in rows[:5]:
            lines.append(
                f"| {r['subject']} | {r.get('bet_dice_vs_dlmuse', float('nan')):.4f} | "
                f"{r['ncc_to_template']:.4f} | {r['mask_dice_to_template']:.4f} |"
            )
        lines.append("")
    if report.get("sweep"):
        lines += ["## deepbet threshold / dilation sweep (Dice vs DLMUSE)", ""]
        lines += ["| threshold | dilate | median | min | 5th pct |", "|---|---|---|---|---|"]
        for row in report["sweep"]:
            lines.append(
                f"| {row['threshold']} | {row['n_dilate']} | {row['median']:.4f} | {row['min']:.4f} | {row['p05']:.4f} |"
            )
        lines.append("")
    if report.get("normalisation"):
        lines += [
            "## Normalisation: between-subject spread of brain intensity quantiles",
            "",
            "Lower spread = more consistent intensities across subjects for the model.",
            "",
            "| method | quantile | mean | SD across subjects |",
            "|---|---|---|---|",
        ]
        for method, qs in report["normalisation"].items():
            for q, v in qs.items():
                lines.append(f"| {method} | {q} | {v['mean']:.4f} | {v['sd']:.4f} |")
        lines.append("")
    n4 = report.get("n4_study") or {}
    if n4.get("n"):
        lines += [
            f"## N4 bias-field correction study ({n4['n']} subjects, SimpleITK N4, mask = deepbet brain)",
            "",
            "WM uniformity uses the DLMUSE lobar white-matter labels 81-88 (lower CV = flatter field).",
            "",
            "| metric | without N4 (median) | with N4 (median) | median change | subjects improved |",
            "|---|---|---|---|---|",
        ]
        for key, v in n4["summary"].items():
            if isinstance(v, dict):
                lines.append(
                    f"| {key} | {v['raw_median']:.4f} | {v['n4_median']:.4f} | {v['median_change']:+.4f} | "
                    f"{v['n_improved']}/{n4['n']} |"
                )
        lines += ["", f"N4 costs {n4['summary'].get('n4_seconds_mean', float('nan')):.1f} s per subject here.", ""]
    if report["failed"]:
        lines += ["## Failed", ""] + [f"- {f['subject']}: {f['error']}" for f in report["failed"]] + [""]
    return "\n".join(lines)


def bias_choice(choice: str) -> str | None:
    """``n4`` / ``None`` for ``--bias-correction``; ``bundle`` reads the shipped model's ``intensity`` record."""
    if choice != "bundle":
        return None if choice == "none" else "n4"
    from ldae_bids.runtime import default_model_path

    meta = json.loads((default_model_path() / "metadata.json").read_text())
    return (meta.get("intensity") or {}).get("bias_correction")


def compare(base_path: Path, other_path: Path, labels: list[str] | None = None) -> tuple[dict, str]:
    """Per-subject paired differences (other - base) of two preprocess.json files, e.g. bf16 against fp32.

    ``labels`` (base, other) name the two runs in the title (default: their precisions). Seconds are compared too
    (``seconds.<step>``), but they are only comparable when both runs had the same machine and threads."""
    base, other = json.loads(base_path.read_text()), json.loads(other_path.read_text())
    rows_a = {r["subject"]: r for r in base["subjects"]}
    rows_b = {r["subject"]: r for r in other["subjects"]}
    common = sorted(set(rows_a) & set(rows_b))
    out = {"base": str(base_path), "other": str(other_path), "n_common": len(common),
           "base_precision": base.get("precision", "fp32"), "other_precision": other.get("precision", "fp32"),
           "metrics": {}}
    def get(row: dict, key: str):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        return row

    for key in ("bet_dice_vs_dlmuse", "ncc_to_template", "mask_dice_to_template", "brain_volume_ml",
                "seconds.brain_extraction", "seconds.registration"):
        pairs = [(s, get(rows_a[s], key), get(rows_b[s], key)) for s in common]
        pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        d = np.array([b - a for _, a, b in pairs])
        worst = int(np.argmax(np.abs(d)))
        out["metrics"][key] = {"base_mean": float(np.mean([a for _, a, _ in pairs])),
                               "other_mean": float(np.mean([b for _, _, b in pairs])),
                               "diff_mean": float(d.mean()), "diff_min": float(d.min()), "diff_max": float(d.max()),
                               "worst_subject": pairs[worst][0]}
    base_label, other_label = labels or (out["base_precision"], out["other_precision"])
    out["labels"] = [base_label, other_label]
    lines = [f"# Preprocessing: {other_label} against {base_label}", "",
             f"`{other_path}` against `{base_path}`, {len(common)} subjects in both (paired, other - base).", "",
             "| metric | base mean | other mean | difference mean | min | max | largest on |",
             "|---|---|---|---|---|---|---|"]
    for key, m in out["metrics"].items():
        lines.append(f"| {key} | {m['base_mean']:.4f} | {m['other_mean']:.4f} | {m['diff_mean']:+.5f} | "
                     f"{m['diff_min']:+.5f} | {m['diff_max']:+.5f} | {m['worst_subject']} |")
    return out, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare-labels", nargs=2, default=None, metavar=("BASE", "OTHER"),
                    help="names of the two --compare runs in the title (default: their precisions)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BASE.json", "OTHER.json"),
                    help="only compare two earlier preprocess.json results per subject (writes preprocess_compare.*)")
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--save-dir", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="arithmetic of the brain extraction network (the app's --precision; auto as the app)")
    ap.add_argument("--grid", default="compact", choices=["compact", "paper"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n4-study", type=int, default=0, metavar="N",
                    help="compare with/without N4 bias correction on N subjects (needs SimpleITK)")
    ap.add_argument("--n4-only", action="store_true", help="run only the N4 study")
    ap.add_argument("--sweep", action="store_true", help="deepbet threshold/dilation sweep (one extra deepbet run per subject)")
    ap.add_argument("--bias-correction", choices=["bundle", "n4", "none"], default="bundle",
                    help="N4 or not; 'bundle' (default): as the shipped model's metadata.json records, so --save-dir "
                         "images match what the preprocess stage writes with the default model")
    args = ap.parse_args(argv)
    if args.compare:
        result, md = compare(*args.compare, labels=args.compare_labels)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "preprocess_compare.json").write_text(json.dumps(result, indent=1))
        (args.out / "preprocess_compare.md").write_text(md)
        print(md)
        return 0

    if not args.bids.is_dir():
        print(f"bench_preprocess: data folder {args.bids} not found; skipping.")
        return 0
    if not os.environ.get("TEMPLATEFLOW_HOME") and (REPO.parent / "shared" / "templateflow").is_dir():
        os.environ["TEMPLATEFLOW_HOME"] = str(REPO.parent / "shared" / "templateflow")
        print(f"bench_preprocess: TEMPLATEFLOW_HOME={os.environ['TEMPLATEFLOW_HOME']}")

    import nibabel as nib
    import torch

    from ldae_bids.preprocessing import Grid, preprocess_batch, resample_to_grid, resolve_device
    from ldae_bids.preprocessing import brain as bet

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    from ldae_bids.device import resolve_precision

    precision = resolve_precision(dev, args.precision)
    grid = Grid.from_name(args.grid)
    subjects = find_subjects(args.bids)[: args.limit]
    if not subjects:
        print(f"bench_preprocess: no sub-*/anat/*_T1w.nii.gz under {args.bids}; skipping.")
        return 0
    n4_report = n4_study(subjects, dev, args.n4_study) if args.n4_study else {}
    if args.n4_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "n4_study.json").write_text(json.dumps(n4_report, indent=1))
        return 0
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        (args.save_dir / "DONE").unlink(missing_ok=True)
    bias = bias_choice(args.bias_correction)
    print(f"bench_preprocess: bias correction {bias or 'none'} (--bias-correction {args.bias_correction})")
    bs = args.batch_size or (16 if dev.type == "cuda" else 4)
    records, failed, sweep_rows = [], [], []
    t_start = time.perf_counter()
    for start in range(0, len(subjects), bs):
        chunk = subjects[start : start + bs]
        results = preprocess_batch([str(s[1]) for s in chunk], grid, device=dev, batch_size=bs,
                                   bias_correction=bias, precision=precision)
        for (sub, t1, ref), res in zip(chunk, results):
            if isinstance(res, BaseException):
                failed.append({"subject": sub, "error": str(res)})
                print(f"{sub}: FAILED {res}", flush=True)
                continue
            rec = {"subject": sub, **{k: v for k, v in res.qc.items() if k != "seconds"}, "seconds": res.qc["seconds"]}
            mask = np.asarray(res.mask_native.dataobj) > 0
            refm = None
            if ref is not None:
                refm = np.asarray(nib.load(str(ref)).dataobj) > 0
                rec["bet_dice_vs_dlmuse"] = dice(mask, refm) if refm.shape == mask.shape else None
                rec["reference_volume_ml"] = float(refm.sum() * abs(np.linalg.det(res.mask_native.affine[:3, :3])) / 1000)
            if args.sweep and refm is not None:
                img = nib.load(str(t1))
                prob, bbox, canon = bet.brain_probability(img, dev)
                refc = np.asarray(nib.as_closest_canonical(nib.load(str(ref))).dataobj) > 0
                rec["sweep"] = {
                    f"{t}:{d}": dice(bet.postprocess(prob, bbox, t, d) > 0, refc)
                    for t in SWEEP_THRESHOLDS
                    for d in SWEEP_DILATE
                }
            # Normalisation comparison on the unscaled grid image (WM = DLMUSE labels 81-88 pulled to the grid).
            wm_grid = None
            if refm is not None:
                dseg = np.rint(np.asarray(nib.load(str(ref)).dataobj)).astype(np.int32)
                wm = np.isin(dseg, WM_LABELS)
                _, wm_grid = resample_to_grid(
                    wm.astype(np.float32), wm, res.mask_native.affine, res.template_to_native, grid, dev
                )
            rec["normalisation"] = normalisation_stats(
                res.image_unscaled.get_fdata(dtype=np.float32), np.asarray(res.mask_grid.dataobj) > 0, wm_grid
            )
            records.append(rec)
            if args.save_dir:
                nib.save(res.image, str(args.save_dir / f"{sub}_desc-preproc_T1w.nii.gz"))
                nib.save(res.mask_grid, str(args.save_dir / f"{sub}_desc-brain_mask.nii.gz"))
                # the QC block the preprocess stage puts in its sidecar (brain volume: a probe covariate)
                (args.save_dir / f"{sub}_desc-preproc_T1w.json").write_text(json.dumps({"QC": res.qc}, indent=1))
            print(
                f"{sub}: dice_dlmuse={rec.get('bet_dice_vs_dlmuse', float('nan')):.4f} "
                f"ncc={rec['ncc_to_template']:.3f} dice_tpl={rec['mask_dice_to_template']:.3f} "
                + " ".join(f"{k}={v:.1f}s" for k, v in rec["seconds"].items()),
                flush=True,
            )
    total = time.perf_counter() - t_start

    if args.sweep and records and "sweep" in records[0]:
        for key in records[0]["sweep"]:
            t, d = key.split(":")
            st = summarise([r["sweep"][key] for r in records if "sweep" in r])
            sweep_rows.append({"threshold": float(t), "n_dilate": int(d), **st})
    norm_summary = {}
    for method in ("percentile", "minmax"):
        norm_summary[method] = {}
        for q in ("q25", "median", "q75", "q99", "wm_median"):
            v = np.asarray([r["normalisation"][method][q] for r in records if q in r["normalisation"][method]])
            if v.size == 0:
                continue
            norm_summary[method][q] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0}
    steps = sorted({k for r in records for k in r["seconds"]}, key=lambda k: list(records[0]["seconds"]).index(k))
    summary = {
        key: summarise([r.get(key) for r in records])
        for key in ("bet_dice_vs_dlmuse", "ncc_to_template", "mask_dice_to_template", "brain_volume_ml")
    }
    summary["seconds"] = {k: summarise([r["seconds"][k] for r in records]) for k in steps}
    summary["seconds"]["total_per_subject"] = summarise([sum(r["seconds"].values()) for r in records])
    summary["wall_seconds_total"] = total
    faces = ("i0", "i1", "j0", "j1", "k0", "k1")
    summary["subjects_with_mask_on_grid_face"] = {
        f: int(sum(r["mask_voxels_on_grid_faces"][f] > 0 for r in records)) for f in faces
    }
    report = {
        "bids": str(args.bids),
        "command": "python benchmarks/bench_preprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device_name(dev),
        "precision": precision,
        "threads": args.threads,
        "grid": grid.to_dict(),
        "n_subjects": len(subjects),
        "n_failed": len(failed),
        "params": results[0].params if results and not isinstance(results[0], BaseException) else None,
        "summary": summary,
        "sweep": sweep_rows,
        "normalisation": norm_summary,
        "n4_study": n4_report,
        "failed": failed,
        "subjects": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(report, indent=1))
    (args.out / "preprocess.md").write_text(markdown(report))
    if args.save_dir:
        (args.save_dir / "grid.json").write_text(json.dumps(grid.to_dict(), indent=1))
        if records:
            (args.save_dir / "preprocess_params.json").write_text(json.dumps(report["params"], indent=1))
        (args.save_dir / "DONE").touch()
    b = summary.get("bet_dice_vs_dlmuse", {})
    print(
        f"done: {len(records)} ok, {len(failed)} failed in {total:.0f}s; Dice vs DLMUSE median "
        f"{b.get('median', float('nan')):.4f} min {b.get('min', float('nan')):.4f}; NCC median "
        f"{summary['ncc_to_template'].get('median', float('nan')):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
