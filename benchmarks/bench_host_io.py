#!/usr/bin/env python
"""Host-side time of a participant batch: reading inputs and writing outputs, serial against threaded (issue 7).

On a GPU the model work of a batch of subjects takes a fraction of a second, so what the host does around
it (decompressing the raw T1w, writing the gzipped NIfTI outputs, sidecars and SVG figures) bounds the
participant level. The stages do that host work through ``StageContext.for_each``, which spreads a batch's
items over ``--nprocs`` threads. This script times exactly those code paths of the app, the stages' own
``load_t1w``, ``PreprocessStage._write`` and ``ReconstructStage._write``, on real IXI subjects, with 1 thread
and with more, so the saving is measured rather than assumed:

1. the app preprocesses N subjects once (``participant --stages preprocess``; reused when WORK has them);
2. for each thread count, a fresh output folder: read the N raw T1w, write the N preprocess outputs (image,
   masks, transform, sidecars, QC figure), compute the batch's reconstruction SSIM/MSE (one batched call on
   ``--device``, as the reconstruct stage does) and write the N reconstruct outputs (image, sidecar,
   figure); each per-subject phase is one ``for_each`` over the batch; best of ``--repeats``.

Usage::

    python benchmarks/bench_host_io.py [--bids ../shared/data/ixi] [--n-subjects 8] [--threads 1 2] \\
        [--repeats 3] [--work /tmp/bench-host-io] [--out benchmarks/results]

Writes ``host_io.json`` and ``host_io.md`` to ``--out``. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_analyses import App, BenchError, bundle_info  # noqa: E402
from bench_participant import machine, run_and_write  # noqa: E402

PHASES = ("read raw T1w", "write preprocess outputs", "reconstruct SSIM/MSE (batched, on the device)",
          "write reconstruct outputs")


def preprocessed(args, model: Path, labels: list[str]) -> Path:
    """An output folder with the app's preprocess outputs of ``labels``."""
    out = args.work / "preprocessed"
    app = App(args.work, model, args.nprocs, validate=False)
    rec = app("preprocess", args.bids, out, "participant", "--participant-label", *labels, "--stages", "preprocess",
              "--device", "cpu")
    if rec["failed"]:
        raise BenchError(f"preprocess failed: {rec['failed']}")
    return out


def results_from(out: Path, sessions, grid):
    """The PreprocResults of ``sessions`` rebuilt from the files the app wrote (what ``_write`` is given)."""
    import nibabel as nib
    import numpy as np

    from ldae_bids.bids import outputs
    from ldae_bids.bids.writer import DerivativesWriter
    from ldae_bids.preprocessing.pipeline import PreprocResult

    w = DerivativesWriter(out, out)
    res = []
    for ses in sessions:
        img = nib.load(w.path(**outputs.preproc_t1w(ses, grid.res_label), extension=".nii.gz"))
        side = json.loads(w.path(**outputs.preproc_t1w(ses, grid.res_label), extension=".json").read_text())
        mask_native = nib.load(w.path(**outputs.brain_mask_native(ses), extension=".nii.gz"))
        mask_grid = nib.load(w.path(**outputs.brain_mask_grid(ses, grid.res_label), extension=".nii.gz"))
        res.append(PreprocResult(
            image=nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine),
            mask_native=nib.Nifti1Image(np.asarray(mask_native.dataobj, np.uint8), mask_native.affine),
            mask_grid=nib.Nifti1Image(np.asarray(mask_grid.dataobj, np.uint8), mask_grid.affine),
            native_to_template=np.eye(4), qc=side.get("QC", {}), params=side.get("Parameters", {}), grid=grid))
    return res


def time_phases(args, model: Path, sessions, results, threads: int) -> dict:
    import numpy as np
    import torch

    from ldae_bids.config import build_settings
    from ldae_bids.metrics import similarity_batch
    from ldae_bids.preprocessing import load_t1w
    from ldae_bids.runner import Runner
    from ldae_bids.runtime import Resources
    from ldae_bids.stages.preprocess import PreprocessStage
    from ldae_bids.stages.reconstruct import ReconstructStage

    best = {p: float("inf") for p in PHASES}
    for _ in range(args.repeats):
        out = args.work / f"timing-{threads}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        settings = build_settings(bids_dir=args.bids, output_dir=out, analysis_level="participant", nprocs=threads,
                                  model=model, device="cpu")
        resources = Resources(settings)
        runner = Runner(settings, [PreprocessStage, ReconstructStage], resources)
        pre, rec = runner.stages
        ctx_pre, ctx_rec = runner._context(runner.stages[0]), runner._context(runner.stages[1])
        _ = resources.template_mask_on_grid  # loaded once per run by the app, not per batch
        grid = resources.grid
        t0 = time.perf_counter()
        ctx_pre.for_each(lambda ses: load_t1w(ses.t1w), sessions)
        t1 = time.perf_counter()
        ctx_pre.for_each(lambda item: pre._write(ctx_pre, *item, grid), list(zip(sessions, results)))
        t2 = time.perf_counter()
        loaded = [((np.asarray(r.image.dataobj, np.float32), np.asarray(r.mask_grid.dataobj) > 0, ses.t1w),
                   (None, ses.t1w), (None, ses.t1w)) for ses, r in zip(sessions, results)]
        images = torch.from_numpy(np.stack([ld[0][0] for ld in loaded]))[:, None].to(args.device)
        masks = torch.from_numpy(np.stack([ld[0][1] for ld in loaded]))[:, None].to(args.device)
        recons = images * 0.98  # any image of the grid: the cost does not depend on it
        t3 = time.perf_counter()  # (building those inputs is not timed)
        metrics = similarity_batch(images, recons, masks)
        t4 = time.perf_counter()
        host = recons.cpu().numpy()
        ctx_rec.for_each(lambda i: rec._write(ctx_rec, sessions[i], loaded[i], host[i, 0], metrics[i], 20),
                         range(len(sessions)))
        t5 = time.perf_counter()
        for phase, secs in zip(PHASES, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
            best[phase] = min(best[phase], secs)
    return {p: {"seconds": s, "per_subject": s / len(sessions)} for p, s in best.items()}


def run(args) -> dict:
    import pandas as pd

    from ldae_bids.bids.discover import SessionInput
    from ldae_bids.preprocessing import Grid

    model = args.model or (REPO / "ldae_bids" / "data" / "models" / "ldae-compact-ixi")
    parts = pd.read_csv(args.bids / "participants.tsv", sep="\t", dtype=str)
    labels = [p.removeprefix("sub-") for p in parts["participant_id"]][: args.n_subjects]
    t0 = time.perf_counter()
    out = preprocessed(args, model, labels)
    grid = Grid.from_dict(json.loads((model / "metadata.json").read_text())["grid"])
    sessions = []
    for label in labels:
        t1w = sorted((args.bids / f"sub-{label}" / "anat").glob(f"sub-{label}*_T1w.nii.gz"))[0]
        sessions.append(SessionInput(label, None, t1w, {"subject": label}))
    results = results_from(out, sessions, grid)
    timings = {str(k): time_phases(args, model, sessions, results, k) for k in args.threads}
    info = bundle_info(model)
    return {
        "command": "python benchmarks/bench_host_io.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.device),
        "settings": {"n_subjects": len(labels), "threads": list(args.threads), "repeats": args.repeats,
                     "device": args.device},
        "bundle": {k: info[k] for k in ("name", "content_hash")},
        "timings": timings, "total_seconds": time.perf_counter() - t0,
    }


def markdown(rep: dict) -> str:
    m, st = rep["machine"], rep["settings"]
    threads = [str(k) for k in st["threads"]]
    L = ["# Host-side time of a participant batch: serial against threaded writes (issue 7)", "",
         f"Date: {rep['date']}. Command: `{rep['command']}`", "",
         f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch {m['torch']}. One batch of "
         f"{st['n_subjects']} IXI subjects; best of {st['repeats']} repeats; the app's own code paths "
         "(`load_t1w`, `PreprocessStage._write`, `metrics.similarity_batch` on device "
         f"`{st['device']}`, `ReconstructStage._write`), the per-subject ones through `StageContext.for_each` "
         "(the SSIM/MSE phase is one batched call and does not use the threads).", "",
         "| phase | " + " | ".join(f"{t} thread(s): s / subject" for t in threads)
         + (f" | speed-up ({threads[-1]} vs {threads[0]}) |" if len(threads) > 1 else " |"),
         "|---|" + "---|" * (len(threads) + (1 if len(threads) > 1 else 0))]
    total = {t: 0.0 for t in threads}
    for phase in PHASES:
        cells = [rep["timings"][t][phase]["per_subject"] for t in threads]
        for t, c in zip(threads, cells):
            total[t] += c
        L.append(f"| {phase} | " + " | ".join(f"{c:.3f}" for c in cells)
                 + (f" | {cells[0] / cells[-1]:.2f}x |" if len(threads) > 1 else " |"))
    cells = [total[t] for t in threads]
    L.append("| **all host work** | " + " | ".join(f"**{c:.3f}**" for c in cells)
             + (f" | **{cells[0] / cells[-1]:.2f}x** |" if len(threads) > 1 else " |"))
    L += ["", f"Total run time {rep['total_seconds'] / 60:.1f} min (including the app's preprocessing).", ""]
    return "\n".join(L)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n-subjects", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nprocs", type=int, default=None, help="threads of the app's preprocessing call")
    ap.add_argument("--device", default="cpu", help="where the batch's SSIM/MSE run (cpu, cuda)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-host-io"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.bids / "participants.tsv").is_file():
        print(f"bench_host_io: {args.bids}: no BIDS dataset here (../shared absent?); nothing measured")
        return 0
    return run_and_write("host_io", run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
