#!/usr/bin/env python
"""Peak host memory of the participant level by batch size (the calibration of ``--mem``).

Runs the app as a user would, ``participant --stages preprocess embed reconstruct --batch-size B``, once per
batch size on B real IXI subjects (a fresh output folder and a fresh process each time, so the process's
peak resident memory belongs to that batch size), and reads the per-stage peaks the app records in
``OUT/logs/resources-<run id>.tsv``. A least-squares line over the batch sizes gives the memory one more
subject in a batch costs; the table sets it next to the app's own estimate (``ldae_bids.memory``), which
``--mem`` uses to cap the batch size. Last, the largest batch size runs once more under ``--check-mem`` to
record the batch sizes the app chose and the peak it reached.

Usage::

    python benchmarks/bench_memory.py [--bids ../shared/data/ixi] [--batch-sizes 1 2 4] [--ddim-steps 20] \\
        [--device cpu] [--precision auto] [--nprocs 2] [--check-mem 2GB] [--stage-option STAGE.KEY=VALUE] \\
        [--work /tmp/bench-memory] [--out benchmarks/results]

Writes ``memory.json`` and ``memory.md`` to ``--out``. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_analyses import App, BenchError, bundle_info  # noqa: E402
from bench_participant import call, machine, run_and_write  # noqa: E402

STAGES = ("preprocess", "embed", "reconstruct")


def run(args) -> dict:
    import pandas as pd

    from ldae_bids.memory import estimate_for_bundle

    model = args.model or (REPO / "ldae_bids" / "data" / "models" / "ldae-compact-ixi")
    parts = pd.read_csv(args.bids / "participants.tsv", sep="\t", dtype=str)
    labels = [p.removeprefix("sub-") for p in parts["participant_id"]]
    if len(labels) < max(args.batch_sizes):
        raise BenchError(f"{args.bids}: {len(labels)} subjects, fewer than the largest batch size")
    rows, t0 = [], time.perf_counter()
    for b in args.batch_sizes:
        work = args.work / f"batch-{b}"
        shutil.rmtree(work, ignore_errors=True)
        app = App(work, model, args.nprocs, validate=False, stage_options=args.stage_option)
        rec, usage = call(app, f"batch-{b}", args.bids, work / "out", "participant", "--participant-label",
                          *labels[:b], "--stages", *STAGES, "--batch-size", str(b), "--device", args.device,
                          "--precision", args.precision, "--ddim-steps", str(args.ddim_steps))
        if rec["failed"]:
            raise BenchError(f"batch {b}: subjects failed: {rec['failed']}")
        peaks = {r["stage"]: float(r["peak_rss_mb"]) for r in usage if r.get("status") == "done"}
        batches = {r["stage"]: int(r["n_subjects"]) for r in usage if r.get("status") == "done"}
        if any(batches.get(s) != b for s in STAGES):
            raise BenchError(f"batch {b}: the app did not run every stage as one batch of {b}: {batches}")
        rows.append({"batch_size": b, "peak_rss_mb": peaks, "wall_seconds": rec["wall_seconds"]})
    check = None
    if args.check_mem:  # the largest batch size asked for, under --mem: the app should cap it and stay below
        b = max(args.batch_sizes)
        work = args.work / "check-mem"
        shutil.rmtree(work, ignore_errors=True)
        app = App(work, model, args.nprocs, validate=False, stage_options=args.stage_option)
        rec, usage = call(app, "check-mem", args.bids, work / "out", "participant", "--participant-label",
                          *labels[:b], "--stages", *STAGES, "--batch-size", str(b), "--mem", args.check_mem,
                          "--device", args.device, "--precision", args.precision,
                          "--ddim-steps", str(args.ddim_steps))
        if rec["failed"]:
            raise BenchError(f"check-mem: subjects failed: {rec['failed']}")
        from ldae_bids.memory import parse_memory

        done = [r for r in usage if r.get("status") == "done"]
        check = {"mem": args.check_mem, "mem_mb": parse_memory(args.check_mem), "asked_batch_size": b,
                 "batch_sizes": sorted({int(r["n_subjects"]) for r in done}),
                 "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in done), "wall_seconds": rec["wall_seconds"]}
    sizes = np.array([r["batch_size"] for r in rows], float)
    fits = {}
    for stage in STAGES:
        peak = np.array([r["peak_rss_mb"][stage] for r in rows])
        if len(sizes) >= 2:
            slope, intercept = np.polyfit(sizes, peak, 1)
            fits[stage] = {"per_subject_mb": float(slope), "intercept_mb": float(intercept)}
    info = bundle_info(model)
    from ldae_bids.device import resolve_precision, select_device

    precision = resolve_precision(select_device(args.device), args.precision)
    from ldae_bids.config import parse_stage_options
    from ldae_bids.memory import refines_latent

    est = estimate_for_bundle(model, precision, refines_latent(parse_stage_options(args.stage_option)))
    return {
        "command": "python benchmarks/bench_memory.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.device),
        "settings": {"batch_sizes": list(args.batch_sizes), "ddim_steps": args.ddim_steps, "device": args.device,
                     "precision": args.precision, "resolved_precision": precision, "nprocs": args.nprocs,
                     "stage_options": list(args.stage_option)},
        "bundle": {k: info[k] for k in ("name", "content_hash")},
        "runs": rows, "fits": fits,
        "estimate": est, "check_mem": check,
        "total_seconds": time.perf_counter() - t0,
    }


def markdown(rep: dict) -> str:
    m, st, est = rep["machine"], rep["settings"], rep["estimate"]
    L = ["# Peak host memory by batch size (calibration of `--mem`)", "",
         f"Date: {rep['date']}. Command: `{rep['command']}`", "",
         f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, " + (f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
         + f"; torch {m['torch']}. Device `{st['device']}`, precision `{st['precision']}` "
         f"({st['resolved_precision']}), DDIM steps {st['ddim_steps']}"
         + "".join(f", `--stage-option {o}`" for o in st.get("stage_options", [])) + ". Model bundle "
         f"`{rep['bundle']['name']}` (`{rep['bundle']['content_hash'][:12]}...`).", "",
         "Each batch size ran in a fresh app process on that many IXI subjects (one batch); the peak is the "
         "process's peak resident memory after the stage (from `logs/resources-<run id>.tsv`; it never decreases, "
         "so a stage's figure includes the stages before it).", "",
         "| batch size | " + " | ".join(f"peak RSS after {s}, MiB" for s in STAGES) + " | wall s |",
         "|---|" + "---|" * (len(STAGES) + 1)]
    for r in rep["runs"]:
        L.append(f"| {r['batch_size']} | " + " | ".join(f"{r['peak_rss_mb'][s]:.0f}" for s in STAGES)
                 + f" | {r['wall_seconds']:.0f} |")
    L += ["", "Least-squares line over the batch sizes (MiB):", "",
          "| stage | per extra subject | at batch 0 (intercept) |", "|---|---|---|"]
    for s, f in rep["fits"].items():
        L.append(f"| {s} | {f['per_subject_mb']:.0f} | {f['intercept_mb']:.0f} |")
    L += ["", f"The app's estimate for this bundle (`ldae_bids.memory.estimate_for_bundle`, used by `--mem`): "
              f"{est['per_subject_mb']:.0f} MiB per subject in a batch on top of {est['base_mb']:.0f} MiB "
              f"(grid {'x'.join(map(str, est['grid']))}, autoencoder width {est['first_channels']}, "
              f"{est['precision']}" + (", with latent refinement" if est.get("refine") else "") + ").", "",
          ""]
    est_rows = [f"| {r['batch_size']} | {est['base_mb'] + r['batch_size'] * est['per_subject_mb']:.0f} | "
                f"{r['peak_rss_mb']['reconstruct']:.0f} |" for r in rep["runs"]]
    L += ["| batch size | estimated peak, MiB | measured peak, MiB |", "|---|---|---|", *est_rows, ""]
    c = rep.get("check_mem")
    if c:
        L += [f"**`--mem {c['mem']}` ({c['mem_mb']} MiB) with `--batch-size {c['asked_batch_size']}`:** the app ran "
              f"batches of {', '.join(map(str, c['batch_sizes']))}; peak resident memory {c['peak_rss_mb']:.0f} MiB "
              f"({'within' if c['peak_rss_mb'] <= c['mem_mb'] else 'OVER'} the limit), {c['wall_seconds']:.0f} s.",
              ""]
    L += [f"Total run time {rep['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(L)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stage-option", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="passed to every app call (e.g. embed.refine_latent=30); repeatable")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="the app's --precision (auto: bf16 on a GPU and on CPUs with native bf16)")
    ap.add_argument("--nprocs", type=int, default=None)
    ap.add_argument("--check-mem", default="2GB",
                    help="then run the largest batch size under this --mem and record what the app did ('' to skip)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-memory"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.bids / "participants.tsv").is_file():
        print(f"bench_memory: {args.bids}: no BIDS dataset here (../shared absent?); nothing measured")
        return 0
    return run_and_write("memory", run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
