"""Reconstruction benchmark of an LDAE bundle on the validation subjects of its own split.

For each validation subject (model-ready ``sub-<label>_desc-preproc_T1w.nii.gz`` under
``--data``, brain mask ``_desc-brain_mask`` beside it), compares with the input image:

- the autoencoder alone (the ceiling of every LDAE reconstruction);
- LDAE with x_T from deterministic DDIM inversion, at each of ``--steps`` DDIM steps;
- LDAE from y_sem alone with a random x_T (seeded), at ``--random-steps`` steps (channel means anchored when
  the bundle records them, and the same draws without: ``random_free``);
- when the bundle records the channel means, LDAE with inverted x_T decoded with them anchored, at each of
  ``--anchored-steps`` (``ldae_<n>_anchored``): whether anchoring would help reconstruction too (the app's
  ``reconstruct`` and ``fill-missing-sessions`` stages decode without it);
- with ``--refine-steps N``: the latent refined by N steps (``LdaePipeline.refine_latent``, what
  ``--stage-option embed.refine_latent=N`` does), decoded by the autoencoder (``ae_refined``) and through the
  diffusion round trip at each of ``--refined-ddim-steps`` (``ldae_<n>_refined``: inversion of the refined latent,
  then decoding; seconds include the refinement).

It also measures whether the denoiser uses y_sem at all (``ysem_use``): the noise-prediction
error with each subject's own y_sem against another validation subject's, at fixed timesteps
(:func:`ldae_bids.model.stage2.ysem_use`; gain 0 = the code is ignored).

Metrics: SSIM and MSE on [0, 1] intensities, whole volume and inside the brain mask, plus
seconds per subject; ``ssim_written`` is the whole-volume SSIM of the image as the ``reconstruct``
stage writes it (outside the input's brain mask set to 0; the input is skull-stripped, so zero there). Writes ``reconstruction.json`` and ``reconstruction.md`` to ``--out``.
Skips with a message (exit 0) when the data or the bundle's validation subjects are absent.

Usage::

    python benchmarks/bench_reconstruction.py --bundle ldae_bids/data/models/ldae-compact-ixi \
        --data /work/cache/ixi-preproc [--steps 10,20,50,100] [--limit N] [--out benchmarks/results]
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
sys.path.insert(0, str(REPO))

PAPER = {"ae": 0.962, "ldae_10": 0.953, "ldae_20": 0.960, "ldae_50": 0.962, "ldae_100": 0.962, "random": 0.87}
KEYS = ("ssim", "ssim_mask", "mse", "mse_mask", "ssim_written")


def find(data: Path, label: str, suffix: str) -> Path | None:
    hits = sorted(data.glob(f"**/sub-{label}_*{suffix}")) or sorted(data.glob(f"**/sub-{label}{suffix}"))
    return hits[0] if hits else None


def validation_pairs(mb, data: Path, limit: int | None) -> list[tuple[str, Path, Path | None]]:
    """``(label, image, brain mask or None)`` of the bundle's validation subjects that have an image under
    ``data`` (at most ``limit``); says so and returns ``[]`` when none has."""
    labels = mb.metadata.get("training", {}).get("split", {}).get("validation", [])
    pairs = [(s, find(data, s, "_desc-preproc_T1w.nii.gz"), find(data, s, "_desc-brain_mask.nii.gz")) for s in labels]
    pairs = [p for p in pairs if p[1] is not None][:limit]
    if not pairs:
        print(f"skipped: none of the bundle's {len(labels)} validation subjects has an image under {data}")
    return pairs


def bundle_or_skip(bundle: Path | None, data: Path) -> Path | None:
    """The bundle to measure (``--bundle``, else the shipped one), or None after a ``skipped:`` line when it or
    the model-ready images (``bench_preprocess.py --save-dir``) are missing: no data, nothing measured."""
    from ldae_bids.model.bundle import default_bundle_path

    bundle = bundle or default_bundle_path()
    if not (bundle / "config.json").exists():
        print(f"skipped: no model bundle at {bundle}")
        return None
    if not data.is_dir():
        print(f"skipped: data folder {data} not found (bench_preprocess.py --save-dir makes it)")
        return None
    return bundle


def summarise(rows: list[dict]) -> dict:
    out = {}
    for method in rows[0]["methods"]:
        vals = {k: [r["methods"][method][k] for r in rows] for k in (*KEYS, "seconds")}
        out[method] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                       for k, v in vals.items()}
    return out


def _paired_table(result: dict, pairs: list[tuple[str, str]], variant: str, first: str, row_name,
                  intro: str) -> list[str]:
    """Markdown lines comparing each (plain, variant) method pair, paired over subjects (whole-volume SSIM)."""
    if not pairs:
        return []
    s = result["summary"]
    ssim = {m: np.array([r["methods"][m]["ssim"] for r in result["subjects"]]) for p in pairs for m in p}
    lines = [intro, "", f"| {first} | plain | {variant} | {variant} - plain (mean) | subjects better {variant} |",
             "|---|---|---|---|---|"]
    for plain, other in pairs:
        d = ssim[other] - ssim[plain]
        lines.append(f"| {row_name(plain)} | {s[plain]['ssim']['mean']:.4f} | {s[other]['ssim']['mean']:.4f} | "
                     f"{d.mean():+.4f} | {int((d > 0).sum())}/{d.size} |")
    return [*lines, ""]


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Reconstruction benchmark", "",
        f"Bundle `{result['bundle']['name']}` (content hash `{result['bundle']['content_hash'][:16]}...`), "
        f"{result['n_subjects']} validation subjects of its own subject-level split, data `{result['data']}`.",
        f"Device: {result['environment']['device']}, torch threads {result['environment']['threads']}, "
        f"{result['environment'].get('precision', 'fp32 on the CPU, bf16 on CUDA')}; "
        f"{result['date']}; batch {result.get('batch_size', 1)} (seconds per subject = batch time / batch).", "",
        f"Command: `{result.get('command', '')}`", "",
        "Similarity to the input image ([0, 1] intensities; mean ± sd over subjects; 'mask' = inside the brain mask).",
        "'written' = whole-volume SSIM of the image as the reconstruct stage writes it (outside the brain mask "
        "set to 0).",
        "", "| method | SSIM | SSIM (mask) | SSIM (written) | MSE | MSE (mask) | s / subject | paper SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, v in s.items():
        ref = PAPER.get(method, "")
        cells = [f"{v[k]['mean']:.4f} ± {v[k]['sd']:.4f}" for k in ("ssim", "ssim_mask", "ssim_written")]
        cells += [f"{v[k]['mean']:.5f} ± {v[k]['sd']:.5f}" for k in ("mse", "mse_mask")]
        lines.append(f"| {result['labels'][method]} | " + " | ".join(cells) + f" | {v['seconds']['mean']:.1f} | {ref} |")
    lines += [
        "", "Paper figures (Lozupone et al. 2026, ADNI, 1.5 mm 128x160x128, GPU-trained) are given for orientation "
        "only: different data, resolution, model size and training budget.",
        "Methods: `ae` = autoencoder only; `ldae_N` = DDIM inversion to x_T then N-step DDIM decoding, conditioned "
        "on y_sem; `random` = y_sem with a random x_T (seeded), decoded with "
        f"{result['random_steps']} steps" + (
            "; the bundle records its training latents' channel means, so `random` anchors the predicted clean "
            "latent's channel means to them at every step (`LdaePipeline.ddim`), and `random_free` decodes the "
            "same x_T without." if "random_free" in s else "."), "",
    ]
    refined = [(m.removesuffix("_refined"), m) for m in s if m.endswith("_refined") and m.removesuffix("_refined") in s]
    lines += _paired_table(result, refined, "refined", "method", lambda plain: plain, (
        f"`*_refined` = the encoder's latent refined by {result.get('refine_steps')} Adam steps on L1 + "
        "(1 - SSIM) of its decoded image (`LdaePipeline.refine_latent`, the `embed` stage's `refine_latent` "
        "option), decoded by the autoencoder (`ae_refined`) or inverted to x_T and decoded (`ldae_N_refined`); "
        "their seconds include the refinement. Paired over subjects, whole-volume SSIM:"))
    anchored = [(f"ldae_{n}", f"ldae_{n}_anchored") for n in result["steps"] if f"ldae_{n}_anchored" in s]
    lines += _paired_table(result, anchored, "anchored", "steps", lambda plain: plain.split("_")[1], (
        "`ldae_N_anchored` = the same inversion, decoded with the channel means anchored (the reconstruct "
        "stage does not anchor). Paired over subjects, whole-volume SSIM:"))
    use = result.get("ysem_use")
    if use:
        lines += [
            "## Does the denoiser use y_sem?", "",
            f"Noise-prediction error (MSE) on the {result['n_subjects']} validation latents at fixed timesteps, "
            "with each subject's own y_sem and with another validation subject's (the batch rolled by one). "
            "Gain = other / own - 1; 0 means the denoiser ignores whose code it is given.", "",
            "| t | own y_sem | other subject's y_sem | gain |", "|---|---|---|---|",
        ]
        lines += [f"| {t} | {o:.5f} | {x:.5f} | {g:+.4f} |"
                  for t, o, x, g in zip(use["timesteps"], use["own"], use["other"], use["gain"])]
        lines += ["", f"Mean gain: {use['mean_gain']:+.4f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=Path("/work/cache/ixi-preproc"))
    ap.add_argument("--steps", default="10,20,50,100", help="comma-separated DDIM step counts")
    ap.add_argument("--random-steps", type=int, default=50)
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="latent refinement steps for the *_refined rows (0: none)")
    ap.add_argument("--refine-lr", type=float, default=None,
                    help="Adam step size of the refinement (default: the app's, pipeline.REFINE_LR)")
    ap.add_argument("--refined-ddim-steps", default="20,50",
                    help="comma-separated DDIM step counts of the refined reconstructions")
    ap.add_argument("--anchored-steps", default="10,20",
                    help="comma-separated DDIM step counts of the anchored reconstructions (empty: none)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many validation subjects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="subjects per batch (seconds are per subject)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="model arithmetic (the app's --precision; default fp32, the exact reference; "
                         "bench_precision.py measures what bf16 changes)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--record", action="store_true",
                    help="also write the summary into the bundle's metadata.json (checksums recomputed)")
    args = ap.parse_args(argv)

    import torch

    from ldae_bids.metrics import similarity
    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.model.data import load_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle_path = bundle_or_skip(args.bundle, args.data)
    if bundle_path is None:
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mb = load_bundle(bundle_path, device=device)
    pipe = mb.pipeline
    from ldae_bids.device import resolve_precision

    precision = pipe.precision = resolve_precision(pipe.device, args.precision)
    pairs = validation_pairs(mb, args.data, args.limit)
    if not pairs:
        return 0
    steps = [int(s) for s in args.steps.split(",") if s]
    names = {"ae": "autoencoder only", **{f"ldae_{n}": f"LDAE, inverted x_T, {n} steps" for n in steps},
             "random": f"LDAE, y_sem + random x_T, {args.random_steps} steps"}
    anchored = pipe.latent_mean is not None  # the bundle records the latent channel means: sample() anchors them
    if anchored:
        names["random"] += " (channel means anchored)"
        names["random_free"] = f"LDAE, y_sem + the same random x_T, {args.random_steps} steps, not anchored"
        anchored_steps = [int(n) for n in args.anchored_steps.split(",") if n]
        names.update({f"ldae_{n}_anchored": f"LDAE, inverted x_T, {n} steps, decoded with the channel means "
                                             "anchored" for n in anchored_steps})
    else:
        anchored_steps = []
    refined_steps = [int(n) for n in args.refined_ddim_steps.split(",") if n] if args.refine_steps > 0 else []
    from ldae_bids.model.pipeline import REFINE_LR

    refine_lr = REFINE_LR if args.refine_lr is None else args.refine_lr
    if args.refine_steps > 0:
        names["ae_refined"] = f"autoencoder, latent refined ({args.refine_steps} steps, step size {refine_lr:g})"
        names.update({f"ldae_{n}_refined": f"LDAE, inverted x_T of the refined latent, {n} steps"
                      for n in refined_steps})
    rows = []
    bs = max(1, args.batch_size)
    for start in range(0, len(pairs), bs):
        chunk = pairs[start:start + bs]
        x = torch.stack([torch.from_numpy(load_volume(p, mb.config.image_shape))[None] for _, p, _ in chunk])
        masks = [load_volume(m, mb.config.image_shape) > 0.5 if m else None for _, _, m in chunk]
        methods: list[dict] = [{} for _ in chunk]

        def score(name, fn, extra_seconds=0.0):
            t = time.time()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = (time.time() - t) / len(chunk) + extra_seconds  # batch time shared by its subjects
            for j in range(len(chunk)):
                img = out[j, 0].float().cpu().numpy()
                written = np.where(masks[j], img, 0.0) if masks[j] is not None else img
                methods[j][name] = {**similarity(img, x[j, 0].numpy(), masks[j]),
                                    "ssim_written": similarity(written, x[j, 0].numpy())["ssim"],
                                    "seconds": seconds}

        score("ae", lambda: pipe.autoencode(x))
        for n in steps:
            score(f"ldae_{n}", lambda n=n: pipe.reconstruct(x, steps=n).images)
        for n in anchored_steps:  # the same inversion, then the anchored decoding (timed together, as ldae_<n>)
            def anchored_reconstruction(n=n):
                enc = pipe.encode(x, steps=n)
                return pipe.decode(enc.x_T, enc.y_sem, steps=n, anchor_mean=True)

            score(f"ldae_{n}_anchored", anchored_reconstruction)
        if args.refine_steps > 0:
            t = time.time()
            refined = pipe.refine_latent(x, steps=args.refine_steps, lr=refine_lr)
            refine_seconds = (time.time() - t) / len(chunk)
            score("ae_refined", lambda: pipe.decode_latent(refined), refine_seconds)
            y_sem = pipe.encode_semantic(x)
            for n in refined_steps:
                score(f"ldae_{n}_refined", lambda n=n: pipe.decode(pipe.ddim(refined, y_sem, n, invert=True), y_sem,
                                                                    steps=n), refine_seconds)
        x_T = pipe.random_x_T(len(chunk), torch.Generator().manual_seed(args.seed + start))
        score("random", lambda: pipe.sample(pipe.encode_semantic(x), steps=args.random_steps, x_T=x_T))
        if anchored:  # what anchoring changes, on the same draws
            score("random_free", lambda: pipe.sample(pipe.encode_semantic(x), steps=args.random_steps, x_T=x_T,
                                                     anchor_mean=False))
        for j, (label, _, _) in enumerate(chunk):
            rows.append({"subject": label, "methods": methods[j]})
            print(f"[{start + j + 1}/{len(pairs)}] sub-{label}: " + ", ".join(
                f"{k} {v['ssim']:.4f}" for k, v in methods[j].items()), flush=True)
    from ldae_bids.model.stage2 import ysem_use

    use = None
    if len(pairs) >= 2:
        x_all = torch.stack([torch.from_numpy(load_volume(p, mb.config.image_shape))[None] for _, p, _ in pairs])
        use = ysem_use(pipe, x_all, seed=args.seed)
        print("y_sem use: gain per timestep " + ", ".join(
            f"t={t}: {g:+.4f}" for t, g in zip(use["timesteps"], use["gain"])), flush=True)
    result = {
        "benchmark": "reconstruction",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "bundle": {"path": str(bundle_path), "name": mb.name, "content_hash": mb.content_hash,
                   "training": {k: mb.metadata.get("training", {}).get(k) for k in
                                ("preset", "ae_steps", "ldae_steps", "decoder_steps", "n_train_subjects",
                                 "n_val_subjects")}},
        "data": str(args.data),
        "n_subjects": len(rows),
        "steps": steps,
        "random_steps": args.random_steps,
        "refine_steps": args.refine_steps,
        "refine_lr": refine_lr if args.refine_steps > 0 else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "command": "python benchmarks/bench_reconstruction.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {"device": torch.cuda.get_device_name(0) if device.startswith("cuda")
                        else f"CPU ({platform.machine()})", "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "precision": precision},
        "labels": names,
        "summary": summarise(rows),
        "ysem_use": use,
        "paper_ssim": PAPER,
        "subjects": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reconstruction.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "reconstruction.md").write_text(markdown(result))
    print(markdown(result))
    if args.record:
        from ldae_bids.model.bundle import update_metadata

        digest = update_metadata(bundle_path, {"metrics": {"reconstruction_benchmark": {
            "date": result["date"], "n_validation_subjects": len(rows), "data": str(args.data),
            "environment": result["environment"], "summary": result["summary"], "labels": names}}})
        print(f"recorded in {bundle_path / 'metadata.json'}; new content hash {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
