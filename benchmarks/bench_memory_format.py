#!/usr/bin/env python
"""Weight layout of the 3-D convolutions: contiguous (NCDHW) against channels-last (NDHWC), issue 7.

The app lays the networks' weights out with ``ldae_bids.device.resolve_memory_format`` (channels-last on
the CPU under bf16, contiguous elsewhere). This benchmark is what that choice rests on: on one machine,
bundle and set of images, for each precision and each layout, each in a fresh process (in one process the
configurations measured first changed the timings of those after, by up to 2x either way),

- one call of each network at every ``--batch`` (median of ``--repeats`` after a warm-up): semantic
  encoder, autoencoder encoder and decoder, one denoiser step;
- ``reconstruct`` (inversion + decoding at ``--steps``) end to end over the bundle's validation subjects
  at ``--batch-size``, seconds per subject, and the SSIM of its output to the input;
- with ``--training``, one training step (forward + backward) of the decoder refinement and of stage 2's
  denoiser, what ``ldae_bids.model.loop.lay_out_autoencoder`` rests on;
- how far channels-last moves y_sem, x_T and the reconstruction from the contiguous run in the same
  precision (relative L2): another summation order, not other maths.

Writes ``memory_format.json`` and ``memory_format.md`` to ``--out``.

Usage::

    python benchmarks/bench_memory_format.py --data /work/cache/ixi-preproc [--precisions fp32 bf16] \\
        [--batch 1 4] [--limit 8] [--steps 20] [--batch-size 4] [--device cpu|cuda] [--threads 2] [--out DIR]
        [--any-images] [--training]
    python benchmarks/bench_memory_format.py --render DIR/memory_format.json   # its Markdown again
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
for p in (REPO, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_precision import NETWORKS, network_times, relative  # noqa: E402  (the same timings, any batch)

FORMATS = ("contiguous", "channels_last")


def training_times(pipe, shape, repeats: int, decoder_batch: int = 2, denoiser_batch: int = 8) -> dict[str, float]:
    """Median seconds of one training step (forward + backward, no optimiser step, so the weights stay as they
    are) of the decoder refinement (L1 + 0.5 x (1 - SSIM), as ``stage1.train_decoder``) and of stage 2's
    denoiser (its epsilon loss), in the pipeline's precision and the networks' current layout."""
    import torch
    import torch.nn.functional as F

    from bench_speed import timed
    from ldae_bids.metrics import ssim_map_tensor

    gen = torch.Generator().manual_seed(0)
    dev = pipe.device
    x = torch.rand(decoder_batch, 1, *shape, generator=gen).to(dev)
    with torch.no_grad():
        z = pipe.encode_latent(x) / pipe.latent_scale
    zn = torch.randn(denoiser_batch, *z.shape[1:], generator=gen).to(dev)
    y = torch.randn(denoiser_batch, pipe.config.semantic_encoder.emb_dim, generator=gen).to(dev)
    t = torch.randint(0, 1000, (denoiser_batch,), generator=gen).to(dev)
    ae, den = pipe.autoencoder, pipe.denoiser

    def decoder_step():
        with pipe.autocast():
            recon = ae.decode(z)
        recon = recon.float()
        loss = F.l1_loss(recon, x) + 0.5 * (1.0 - ssim_map_tensor(recon.clamp(0.0, 1.0), x).mean())
        loss.backward()
        ae.zero_grad(set_to_none=True)

    def denoiser_step():
        with pipe.autocast():
            eps = den(zn, t, y)
        eps.float().square().mean().backward()
        den.zero_grad(set_to_none=True)

    ae.train(), den.train()
    try:
        with torch.enable_grad():
            return {f"decoder_step_b{decoder_batch}": timed(decoder_step, dev, repeats)[0],
                    f"denoiser_step_b{denoiser_batch}": timed(denoiser_step, dev, repeats)[0]}
    finally:
        ae.eval(), den.eval()


def worker(args, bundle_path: Path) -> int:
    """One precision and layout (``--worker PREC FMT DIR``): times, SSIMs and codes to DIR/PREC_FMT.json / .npz."""
    import torch

    from bench_reconstruction import validation_pairs
    from ldae_bids.metrics import similarity
    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.model.data import load_volume

    prec, fmt, folder = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mb = load_bundle(bundle_path, device=device)
    pipe, shape = mb.pipeline, tuple(mb.config.image_shape)
    if args.any_images:
        images = sorted(args.data.glob("**/sub-*_desc-preproc_T1w.nii.gz"))[:args.limit]
        pairs = [(f.name.split("_")[0][4:], f, None) for f in images]
        if not pairs:
            print(f"skipped: no sub-*_desc-preproc_T1w.nii.gz under {args.data}")
            return 0
    else:
        pairs = validation_pairs(mb, args.data, args.limit)
        if not pairs:
            return 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x_all = torch.stack([torch.from_numpy(load_volume(p, shape))[None] for _, p, _ in pairs])
    bs = max(1, args.batch_size)
    pipe.precision = prec
    pipe.set_memory_format(fmt)
    nets = {str(b): network_times(pipe, shape, args.repeats, batch=b) for b in args.batch}
    training = training_times(pipe, shape, args.repeats) if args.training else {}
    ysem, xt, imgs, ssim, seconds = [], [], [], [], 0.0
    pipe.reconstruct(x_all[:1], steps=2)  # warm-up of this layout's kernels
    for start in range(0, len(pairs), bs):
        x = x_all[start:start + bs]
        t = time.perf_counter()
        rec = pipe.reconstruct(x, steps=args.steps)
        sync()
        seconds += time.perf_counter() - t
        ysem.append(rec.y_sem.cpu().numpy())
        xt.append(rec.x_T.cpu().numpy())
        imgs.append(rec.images.cpu().numpy())
        ssim += [similarity(rec.images[j, 0].cpu().numpy(), x[j, 0].numpy())["ssim"] for j in range(len(x))]
    out = Path(folder)
    np.savez(out / f"{prec}_{fmt}.npz", y_sem=np.concatenate(ysem), x_T=np.concatenate(xt), images=np.concatenate(imgs))
    (out / f"{prec}_{fmt}.json").write_text(json.dumps({
        "networks": nets, "training": training, "reconstruct_s_per_subject": seconds / len(pairs), "ssim": ssim,
        "subjects": [s for s, _, _ in pairs], "bundle_name": mb.name, "content_hash": mb.content_hash}))
    return 0


def markdown(result: dict) -> str:
    env, runs = result["environment"], result["runs"]
    lines = [
        "# Weight layout: contiguous (NCDHW) against channels-last (NDHWC) (issue 7)", "",
        f"Date: {result['date']}. Command: `{result['command']}`", "",
        f"Machine: {env['device']}; native bf16: {env['native_bf16']}; torch threads {env['threads']}; "
        f"torch {env['torch']}. The app's choice here: **{result['app_choice']}** for each precision "
        "(`ldae_bids.device.resolve_memory_format`).", "",
        f"Bundle `{result['bundle']['name']}` (content hash `{result['bundle']['content_hash'][:16]}...`); "
        f"{result['n_subjects']} {result['which']} from `{result['data']}`; reconstruct at batch "
        f"{result['batch_size']}, {result['steps']} DDIM steps. Each precision and layout ran in its own process "
        "(in one process, the runs before changed the timings of those after).", "",
        "## Speed (median seconds; speed-up = contiguous / channels-last)", "",
        "| precision | | contiguous | channels-last | speed-up |", "|---|---|---|---|---|",
    ]
    for prec, by_fmt in runs.items():
        a, b = by_fmt["contiguous"], by_fmt["channels_last"]
        for batch in a["networks"]:
            for net in NETWORKS:
                x, y = a["networks"][batch][net], b["networks"][batch][net]
                lines.append(f"| {prec} | {net.replace('_', ' ')}, one call, batch {batch} | {x:.3f} | {y:.3f} | "
                             f"{x / y:.2f}x |")
        for key in a.get("training", {}):
            x, y = a["training"][key], b["training"][key]
            what, batch = key.rsplit("_b", 1)
            lines.append(f"| {prec} | training: {what.replace('_', ' ')} (forward + backward), batch {batch} | "
                         f"{x:.3f} | {y:.3f} | {x / y:.2f}x |")
        x, y = a["reconstruct_s_per_subject"], b["reconstruct_s_per_subject"]
        lines.append(f"| {prec} | **reconstruct, {result['steps']} steps, per subject** | {x:.3f} | {y:.3f} | "
                     f"**{x / y:.2f}x** |")
    lines += ["", "## Same results, another summation order", "",
              "| precision | LDAE SSIM contiguous | LDAE SSIM channels-last | y_sem moved (rel. L2, mean) | "
              "x_T moved | reconstruction moved |", "|---|---|---|---|---|---|"]
    for prec, by_fmt in runs.items():
        a, b, d = by_fmt["contiguous"], by_fmt["channels_last"], by_fmt["channels_last"]["moved"]
        lines.append(f"| {prec} | {np.mean(a['ssim']):.4f} | {np.mean(b['ssim']):.4f} | {np.mean(d['y_sem']):.4f} | "
                     f"{np.mean(d['x_T']):.4f} | {np.mean(d['images']):.4f} |")
    lines += ["", "x_T is the end of the DDIM inversion, which drifts with any change of rounding (see "
              "precision.md); what matters is the reconstruction decoded from it.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=Path("/work/cache/ixi-preproc"),
                    help="model-ready images (bench_preprocess.py --save-dir)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="batch sizes of the per-network timings")
    ap.add_argument("--limit", type=int, default=8, help="validation subjects reconstructed")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the reconstruction")
    ap.add_argument("--batch-size", type=int, default=4, help="batch of the reconstruction")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--training", action="store_true",
                    help="also time training steps: the decoder refinement's (batch 2) and stage 2's denoiser's (batch 8)")
    ap.add_argument("--any-images", action="store_true",
                    help="time the first --limit model-ready images under --data, whoever they are (e.g. the app's "
                         "outputs of a GPU run), instead of the bundle's validation subjects")
    ap.add_argument("--worker", nargs=3, metavar=("PRECISION", "LAYOUT", "DIR"), default=None,
                    help=argparse.SUPPRESS)  # one configuration, in its own process (the main run starts these)
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only write the Markdown of an earlier memory_format.json (next to it)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0

    import torch

    from bench_preprocess import cpu_name
    from bench_reconstruction import bundle_or_skip
    from ldae_bids.device import cpu_has_native_bf16, resolve_memory_format

    bundle_path = bundle_or_skip(args.bundle, args.data)
    if bundle_path is None:
        return 0
    if args.worker:
        return worker(args, bundle_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in args.precisions:
            runs[prec] = {}
            for fmt in FORMATS:
                # each configuration in a fresh process: in one process, the kernels and memory of the runs before
                # changed the timings of the runs after (by up to 2x, either way, at batch 1)
                cmd = [sys.executable, __file__, "--worker", prec, fmt, tmp, "--bundle", str(bundle_path),
                       "--data", str(args.data), "--batch", *map(str, args.batch), "--limit", str(args.limit),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                       "--device", device, *(["--threads", str(args.threads)] if args.threads else []),
                       *(["--training"] if args.training else []), *(["--any-images"] if args.any_images else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{prec} {fmt}: worker failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
                    return 1
                if "skipped:" in proc.stdout:
                    print(proc.stdout.strip())
                    return 0
                runs[prec][fmt] = json.loads((Path(tmp) / f"{prec}_{fmt}.json").read_text())
                nets = runs[prec][fmt]["networks"]
                print(f"{prec} {fmt}: reconstruct {runs[prec][fmt]['reconstruct_s_per_subject']:.3f} s/subject, SSIM "
                      f"{np.mean(runs[prec][fmt]['ssim']):.4f}; " + "; ".join(
                          f"batch {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in n.items()) for b, n in nets.items()),
                      flush=True)
            ref, new = (np.load(Path(tmp) / f"{prec}_{fmt}.npz") for fmt in FORMATS)
            runs[prec]["channels_last"]["moved"] = {
                name: [relative(a, b) for a, b in zip(new[name], ref[name])] for name in ("y_sem", "x_T", "images")}
    first = runs[args.precisions[0]]["contiguous"]
    dev = torch.device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "benchmark": "memory_format",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_memory_format.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "bundle": {"path": str(bundle_path), "name": first["bundle_name"], "content_hash": first["content_hash"]},
        "which": "images" if args.any_images else "validation subjects of its split",
        "data": str(args.data), "subjects": first["subjects"], "n_subjects": len(first["subjects"]),
        "steps": args.steps, "batch_size": max(1, args.batch_size), "repeats": args.repeats,
        "isolation": "each precision and layout timed in its own process",
        "app_choice": ", ".join(f"{p}: {resolve_memory_format(dev, p)}" for p in args.precisions),
        "environment": {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else cpu_name(),
                        "native_bf16": True if dev.type == "cuda" else cpu_has_native_bf16(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
        "runs": runs,
        "seconds_total": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_format.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "memory_format.md").write_text(markdown(result))
    print(f"wrote {args.out / 'memory_format.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
