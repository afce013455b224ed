#!/usr/bin/env python
"""What bounds each participant-level stage: a profile of preprocess and of the model stages (issue 7).

For ``--n`` IXI subjects (batched as the app batches them):

- ``preprocess``: ``cProfile`` of :func:`ldae_bids.preprocessing.preprocess_batch` (load, deepbet,
  registration, resampling, QC), grouped by the package a function lives in (nibabel = I/O and
  decompression, deepbet, torch ops, numpy/scipy, ldae_bids Python);
- ``embed`` (y_sem + DDIM inversion) and ``decode`` (DDIM sampling + autoencoder decoder):
  ``torch.profiler`` on the shipped model; the share of wall time spent inside torch operators
  (convolutions, normalisation, elementwise...) against the rest (Python, the loop).

Writes ``profile.json`` and ``profile.md`` to ``--out``. Exits 0 with a message when the data is absent.

Usage::

    python benchmarks/profile_stages.py [--bids ../shared/data/ixi] [--n 2] [--steps 20] [--threads 2]
        [--device auto] [--precision auto] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

PACKAGES = ("nibabel", "deepbet", "torch", "numpy", "scipy", "ldae_bids", "templateflow", "gzip", "zlib")


def _package(filename: str) -> str:
    for p in PACKAGES:
        if f"/{p}/" in filename or filename.endswith(f"/{p}.py"):
            return p
    if filename.startswith("~") or filename == "<built-in>":
        return "builtins (C)"
    return "other"


def profile_preprocess(paths: list[Path], grid, device, precision: str = "fp32") -> dict:
    from ldae_bids.preprocessing import load_t1w, preprocess_batch

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    images = [load_t1w(p) for p in paths]
    results = preprocess_batch(images, grid, device=device, bias_correction=None, precision=precision)
    prof.disable()
    wall = time.perf_counter() - t0
    bad = [r for r in results if isinstance(r, BaseException)]
    if bad:
        raise RuntimeError(f"preprocessing failed: {bad[0]}")
    stats = pstats.Stats(prof)
    by_pkg: dict[str, float] = defaultdict(float)
    top = []
    for (filename, line, name), (_cc, _nc, tt, ct, _callers) in stats.stats.items():
        by_pkg[_package(filename)] += tt  # self time: each second counted once
        top.append((ct, f"{Path(filename).name}:{line} {name}"))
    top.sort(reverse=True)
    steps = defaultdict(float)
    for r in results:
        for k, v in r.qc["seconds"].items():
            steps[k] += v / len(results)
    return {"wall_seconds": wall, "seconds_per_subject": wall / len(paths),
            "self_seconds_by_package": dict(sorted(by_pkg.items(), key=lambda kv: -kv[1])),
            "pipeline_steps_seconds_per_subject": dict(steps),
            "top_cumulative": [{"seconds": round(c, 3), "function": f} for c, f in top[:12]]}


def profile_model(images, pipe, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    out = {}
    for name, fn in (("embed (y_sem + inversion)", lambda: pipe.encode(images, invert=True, steps=steps)),
                     ("decode (sampling + decoder)", lambda: pipe.decode(codes.x_T, codes.y_sem, steps=steps))):
        if name.startswith("embed"):
            codes = pipe.encode(images, invert=True, steps=2)  # warm-up (and codes for decode)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            fn()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        rows = sorted(((e.self_cpu_time_total / 1e6, e.key, e.count) for e in events), reverse=True)
        ops_total = sum(r[0] for r in rows)
        conv = sum(r[0] for r in rows if "conv" in r[1].lower())
        norm = sum(r[0] for r in rows if "norm" in r[1].lower())
        out[name] = {
            "wall_seconds": wall, "seconds_per_subject": wall / images.shape[0],
            "torch_ops_self_seconds": ops_total, "convolution_share_of_ops": conv / ops_total if ops_total else None,
            "normalisation_share_of_ops": norm / ops_total if ops_total else None,
            "outside_torch_ops_share": max(0.0, 1 - ops_total / wall) if wall else None,
            "top_ops": [{"op": k, "self_seconds": round(s, 3), "calls": c} for s, k, c in rows[:10]],
        }
    return out


def conv_routing(pipe, repeats: int = 5) -> dict | None:
    """One batch-1 denoiser call with the oneDNN routing of ``cpu_conv.py`` and with PyTorch's own
    kernel choice (the routing undone on a copy); CPU only."""
    import copy
    import statistics

    import torch

    if pipe.device.type != "cpu":
        return None
    plain = copy.deepcopy(pipe.denoiser)
    for m in plain.modules():
        if getattr(m, "_onednn_routed", False):
            del m.forward
    x = torch.randn(1, *pipe.config.latent_shape)
    y = torch.randn(1, pipe.config.semantic_encoder.emb_dim)
    t = torch.tensor([500])
    out = {}
    with torch.no_grad():
        for name, net in (("routed_to_onednn", pipe.denoiser), ("pytorch_default", plain)):
            net(x, t, y)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x, t, y)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
    out["speedup"] = out["pytorch_default"] / out["routed_to_onednn"]
    return out


def markdown(rep: dict) -> str:
    m = rep["machine"]
    L = ["# Where the time goes, per stage (issue 7)", "",
         f"Date: {rep['date']}. Command: `{rep['command']}`", "",
         f"Machine: {m['cpu']}, {m['threads']} torch threads, device `{m['device']}`; {rep['n']} IXI subjects in "
         f"one batch; {rep['steps']} DDIM steps; precision {rep.get('precision', 'fp32')} (deepbet and the model), "
         f"weights {rep.get('memory_format', 'contiguous')}.", "", "## preprocess (cProfile)", "",
         f"{rep['preprocess']['seconds_per_subject']:.2f} s per subject. Pipeline steps (s per subject): "
         + ", ".join(f"{k} {v:.2f}" for k, v in rep["preprocess"]["pipeline_steps_seconds_per_subject"].items())
         + ".", "", "| package (self time) | seconds | share |", "|---|---|---|"]
    tot = sum(rep["preprocess"]["self_seconds_by_package"].values()) or 1
    for k, v in rep["preprocess"]["self_seconds_by_package"].items():
        if v / tot >= 0.005:
            L.append(f"| {k} | {v:.2f} | {100 * v / tot:.0f}% |")
    L += ["", "Heaviest calls (cumulative):", ""]
    L += [f"- {t['seconds']:.2f} s {t['function']}" for t in rep["preprocess"]["top_cumulative"][:8]]
    L += ["", "## model stages (torch.profiler)", "",
          "| call | s / subject | in torch ops | convolutions (of op time) | normalisation | outside ops (Python, loop) |",
          "|---|---|---|---|---|---|"]
    for name, r in rep["model"].items():
        L.append(f"| {name} | {r['seconds_per_subject']:.2f} | {r['torch_ops_self_seconds']:.2f} s | "
                 f"{100 * (r['convolution_share_of_ops'] or 0):.0f}% | {100 * (r['normalisation_share_of_ops'] or 0):.0f}% | "
                 f"{100 * (r['outside_torch_ops_share'] or 0):.0f}% |")
    cr = rep.get("conv_routing")
    if cr:
        L += ["", f"One batch-1 fp32 denoiser call (median of 5): {1000 * cr['pytorch_default']:.0f} ms with PyTorch's own "
              f"kernel choice, {1000 * cr['routed_to_onednn']:.0f} ms with the oneDNN routing of "
              f"`ldae_bids/model/cpu_conv.py` ({cr['speedup']:.1f}x)."]
    for name, r in rep["model"].items():
        L += ["", f"Top operators, {name}:", ""]
        L += [f"- {o['op']}: {o['self_seconds']:.2f} s ({o['calls']} calls)" for o in r["top_ops"][:6]]
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the app's --precision (auto: bf16 on a GPU and on CPUs with native bf16), with the weight "
                         "layout the app picks for it")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    paths = sorted(args.bids.glob("sub-*/anat/sub-*_T1w.nii.gz"))[: args.n]
    if not paths:
        print(f"profile_stages: no T1w images under {args.bids} (../shared absent?); nothing measured")
        return 0
    import os

    if not os.environ.get("TEMPLATEFLOW_HOME") and (REPO.parent / "shared" / "templateflow").is_dir():
        os.environ["TEMPLATEFLOW_HOME"] = str(REPO.parent / "shared" / "templateflow")
    import numpy as np
    import torch

    from bench_preprocess import cpu_name
    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.preprocessing import Grid, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    from ldae_bids.device import resolve_memory_format, resolve_precision

    precision = resolve_precision(device, args.precision)
    mb = load_bundle(args.model, device=device)
    mb.pipeline.precision = precision  # as the app sets it (runtime.Resources)
    mb.pipeline.set_memory_format(resolve_memory_format(device, precision))
    grid = Grid.from_dict(mb.metadata["grid"])
    pre = profile_preprocess(paths, grid, device, precision)
    from ldae_bids.preprocessing import load_t1w, preprocess_batch

    res = preprocess_batch([load_t1w(p) for p in paths], grid, device=device, bias_correction=None,
                           precision=precision)
    images = torch.from_numpy(np.stack([np.asarray(r.image.dataobj, dtype=np.float32) for r in res]))[:, None]
    rep = {"command": "python benchmarks/profile_stages.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M"), "n": len(paths), "steps": args.steps,
           "precision": precision, "memory_format": resolve_memory_format(device, precision),
           "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device),
                       "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
           "model": profile_model(images.to(device), mb.pipeline, args.steps), "preprocess": pre,
           "conv_routing": conv_routing(mb.pipeline)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(rep, indent=1) + "\n")
    (args.out / "profile.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
