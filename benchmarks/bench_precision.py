#!/usr/bin/env python
"""fp32 against bf16 autocast for the model's inference, on this machine (issue 7).

What ``--precision`` trades, measured on the same bundle, images and threads:

- speed: median seconds of one call of each network at batch 1 (semantic encoder, autoencoder encoder
  and decoder, one denoiser call = one DDIM step), and of a whole reconstruction (inversion + decoding)
  at ``--steps`` DDIM steps per subject, in batches of ``--batch-size``;
- fidelity: SSIM / MSE to the input of the autoencoder alone and of the LDAE reconstruction, on the
  bundle's validation subjects (whole volume and inside the brain mask), and how far the bf16 codes are
  from the fp32 ones (relative L2 difference of y_sem and x_T);
- with ``--bids``: the age and sex probes (the app's ``fit_probe``, same folds) on y_sem of every subject
  under ``--data`` computed in each precision.

On a CPU, bf16 is only fast where the CPU computes it natively (AVX512-BF16 or AMX; recorded as
``native_bf16``); elsewhere PyTorch emulates it. Writes ``precision.json`` and ``precision.md`` to
``--out``; skips with a message (exit 0) when the bundle or the data is absent.

Usage::

    python benchmarks/bench_precision.py --data /work/cache/ixi-preproc [--bids ../shared/data/ixi] \\
        [--limit 8] [--steps 20] [--batch-size 4] [--threads 2] [--out benchmarks/results]
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
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

PRECISIONS = ("fp32", "bf16")
NETWORKS = ("semantic_encoder", "ae_encoder", "ae_decoder", "denoiser_step")


def network_times(pipe, shape, repeats: int, batch: int = 1) -> dict[str, float]:
    """Median seconds of one call of each network at ``batch`` (``bench_speed.timed``: one warm-up call)."""
    import torch

    from bench_speed import timed

    x = torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(0)).to(pipe.device)
    with torch.no_grad():
        z = pipe.encode_latent(x)
        y = pipe.encode_semantic(x)
        t = torch.full((batch,), 500, device=pipe.device, dtype=torch.long)

        def step():
            with pipe.autocast():
                pipe.denoiser(z, t, y)

        def ae_encoder():
            with pipe.autocast():
                pipe.autoencoder.encode(x)

        dev = pipe.device
        return {"semantic_encoder": timed(lambda: pipe.encode_semantic(x), dev, repeats)[0],
                "ae_encoder": timed(ae_encoder, dev, repeats)[0],
                "ae_decoder": timed(lambda: pipe.decode_latent(z), dev, repeats)[0],
                "denoiser_step": timed(step, dev, repeats * 3)[0]}


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def markdown(result: dict) -> str:
    env, prec = result["environment"], result["precisions"]
    lines = [
        "# Precision benchmark: fp32 against bf16 autocast (issue 7)",
        "",
        f"Date: {result['date']}. Command: `{result['command']}`",
        "",
        f"Machine: {env['device']}; native bf16: {env['native_bf16']}; torch threads {env['threads']}; "
        f"torch {env['torch']}.",
        "",
        f"Bundle `{result['bundle']['name']}` (content hash `{result['bundle']['content_hash'][:16]}...`); "
        f"{result['n_subjects']} validation subjects of its split from `{result['data']}`; batch "
        f"{result['batch_size']}, {result['steps']} DDIM steps.",
        "",
        "## Speed (median seconds)",
        "",
        "| | fp32 | bf16 | fp32 / bf16 |",
        "|---|---|---|---|",
    ]
    rows = [(n, f"{n.replace('_', ' ')}, one call, batch 1") for n in NETWORKS]
    rows.append(("reconstruct", f"reconstruct (inversion + decoding, {result['steps']} steps), per subject"))
    rows.append(("autoencode", "autoencoder alone, per subject"))
    for key, label in rows:
        a, b = prec["fp32"]["seconds"][key], prec["bf16"]["seconds"][key]
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    lines += ["", "## Fidelity (mean over subjects; SSIM / MSE to the input, [0, 1] intensities)", "",
              "| | fp32 | bf16 | bf16 - fp32 (mean, worst subject) |", "|---|---|---|---|"]
    for key in ("ae_ssim", "ae_ssim_mask", "ldae_ssim", "ldae_ssim_mask", "ldae_mse"):
        a, b = np.array(prec["fp32"]["per_subject"][key]), np.array(prec["bf16"]["per_subject"][key])
        d = b - a
        worst = d[np.argmax(np.abs(d))]
        fmt = ".5f" if "mse" in key else ".4f"
        lines.append(f"| {key.replace('_', ' ')} | {a.mean():{fmt}} | {b.mean():{fmt}} | "
                     f"{d.mean():+{fmt}}, {worst:+{fmt}} |")
    codes = result["codes"]
    lines += ["", f"Codes: y_sem of bf16 differs from fp32 by {np.mean(codes['ysem_rel']):.4f} (relative L2, mean; "
              f"max {np.max(codes['ysem_rel']):.4f}); x_T by {np.mean(codes['xt_rel']):.4f} (max "
              f"{np.max(codes['xt_rel']):.4f}): the inversion's path drifts, its reconstruction does not.", ""]
    if result.get("probes"):
        lines += ["## Probes on y_sem of every subject (the app's fit_probe, same folds)", "",
                  "| target | metric | fp32 | bf16 |", "|---|---|---|---|"]
        for target, row in result["probes"].items():
            f32, b16 = row["fp32"], row["bf16"]
            lines.append(f"| {target} | {row['metric']} | {f32['value']:.3f} [{f32['low']:.3f}, {f32['high']:.3f}] | "
                         f"{b16['value']:.3f} [{b16['low']:.3f}, {b16['high']:.3f}] |")
        lines.append("")
    return "\n".join(lines)


def probe_rows(args, mb, n_boot: int) -> dict:
    """Age / sex probes on y_sem of every subject under ``--data``, in each precision, same folds."""
    import torch

    from bench_probe_ceiling import read_table
    from ldae_bids.analysis.probe import fit_probe
    from ldae_bids.model.data import load_volume

    people_path = args.bids / "participants.tsv"
    if not people_path.is_file():
        print(f"probes skipped: no participants table at {people_path}")
        return {}
    people = read_table(people_path)
    labels = sorted(s for s in people if (args.data / f"sub-{s}_desc-preproc_T1w.nii.gz").is_file())
    if len(labels) < 10:
        print(f"probes skipped: only {len(labels)} subjects with an image under {args.data}")
        return {}
    codes = {p: [] for p in PRECISIONS}
    shape = tuple(mb.config.image_shape)
    for i in range(0, len(labels), args.batch_size):
        x = torch.from_numpy(np.stack([load_volume(args.data / f"sub-{s}_desc-preproc_T1w.nii.gz", shape)
                                       for s in labels[i:i + args.batch_size]]))[:, None]
        for p in PRECISIONS:
            mb.pipeline.precision = p
            codes[p].append(mb.pipeline.encode_semantic(x).cpu().numpy())
    out = {}
    groups = np.array(labels)
    for target in args.targets:
        y = [people[s].get(target) for s in labels]
        row = {}
        for p in PRECISIONS:
            res = fit_probe(np.concatenate(codes[p]), y, groups, n_splits=5, seed=0, n_boot=n_boot,
                            target=target, feature_name=f"y_sem ({p})")
            key = "mae" if res.kind == "regression" else "auroc"
            est = res.metrics[key]
            row["metric"] = key
            row[p] = {"value": est.value, "low": est.low, "high": est.high, "n": res.n_rows}
        out[target] = row
        print(f"probe {target}: {row['metric']} fp32 {row['fp32']['value']:.3f}, bf16 {row['bf16']['value']:.3f}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=Path("/work/cache/ixi-preproc"),
                    help="model-ready images (bench_preprocess.py --save-dir)")
    ap.add_argument("--bids", type=Path, default=None, help="BIDS folder with participants.tsv: also run probes")
    ap.add_argument("--targets", nargs="+", default=["age", "sex"])
    ap.add_argument("--limit", type=int, default=8, help="validation subjects for the fidelity rows")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the reconstruction")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import torch

    from bench_preprocess import cpu_name
    from bench_reconstruction import bundle_or_skip, validation_pairs
    from ldae_bids.device import cpu_has_native_bf16
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
    pipe, shape = mb.pipeline, tuple(mb.config.image_shape)
    pairs = validation_pairs(mb, args.data, args.limit)
    if not pairs:
        return 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x_all = torch.stack([torch.from_numpy(load_volume(p, shape))[None] for _, p, _ in pairs])
    masks = [load_volume(m, shape) > 0.5 if m else None for _, _, m in pairs]
    bs = max(1, args.batch_size)
    t0 = time.time()
    precisions, codes = {}, {}
    for p in PRECISIONS:
        pipe.precision = p
        seconds = network_times(pipe, shape, args.repeats)
        per = {k: [] for k in ("ae_ssim", "ae_ssim_mask", "ldae_ssim", "ldae_ssim_mask", "ldae_mse")}
        ysem, xt, t_rec, t_ae = [], [], 0.0, 0.0
        for start in range(0, len(pairs), bs):
            x = x_all[start:start + bs]
            t = time.perf_counter()
            ae = pipe.autoencode(x)
            sync()
            t_ae += time.perf_counter() - t
            t = time.perf_counter()
            rec = pipe.reconstruct(x, steps=args.steps)
            sync()
            t_rec += time.perf_counter() - t
            ysem.append(rec.y_sem.float().cpu().numpy())
            xt.append(rec.x_T.float().cpu().numpy())
            for j in range(len(x)):
                m = masks[start + j]
                inp = x[j, 0].numpy()
                a = similarity(ae[j, 0].float().cpu().numpy(), inp, m)
                r = similarity(rec.images[j, 0].float().cpu().numpy(), inp, m)
                per["ae_ssim"].append(a["ssim"])
                per["ae_ssim_mask"].append(a.get("ssim_mask", float("nan")))
                per["ldae_ssim"].append(r["ssim"])
                per["ldae_ssim_mask"].append(r.get("ssim_mask", float("nan")))
                per["ldae_mse"].append(r["mse"])
        seconds["reconstruct"] = t_rec / len(pairs)
        seconds["autoencode"] = t_ae / len(pairs)
        precisions[p] = {"seconds": seconds, "per_subject": per}
        codes[p] = (np.concatenate(ysem), np.concatenate(xt))
        print(f"{p}: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items())
              + f"; AE SSIM {np.mean(per['ae_ssim']):.4f}, LDAE SSIM {np.mean(per['ldae_ssim']):.4f}", flush=True)
    (y32, x32), (y16, x16) = codes["fp32"], codes["bf16"]
    result = {
        "benchmark": "precision",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "bundle": {"path": str(bundle_path), "name": mb.name, "content_hash": mb.content_hash},
        "data": str(args.data), "subjects": [s for s, _, _ in pairs], "n_subjects": len(pairs),
        "steps": args.steps, "batch_size": bs, "repeats": args.repeats,
        "environment": {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_name(),
                        "native_bf16": True if device.startswith("cuda") else cpu_has_native_bf16(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
        "precisions": precisions,
        "codes": {"ysem_rel": [relative(a, b) for a, b in zip(y16, y32)],
                  "xt_rel": [relative(a, b) for a, b in zip(x16, x32)]},
        "probes": probe_rows(args, mb, args.n_boot) if args.bids else {},
    }
    result["seconds_total"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "precision.md").write_text(markdown(result))
    print(f"wrote {args.out / 'precision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
