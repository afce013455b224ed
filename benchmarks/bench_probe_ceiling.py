#!/usr/bin/env python
"""What a linear probe can read from each representation of the same images (issue 5).

The age and sex probes on y_sem are compared, in the same folds, with the same probe run on:

- ``voxels``: the model-ready image itself (every voxel inside the union of the brain masks): the input
  of both encoders, so what a linear read-out of the preprocessed image gives;
- ``latent``: the autoencoder latent of that image (posterior mean, scaled; 28,800 numbers for the compact
  preset), what the diffusion autoencoder works on;
- ``y_sem``: the semantic code (512 numbers for the compact preset);
- ``roi``: the classical baseline, regional volumes from a native-space segmentation (DLMUSE).

Every row uses the app's own probe (:func:`ldae_bids.analysis.probe.fit_probe`: subject-grouped K-fold CV,
ridge / logistic regression with the regularisation chosen inside the training folds, 95% subject-bootstrap
intervals) with the same seed, so the folds are the same for every representation. Only subjects with
an image and every feature are used. Writes ``probe_ceiling.json`` and ``probe_ceiling.md`` to ``--out``;
skips with a message (exit 0) when the data, the bundle or the participants table is absent.

Usage::

    python benchmarks/bench_probe_ceiling.py --data /work/cache/ixi-preproc --bids ../shared/data/ixi \\
        [--bundle BUNDLE] [--targets age sex] [--n-boot 1000] [--out benchmarks/results]

``--compare-data DIR --compare-label n4`` adds the voxels, latent and y_sem of a second set of model-ready images
of the same subjects (e.g. preprocessed with N4 bias-field correction), with paired differences to the same
representation of ``--data``: what a preprocessing choice changes in what a linear probe can read.
``--compare-bundle B`` encodes those images with another bundle (e.g. one fine-tuned on them): what the choice
changes once the model is trained for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# y_sem_mirror, y_sem_shift: y_sem averaged over test-time views of the image (--views), the left-right mirror
# about the template's midline and one-voxel shifts along each axis
FEATURES = ("voxels", "latent", "y_sem", "y_sem_mirror", "y_sem_shift", "roi")
HEADLINE = {"regression": "mae", "classification": "auroc"}


def mirror_lr(x):
    """Left-right mirror of (B, 1, X, Y, Z) model-ready images about the template midline.

    The compact crop starts at voxel 9 of the 97-voxel template grid, whose x = 0 lies at voxel 48.25, so crop
    index i mirrors to about 78 - i (a plain flip maps it to 79 - i; the template brain mask overlaps its mirror
    0.988 either way); the voxel rolled in is background."""
    import torch

    return torch.roll(torch.flip(x, dims=[2]), shifts=-1, dims=2)


def shifted_views(x):
    """The image and its one-voxel shifts (+-1 along each axis): seven views."""
    import torch

    return [x] + [torch.roll(x, shifts=d, dims=a) for a in (2, 3, 4) for d in (-1, 1)]


def read_table(path: Path) -> dict[str, dict[str, str]]:
    """``{label without 'sub-': row}`` of a BIDS-style TSV with a participant_id column."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str)
    return {str(r["participant_id"]).removeprefix("sub-"): r for r in df.to_dict("records")}


def image_features(data: Path, labels: list[str], pipe, shape, batch: int, views: bool = False):
    """Voxels (inside the union of the masks), scaled latents and y_sem of each subject's model-ready image;
    with ``views``, also y_sem averaged with that of the mirrored image, and over seven shifted views."""
    import torch

    from ldae_bids.model.data import load_volume

    vols = np.stack([load_volume(data / f"sub-{s}_desc-preproc_T1w.nii.gz", shape) for s in labels])
    union = np.zeros(shape, bool)
    for s in labels:
        mask = data / f"sub-{s}_desc-brain_mask.nii.gz"
        union |= load_volume(mask, shape) > 0.5 if mask.is_file() else np.ones(shape, bool)
    latents, codes, mirrored, shifted = [], [], [], []
    for i in range(0, len(labels), batch):
        x = torch.from_numpy(vols[i:i + batch])[:, None]
        latents.append(pipe.encode_latent(x).flatten(1).cpu().numpy())
        y = pipe.encode_semantic(x).cpu().numpy()
        codes.append(y)
        if views:
            mirrored.append((y + pipe.encode_semantic(mirror_lr(x)).cpu().numpy()) / 2)
            shifted.append(np.mean([pipe.encode_semantic(v).cpu().numpy() for v in shifted_views(x)], axis=0))
    out = {"voxels": vols[:, union].astype(np.float32), "latent": np.concatenate(latents),
           "y_sem": np.concatenate(codes)}
    if views:
        out |= {"y_sem_mirror": np.concatenate(mirrored), "y_sem_shift": np.concatenate(shifted)}
    return out


def paired(fits: dict, pairs: list[tuple[str, str]], n_boot: int, seed: int) -> dict[str, dict]:
    """Paired differences of the headline metric, ``name`` minus ``reference`` for each ``(name, reference)``: the
    same rows, folds and subject-bootstrap draws (for MAE a negative difference favours ``name``)."""
    from ldae_bids.analysis.metrics import evaluate, subject_bootstrap_weights

    out = {}
    if n_boot <= 0:
        return out
    for name, reference in pairs:
        res, ref = fits.get(name), fits.get(reference)
        if res is None or ref is None or not np.array_equal(res.row_index, ref.row_index):
            continue
        key = HEADLINE[ref.kind]
        _, deltas = evaluate((key,), ref.y, {name: res.models["probe"].oof, reference: ref.models["probe"].oof},
                             subject_bootstrap_weights(ref.groups, n_boot, seed), reference=name)
        d = deltas[f"{name}-{reference}"][key]
        out[name] = {"value": d.value, "ci_low": d.low, "ci_high": d.high}
    return out


def paired_to_y_sem(fits: dict, n_boot: int, seed: int) -> dict[str, dict]:
    """Paired difference of each representation's headline metric minus y_sem's (see :func:`paired`)."""
    return paired(fits, [(name, "y_sem") for name in fits if name != "y_sem" and ":" not in name], n_boot, seed)


def markdown(result: dict) -> str:
    lines = [
        "# What a linear probe reads from each representation (issue 5)", "",
        f"Date: {result['date']}. Command: `{result['command']}`", "",
        f"Bundle `{result['bundle']['name']}` (content hash `{result['bundle']['content_hash'][:16]}...`); "
        f"{result['n_subjects']} subjects with an image and every feature; {result['n_splits']}-fold "
        f"subject-grouped CV, seed {result['seed']}, the same folds for every row; 95% subject-bootstrap "
        f"intervals ({result['n_boot']} draws). Probe: the app's `fit_probe` (ridge / logistic regression, "
        "regularisation chosen inside the training folds).", "",
        "| features | dimensions | " + " | ".join(f"{t} {HEADLINE[k]} | {t}: minus y_sem (paired)"
                                                for t, k in result["kinds"].items()) + " |",
        "|---|---|" + "---|---|" * len(result["kinds"]),
    ]
    for name, row in result["features"].items():
        cells = []
        for target in result["kinds"]:
            m = row["targets"].get(target)
            cells.append("n/a" if m is None else f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
            d = (m or {}).get("minus_y_sem")
            cells.append("" if d is None else f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        lines.append(f"| {name} | {row['dim']:,} | " + " | ".join(cells) + " |")
    first = result["features"][next(iter(result["features"]))]["targets"]
    lines += ["", "Rows with the target (the others are dropped): " + ", ".join(
        f"{t} {m['n_rows']}" for t, m in first.items()) + ".", "Trivial predictor (training-fold mean / class prior), same folds: " + ", ".join(
        f"{t} {HEADLINE[result['kinds'][t]]} {v:.3f}" for t, v in result["trivial"].items()) + ".", "",
        "voxels = the model-ready image (inside the union of the brain masks), latent = its autoencoder "
        "latent, y_sem = the semantic code, roi = regional volumes of a native-space segmentation."]
    compare = result.get("compare")
    if compare:
        other = compare.get("bundle", result["bundle"])
        by = "" if other["content_hash"] == result["bundle"]["content_hash"] else (
            f", encoded by bundle `{other['name']}` (content hash `{other['content_hash'][:16]}...`)")
        lines += ["", f"`NAME:{compare['label']}` rows: the same representation of the images in `{compare['data']}`{by} "
                  f"(the same subjects, folds and draws), against the images of `--data`:", "",
                  "| features | " + " | ".join(f"{t}: {compare['label']} minus --data (paired)"
                                                for t in result["kinds"]) + " |",
                  "|---|" + "---|" * len(result["kinds"])]
        for name, row in result["features"].items():
            if ":" not in name:
                continue
            cells = []
            for target in result["kinds"]:
                d = (row["targets"].get(target) or {}).get("minus_base")
                cells.append("" if d is None else f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "y_sem_mirror" in result["features"]:
        lines += ["y_sem_mirror = the mean of y_sem of the image and of its left-right mirror (about the template "
                  "midline); y_sem_shift = the mean of y_sem over the image and its six one-voxel shifts."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/cache/ixi-preproc"),
                    help="model-ready images sub-<l>_desc-preproc_T1w.nii.gz (bench_preprocess.py --save-dir)")
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi",
                    help="dataset with participants.tsv (and derivatives/dlmuse/roi_volumes.tsv)")
    ap.add_argument("--roi", type=Path, default=None, help="classical features TSV (default: BIDS/derivatives/"
                    "dlmuse/roi_volumes.tsv)")
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--targets", nargs="+", default=["age", "sex"])
    ap.add_argument("--n-splits", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many subjects (tests)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--features", nargs="+", choices=FEATURES, default=None,
                    help="probe only these representations (default: all; y_sem is the paired reference)")
    ap.add_argument("--views", action="store_true", help="also y_sem averaged over test-time views: with the "
                    "left-right mirror (y_sem_mirror), over one-voxel shifts (y_sem_shift)")
    ap.add_argument("--compare-data", type=Path, default=None,
                    help="model-ready images of the same subjects made another way (e.g. bench_preprocess.py "
                    "--bias-correction n4 --save-dir): voxels, latent and y_sem of these too, as rows NAME:LABEL, "
                    "with paired differences to the same representation of --data")
    ap.add_argument("--compare-label", default="compare", help="LABEL of the --compare-data rows")
    ap.add_argument("--compare-bundle", type=Path, default=None,
                    help="encode --compare-data with this bundle (default: --bundle), e.g. one trained on them")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if ":" in args.compare_label or not args.compare_label:
        ap.error("--compare-label must be a non-empty name without ':'")
    if args.compare_bundle and not args.compare_data:
        ap.error("--compare-bundle needs --compare-data")

    import torch

    from ldae_bids.analysis.probe import fit_probe
    from ldae_bids.model.bundle import default_bundle_path, load_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle_path = args.bundle or default_bundle_path()
    participants = args.bids / "participants.tsv"
    roi_path = args.roi or args.bids / "derivatives" / "dlmuse" / "roi_volumes.tsv"
    for path, what in ((bundle_path / "config.json", "model bundle"), (args.data, "model-ready images"),
                       (participants, "participants table")):
        if not path.exists():
            print(f"skipped: {what} not found at {path}")
            return 0
    mb = load_bundle(bundle_path, device="cpu")
    if args.compare_bundle and not (args.compare_bundle / "config.json").exists():
        print(f"skipped: model bundle not found at {args.compare_bundle}")
        return 0
    other_mb = load_bundle(args.compare_bundle, device="cpu") if args.compare_bundle else mb
    people = read_table(participants)
    roi = read_table(roi_path) if roi_path.is_file() else {}
    datasets = [args.data] + ([args.compare_data] if args.compare_data else [])
    labels = sorted(s for s in people if all((d / f"sub-{s}_desc-preproc_T1w.nii.gz").is_file() for d in datasets)
                    and (not roi or s in roi))[: args.limit]
    if len(labels) < 2 * args.n_splits:
        print(f"skipped: only {len(labels)} subjects with an image{' and ROI volumes' if roi else ''}")
        return 0
    t0 = time.time()
    feats = image_features(args.data, labels, mb.pipeline, tuple(mb.config.image_shape), args.batch_size,
                           views=args.views)
    if args.compare_data:
        other = image_features(args.compare_data, labels, other_mb.pipeline, tuple(other_mb.config.image_shape),
                               args.batch_size)
        feats |= {f"{k}:{args.compare_label}": v for k, v in other.items()}
    if roi:
        cols = [c for c in next(iter(roi.values())) if c != "participant_id"]
        feats["roi"] = np.array([[float(roi[s][c]) for c in cols] for s in labels])
    print(f"features of {len(labels)} subjects in {time.time() - t0:.0f} s: " + ", ".join(
        f"{k} {v.shape[1]}" for k, v in feats.items()), flush=True)
    groups = np.array(labels)
    result = {"benchmark": "probe_ceiling", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_probe_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "bundle": {"path": str(bundle_path), "name": mb.name, "content_hash": mb.content_hash},
              "data": str(args.data), "n_subjects": len(labels), "n_splits": args.n_splits, "n_boot": args.n_boot,
              "seed": args.seed, "environment": {"machine": platform.machine(), "torch": torch.__version__},
              "kinds": {}, "trivial": {}, "features": {}}
    if args.compare_data:
        result["compare"] = {"data": str(args.compare_data), "label": args.compare_label,
                             "bundle": {"path": str(args.compare_bundle or bundle_path), "name": other_mb.name,
                                        "content_hash": other_mb.content_hash}}
    feats = {k: v for k, v in feats.items() if not args.features or k.split(":")[0] in args.features}
    for target in args.targets:
        y = [people[s].get(target) for s in labels]
        fits = {}
        for name, X in feats.items():
            t = time.time()
            res = fits[name] = fit_probe(X, y, groups, n_splits=args.n_splits, seed=args.seed, n_boot=args.n_boot,
                                         target=target, feature_name=name)
            key = HEADLINE[res.kind]
            est = res.metrics[key]
            result["kinds"][target] = res.kind
            result["trivial"][target] = res.models["trivial"].metrics[key].value
            row = result["features"].setdefault(name, {"dim": int(X.shape[1]), "targets": {}})
            row["targets"][target] = {"metric": key, "value": est.value, "ci_low": est.low, "ci_high": est.high,
                                      "n_rows": res.n_rows, "seconds": round(time.time() - t, 1)}
            print(f"{target} from {name} ({X.shape[1]}): {key} {est.value:.3f} [{est.low:.3f}, {est.high:.3f}]",
                  flush=True)
        for name, delta in paired_to_y_sem(fits, args.n_boot, args.seed).items():
            result["features"][name]["targets"][target]["minus_y_sem"] = delta
        for name, delta in paired(fits, [(n, n.split(":")[0]) for n in fits if ":" in n], args.n_boot,
                                  args.seed).items():
            result["features"][name]["targets"][target]["minus_base"] = delta
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_ceiling.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "probe_ceiling.md").write_text(markdown(result))
    print(f"wrote {args.out / 'probe_ceiling.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
