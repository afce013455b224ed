#!/usr/bin/env python
"""Inference speed of LDAE against an image-space diffusion autoencoder, same machine, same steps.

The image-space baseline is what LDAE replaces: the same semantic encoder and the same
y_sem-conditioned denoiser architecture (:class:`ldae_bids.model.denoiser.ConditionalUNet`,
the preset's widths and blocks, one input channel), run by the same DDIM loop
(:meth:`ldae_bids.model.pipeline.LdaePipeline.ddim`) directly on the voxels of the input grid
instead of the autoencoder's latent. Timing does not depend on the weights, so both use the
preset's freshly initialised networks (``--bundle`` times a trained compact bundle instead).

What is timed, per grid (``compact`` 80x96x80, ``paper`` 128x160x128) and batch size:

- the cost of one call of each network (median of ``--repeats`` after a warm-up; a network whose
  warm-up call exceeds ``--single-call-s`` is timed by that call alone): semantic encoder,
  autoencoder encoder and decoder, LDAE denoiser step, image-space denoiser step;
- from them, for 10/20/50/100 DDIM steps: ``encode`` (y_sem + DDIM inversion), ``decode``
  (DDIM sampling + decoder) and ``reconstruct`` (both), and the image-space / LDAE ratio;
- a check of that composition: ``reconstruct`` is run end to end at ``--check-steps`` steps for
  both methods and the measured time is printed beside the composed one.

One DDIM step is one denoiser call in both methods, so ``N x step + fixed costs`` is the whole
cost; the composition is what makes the paper grid's image-space baseline measurable on a
2-core CPU (one of its steps takes minutes there).

Writes ``speed.json`` and ``speed.md`` to ``--out``.

Usage::

    python benchmarks/bench_speed.py [--grids compact paper] [--batch 1 4] [--steps 10 20 50 100]
        [--device auto] [--threads 2] [--repeats 3] [--check-steps 2] [--bundle DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_preprocess import device_name  # noqa: E402  (one description of the machine for all benchmarks)

OPS = ("encode", "decode", "reconstruct")


class ImageSpaceDae:
    """Diffusion autoencoder on voxels: semantic encoder + conditional denoiser, no autoencoder.

    Uses :class:`~ldae_bids.model.pipeline.LdaePipeline`'s own DDIM loop, so both methods run
    exactly the same per-step arithmetic around their denoiser.
    """

    def __init__(self, model_cfg, semantic_encoder, device):
        from ldae_bids.model.cpu_conv import route_conv3d_to_onednn
        from ldae_bids.model.denoiser import ConditionalUNet
        from ldae_bids.model.networks import build_scheduler

        den_cfg = dataclasses.replace(model_cfg.denoiser, in_channels=1)
        self.semantic_encoder = semantic_encoder
        self.denoiser = ConditionalUNet(**dataclasses.asdict(den_cfg)).to(device).eval()
        route_conv3d_to_onednn(self.denoiser)  # the same CPU convolution path as LdaePipeline
        self.scheduler = build_scheduler(model_cfg.scheduler)
        self.device = device
        self.precision = "auto"  # as LdaePipeline's default: bf16 autocast on CUDA, fp32 on the CPU

    def autocast(self):
        from ldae_bids.model.pipeline import LdaePipeline

        return LdaePipeline.autocast(self)

    def timesteps(self, steps: int):
        from ldae_bids.model.pipeline import LdaePipeline

        return LdaePipeline.timesteps(self, steps)

    def ddim(self, x, y_sem, steps, invert=False):
        from ldae_bids.model.pipeline import LdaePipeline

        return LdaePipeline.ddim(self, x, y_sem, steps, invert=invert)

    def reconstruct(self, images, steps: int):
        import torch

        with torch.no_grad(), self.autocast():
            y = self.semantic_encoder(images).float()
        x_T = self.ddim(images, y, steps, invert=True)
        return self.ddim(x_T, y, steps).clamp(0, 1)


def timed(fn, device, repeats: int, single_call_s: float | None = None) -> tuple[float, int]:
    """(median seconds of ``fn()`` over ``repeats`` calls after one warm-up call, number of calls timed).

    A warm-up call longer than ``single_call_s`` is itself the measurement (one call timed): for a call of
    minutes, set-up costs are negligible, and repeating it would cost the benchmark tens of minutes. It
    includes those set-up costs, so it can only overstate that network's cost.
    """
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if single_call_s is not None and first > single_call_s:
        return first, 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), repeats


def build(grid: str, bundle: Path | None, device):
    """(LdaePipeline, ImageSpaceDae) for a preset grid (or a trained compact bundle)."""
    from ldae_bids.model.config import preset
    from ldae_bids.model.pipeline import LdaePipeline

    if bundle is not None and grid == "compact":
        from ldae_bids.model.bundle import load_bundle

        pipe = load_bundle(bundle, device=device).pipeline
    else:
        model_cfg, _ = preset(grid)
        pipe = LdaePipeline(model_cfg).to(device).eval()
    return pipe, ImageSpaceDae(pipe.config, pipe.semantic_encoder, device)


def per_call_costs(pipe, img_dae, batch: int, device, repeats: int, seed: int = 0,
                   single_call_s: float | None = None) -> tuple[dict, dict]:
    """(seconds of one call of each network at ``batch``, number of calls each figure is from)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = tuple(pipe.config.image_shape)
    images = torch.rand((batch, 1, *shape), generator=gen).to(device)
    latent = torch.randn((batch, *pipe.config.latent_shape), generator=gen).to(device)
    y = torch.randn((batch, pipe.config.semantic_encoder.emb_dim), generator=gen).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)

    def run(fn):
        def call():
            with torch.no_grad(), pipe.autocast():
                return fn()
        return call

    calls = {
        "semantic_encoder": lambda: pipe.semantic_encoder(images),
        "ae_encoder": lambda: pipe.autoencoder.encode(images),
        "ae_decoder": lambda: pipe.autoencoder.decode(latent),
        "ldae_step": lambda: pipe.denoiser(latent, t, y),
        "image_step": lambda: img_dae.denoiser(images, t, y),
    }
    costs, n_timed = {}, {}
    for name, fn in calls.items():
        costs[name], n_timed[name] = timed(run(fn), device, repeats, single_call_s)
    return costs, n_timed


def compose(c: dict, steps: int) -> dict:
    """Seconds of encode / decode / reconstruct at ``steps`` DDIM steps, both methods."""
    ldae = {
        "encode": c["ae_encoder"] + c["semantic_encoder"] + steps * c["ldae_step"],
        "decode": steps * c["ldae_step"] + c["ae_decoder"],
    }
    image = {"encode": c["semantic_encoder"] + steps * c["image_step"], "decode": steps * c["image_step"]}
    for d in (ldae, image):
        d["reconstruct"] = d["encode"] + d["decode"]
    return {"ldae": ldae, "image_space": image, "ratio": {op: image[op] / ldae[op] for op in OPS}}


def end_to_end(pipe, img_dae, steps: int, device) -> dict:
    """Measured seconds of a whole reconstruct (batch 1) by both methods."""
    import torch

    x = torch.rand((1, 1, *pipe.config.image_shape), generator=torch.Generator().manual_seed(1)).to(device)
    return {
        "ldae": timed(lambda: pipe.reconstruct(x, steps=steps), device, 1)[0],
        "image_space": timed(lambda: img_dae.reconstruct(x, steps), device, 1)[0],
    }


def largest_batch(fn_of_batch, device, start: int = 1, limit: int = 256) -> int:
    """Largest power-of-two batch for which ``fn_of_batch(b)`` runs without CUDA running out of memory."""
    import torch

    best, b = 0, start
    while b <= limit:
        try:
            fn_of_batch(b)
            torch.cuda.synchronize(device)
            best, b = b, b * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def markdown(report: dict) -> str:
    lines = [
        "# Inference speed: LDAE vs an image-space diffusion autoencoder",
        "",
        f"Device: {report['device']}. torch {report['torch']}. Date: {report['date']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "Image-space baseline: the same semantic encoder, the same conditional denoiser architecture "
        "(one input channel) and the same DDIM loop, on the voxels of the input grid. Times are composed "
        "from the median cost of one call of each network (`N` steps = `N` denoiser calls); the end-to-end "
        "check below runs both methods whole.",
        "",
    ]
    for g in report["grids"]:
        lines += [f"## {g['grid']} grid {'x'.join(map(str, g['image_shape']))} "
                  f"(latent {'x'.join(map(str, g['latent_shape']))})", ""]
        for b in g["batches"]:
            c = b["per_call_s"]
            lines += [
                f"Batch {b['batch']}: one call, seconds: semantic encoder {c['semantic_encoder']:.3f}, "
                f"AE encoder {c['ae_encoder']:.3f}, AE decoder {c['ae_decoder']:.3f}, LDAE denoiser step "
                f"{c['ldae_step']:.4f}, image-space denoiser step {c['image_step']:.3f} "
                f"(step ratio {c['image_step'] / c['ldae_step']:.1f}x).",
            ]
            single = [k for k, n in b.get("calls_timed", {}).items() if n == 1]
            if single:
                lines.append(f"Timed by one call each (warm-up call over {report.get('single_call_s')} s, set-up "
                             f"costs included): {', '.join(single)}.")
            lines += [
                "",
                "| steps | op | LDAE s/subject | image-space s/subject | ratio |",
                "|---|---|---|---|---|",
            ]
            for s in b["steps"]:
                for op in OPS:
                    lines.append(f"| {s['steps']} | {op} | {s['ldae'][op] / b['batch']:.3f} | "
                                 f"{s['image_space'][op] / b['batch']:.2f} | {s['ratio'][op]:.1f}x |")
            lines.append("")
        if g.get("check"):
            ch = g["check"]
            lines += [
                f"End-to-end check, reconstruct at {ch['steps']} steps, batch 1: LDAE measured "
                f"{ch['measured']['ldae']:.3f} s (composed {ch['composed']['ldae']:.3f} s), image-space measured "
                f"{ch['measured']['image_space']:.2f} s (composed {ch['composed']['image_space']:.2f} s).",
                "",
            ]
        if g.get("largest_batch"):
            lines += [f"Largest power-of-two batch that fits (reconstruct step): {g['largest_batch']}.", ""]
    lines += [f"Peak resident memory of the process: {report['peak_rss_mb']:.0f} MB."]
    if report.get("peak_gpu_mb"):
        lines.append(f"Peak GPU memory allocated: {report['peak_gpu_mb']:.0f} MB.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", nargs="+", default=["compact", "paper"], choices=["tiny", "compact", "paper"])
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: 1 4 on CPU, 1 8 on GPU)")
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--single-call-s", type=float, default=120.0,
                    help="a network whose warm-up call takes longer than this many seconds is timed by that one "
                         "call (the paper grid's image-space step on a CPU); 0: always --repeats calls")
    ap.add_argument("--check-steps", type=int, default=2, help="DDIM steps of the end-to-end check (0: none)")
    ap.add_argument("--check-grids", nargs="*", default=["tiny", "compact"], help="grids that get the end-to-end check")
    ap.add_argument("--bundle", type=Path, default=None, help="time this trained compact bundle")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch

    from ldae_bids.device import select_device

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    batches = args.batch or ([1, 8] if device.type == "cuda" else [1, 4])
    report = {
        "command": "python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_name(device), "torch": torch.__version__,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "grids": [],
        "repeats": args.repeats, "single_call_s": args.single_call_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for grid in args.grids:
        pipe, img_dae = build(grid, args.bundle, device)
        entry = {"grid": grid, "image_shape": list(pipe.config.image_shape),
                 "latent_shape": list(pipe.config.latent_shape), "batches": []}
        for b in batches:
            costs, n_timed = per_call_costs(pipe, img_dae, b, device, args.repeats,
                                             single_call_s=args.single_call_s or None)
            print(f"{grid} batch {b}: " + ", ".join(f"{k} {v:.4f}s" for k, v in costs.items()), flush=True)
            entry["batches"].append({"batch": b, "per_call_s": costs, "calls_timed": n_timed,
                                     "steps": [{"steps": s, **compose(costs, s)} for s in args.steps]})
        if args.check_steps and grid in args.check_grids:
            composed = compose(entry["batches"][0]["per_call_s"], args.check_steps) if batches[0] == 1 else None
            measured = end_to_end(pipe, img_dae, args.check_steps, device)
            entry["check"] = {"steps": args.check_steps, "measured": measured,
                              "composed": {k: composed[k]["reconstruct"] for k in ("ldae", "image_space")}
                              if composed else {}}
            print(f"{grid} check at {args.check_steps} steps: measured {measured}", flush=True)
        if device.type == "cuda":
            shape = tuple(pipe.config.image_shape)

            def img_step(b):
                x = torch.rand((b, 1, *shape), device=device)
                y = torch.randn((b, pipe.config.semantic_encoder.emb_dim), device=device)
                with torch.no_grad(), pipe.autocast():
                    img_dae.denoiser(x, torch.full((b,), 500, device=device), y)

            def ldae_step(b):
                x = torch.rand((b, 1, *shape), device=device)
                with torch.no_grad():
                    pipe.reconstruct(x, steps=1)

            entry["largest_batch"] = {"ldae": largest_batch(ldae_step, device),
                                      "image_space": largest_batch(img_step, device)}
        report["grids"].append(entry)
        pipe = img_dae = None  # free this grid's networks before the next is built
        write(report, args.out, device)  # after every grid: a run cut short keeps what it measured
    print(markdown(report))
    return 0


def write(report: dict, out: Path, device) -> None:
    import torch

    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    (out / "speed.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
