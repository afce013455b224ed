#!/usr/bin/env python
"""Seconds per subject, subjects per hour and peak memory of every participant-level stage (issue 7).

Runs the app as a user would, on real IXI subjects, and reads the per-stage figures the app itself
records in ``OUT/logs/resources-<run id>.tsv`` (wall seconds of each stage call, the process's peak
resident memory, the CUDA allocator's peak on a GPU):

1. ``participant --stages preprocess embed reconstruct`` on N subjects (batched as the app batches);
2. ``group --stages probe --targets age`` on them, for a probe to manipulate along (or ``--probe``);
3. ``participant --stages manipulate --probe ... --strengths -1 1`` on the first M subjects;
4. a simulated longitudinal dataset (``simulate_longitudinal.py``: K subjects, sessions at 0 and 12
   months), ``participant --stages preprocess embed fill-missing-sessions --fill-months 6``.

The headline "participant level" figure is preprocess + embed (y_sem and x_T) per subject.

Usage::

    python benchmarks/bench_participant.py [--bids ../shared/data/ixi] [--n-subjects 10] [--ddim-steps 20] \\
        [--device auto] [--batch-size B] [--nprocs 2] [--work /tmp/bench-participant] [--out benchmarks/results] \\
        [--stage-option embed.refine_latent=30]

Writes ``participant.json`` and ``participant.md`` to ``--out``. Exits 0 with a message when the data
folder is absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))


from bench_analyses import App, BenchError, bundle_info, machine, summarise  # noqa: E402  (the same app driver and summaries)


def read_usage(out: Path, before: set[Path]) -> list[dict]:
    """Rows of the resources TSVs that the last call added to ``out/logs``."""
    import pandas as pd

    rows = []
    for path in sorted(set((out / "logs").glob("resources-*.tsv")) - before):
        rows += pd.read_csv(path, sep="\t", na_values=["n/a"]).to_dict("records")
    return rows


def usage_files(out: Path) -> set[Path]:
    return set((out / "logs").glob("resources-*.tsv"))


def call(app: App, name: str, bids: Path, out: Path, level: str, *args) -> tuple[dict, list[dict]]:
    before = usage_files(out)
    rec = app(name, bids, out, level, *args)
    return rec, read_usage(out, before)


def per_stage(rows: list[dict]) -> dict[str, dict]:
    """Per stage: seconds per subject (each call's seconds / its subjects), peaks, calls, batch sizes."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "done":
            continue
        s = out.setdefault(r["stage"], {"per_subject": [], "n_subjects": 0, "batch_sizes": [], "peak_rss_mb": 0.0,
                                        "peak_gpu_mb": None, "seconds": 0.0})
        n = int(r["n_subjects"])
        s["per_subject"] += [float(r["seconds_per_subject"])] * n
        s["n_subjects"] += n
        s["seconds"] += float(r["seconds"])
        s["batch_sizes"].append(n)
        s["peak_rss_mb"] = max(s["peak_rss_mb"], float(r["peak_rss_mb"]))
        gpu = r.get("peak_gpu_mb")
        if gpu is not None and np.isfinite(float(gpu)):
            s["peak_gpu_mb"] = max(s["peak_gpu_mb"] or 0.0, float(gpu))
    for s in out.values():
        s["seconds_per_subject"] = summarise(s.pop("per_subject"))
        s["subjects_per_hour"] = 3600 * s["n_subjects"] / s["seconds"] if s["seconds"] > 0 else None
    return out


def run(args) -> dict:
    import pandas as pd

    work = args.work
    model = args.model or (REPO / "ldae_bids" / "data" / "models" / "ldae-compact-ixi")
    app = App(work, model, args.nprocs, validate=False, in_process=args.in_process, stage_options=args.stage_option)
    parts = pd.read_csv(args.bids / "participants.tsv", sep="\t", dtype=str)
    labels = [p.removeprefix("sub-") for p in parts["participant_id"]][: args.n_subjects]
    if len(labels) < 10 and args.probe is None:
        raise BenchError(f"{args.bids}: {len(labels)} subjects; fitting the probe for manipulate needs at least "
                         "10 (or give --probe)")
    out = work / "out"
    common = ["--device", args.device, "--precision", args.precision, "--ddim-steps", str(args.ddim_steps)]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    report = {"calls": {}}
    t0 = time.perf_counter()
    rec, rows = call(app, "participant", args.bids, out, "participant", "--participant-label", *labels,
                     "--stages", "preprocess", "embed", "reconstruct", *common)
    report["calls"]["participant"] = {"wall_seconds": rec["wall_seconds"], "failed": rec["failed"], "rows": rows}
    probe = args.probe
    if probe is None:
        rec, rows = call(app, "probe", args.bids, out, "group", "--participant-label", *labels, "--stages",
                         "probe", "--targets", "age", "--stage-option", "probe.n_boot=200")
        report["calls"]["probe"] = {"wall_seconds": rec["wall_seconds"], "rows": rows}
        probe = out / "group" / "target-age_desc-probe_probe.json"
    rec, rows = call(app, "manipulate", args.bids, out, "participant", "--participant-label",
                     *labels[: args.n_manipulate], "--stages", "manipulate", "--probe", str(probe),
                     "--strengths", "-1", "1", *common)
    report["calls"]["manipulate"] = {"wall_seconds": rec["wall_seconds"], "failed": rec["failed"], "rows": rows}

    long_dir, long_out = work / "long", work / "long-out"
    if not (long_dir / "participants.tsv").is_file():
        sim = [sys.executable, str(REPO / "benchmarks" / "simulate_longitudinal.py"), "--bids", str(args.bids),
               "--out", str(long_dir), "--participant-label", *labels[: args.n_long], "--months", "0", "12",
               "--seed", "0", "--overwrite"]
        proc = subprocess.run(sim, capture_output=True, text=True)
        if proc.returncode:
            raise BenchError(f"simulate_longitudinal.py exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    rec, rows = call(app, "fill", long_dir, long_out, "participant", "--stages", "preprocess", "embed",
                     "fill-missing-sessions", "--fill-months", "6", *common)
    report["calls"]["fill"] = {"wall_seconds": rec["wall_seconds"], "failed": rec["failed"], "rows": rows}

    all_rows = [r for c in ("participant", "manipulate") for r in report["calls"][c]["rows"]]
    stages = per_stage(all_rows)
    fill = per_stage(report["calls"]["fill"]["rows"])
    if "fill-missing-sessions" in fill:
        stages["fill-missing-sessions"] = fill["fill-missing-sessions"]
        stages["fill-missing-sessions"]["note"] = (f"{args.n_long} simulated subjects with sessions at 0 and 12 "
                                                   "months, one synthetic session (6 months) each")
    pe = [stages[s]["seconds_per_subject"].get("mean") for s in ("preprocess", "embed") if s in stages]
    info = bundle_info(model)
    report.update({
        "command": "python benchmarks/bench_participant.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args.device),
        "settings": {"n_subjects": len(labels), "ddim_steps": args.ddim_steps, "device": args.device,
                     "precision": args.precision, "precision_used": precision_used(args),
                     "batch_size": args.batch_size or "app default", "nprocs": args.nprocs,
                     "n_manipulate": args.n_manipulate, "n_long": args.n_long,
                     "stage_options": list(args.stage_option)},
        "model": str(model), "bundle": {k: info[k] for k in ("name", "content_hash")},
        "stages": stages,
        "participant_level_seconds_per_subject": float(sum(pe)) if len(pe) == 2 else None,
        "total_seconds": time.perf_counter() - t0,
    })
    return report


def precision_used(args) -> str:
    """What the app's ``--precision`` resolves to on ``--device`` here."""
    from ldae_bids.device import resolve_precision, select_device

    return resolve_precision(select_device(args.device), args.precision)


def markdown(rep: dict) -> str:
    m, st = rep["machine"], rep["settings"]
    L = ["# Participant level: seconds and memory per stage (issue 7)", "",
         f"Date: {rep['date']}. Command: `{rep['command']}`", "",
         f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, " + (f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
         + f"; torch {m['torch']}. Device `{st['device']}`, precision {st.get('precision_used', 'fp32')} "
         f"(`--precision {st.get('precision', 'auto')}`), batch {st['batch_size']}, app threads "
         f"{st['nprocs'] or 'default'}, DDIM steps {st['ddim_steps']}, {st['n_subjects']} IXI subjects.", "",
         *([f"Model bundle: `{rep['bundle']['name']}` (content hash `{rep['bundle']['content_hash']}`).", ""]
           if rep.get("bundle") else []),
         *(["Every app call had " + ", ".join(f"`--stage-option {o}`" for o in st["stage_options"]) + ".", ""]
           if st.get("stage_options") else []),
         "Figures from the app's own `logs/resources-<run id>.tsv` (wall seconds of each stage call divided by its "
         "subjects; peak resident memory of the app process so far; CUDA allocator peak during the call).", "",
         "| stage | subjects | batch sizes | s / subject (mean) | median | subjects / hour | peak RSS MiB | peak GPU MiB |",
         "|---|---|---|---|---|---|---|---|"]
    for name, s in rep["stages"].items():
        sp = s["seconds_per_subject"]
        gpu = f"{s['peak_gpu_mb']:.0f}" if s.get("peak_gpu_mb") else "n/a"
        sph = f"{s['subjects_per_hour']:.0f}" if s.get("subjects_per_hour") else "n/a"
        L.append(f"| {name} | {s['n_subjects']} | {', '.join(map(str, sorted(set(s['batch_sizes']))))} | "
                 f"{sp.get('mean', float('nan')):.2f} | {sp.get('median', float('nan')):.2f} | {sph} | "
                 f"{s['peak_rss_mb']:.0f} | {gpu} |")
    pl = rep.get("participant_level_seconds_per_subject")
    L += ["", f"**Participant level (preprocess + embed with x_T): {pl:.2f} s per subject** "
              f"({3600 / pl:.0f} subjects per hour)." if pl else "", ""]
    for name, s in rep["stages"].items():
        if s.get("note"):
            L.append(f"- {name}: {s['note']}")
    L += ["", f"Total run time {rep['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(L)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n-subjects", type=int, default=10)
    ap.add_argument("--probe", type=Path, default=None,
                    help="probe JSON to manipulate along (default: fit one on the age of the N subjects, N >= 10)")
    ap.add_argument("--n-manipulate", type=int, default=2)
    ap.add_argument("--n-long", type=int, default=2)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the app's --precision")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--nprocs", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-participant"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--keep-simulation", action="store_true",
                    help="reuse WORK/long from an earlier run (the app outputs are always recomputed)")
    ap.add_argument("--stage-option", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="passed to every app call (repeatable), e.g. embed.refine_latent=30")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.bids / "participants.tsv").is_file():
        print(f"bench_participant: {args.bids}: no BIDS dataset here (../shared absent?); nothing measured")
        return 0
    # every stage must run for its time to be measured: start from empty output folders
    for sub in ("out", "long-out", "scratch") + (() if args.keep_simulation else ("long",)):
        shutil.rmtree(args.work / sub, ignore_errors=True)
    return run_and_write("participant", run, markdown, args)


def run_and_write(name: str, run_fn, markdown_fn, args) -> int:
    """``run_fn(args)``, then ``name.json`` and ``name.md`` in ``args.out`` (the Markdown printed too); 1 with
    the message on a :class:`BenchError`. The tail of every app-driving benchmark's ``main``."""
    try:
        rep = run_fn(args)
    except BenchError as exc:
        print(f"bench_{name}: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (args.out / f"{name}.md").write_text(markdown_fn(rep))
    print(markdown_fn(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
