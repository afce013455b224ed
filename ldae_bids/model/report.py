"""Training report: loss curves, reconstructions and samples as PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _records(output: Path) -> list[dict]:
    path = Path(output) / "logs" / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(output: Path, target: Path) -> Path:
    """Training losses of both stages (with a running mean), validation SSIM, and the validation y_sem gain
    (does the denoiser use the semantic code: 0 = ignored) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(output)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, stages, title in ((axes[0], ("ae", "decoder"), "autoencoder L1 (stage 1, decoder refinement)"),
                              (axes[1], ("ldae",), "stage 2: eps MSE")):
        # the decoder refinement comes after stage 2 and counts its own steps: after stage 1's on this axis
        offset = max([r["step"] for r in recs if r.get("stage") == "ae"] or [0])
        pts = [(r["step"] + (offset if r["stage"] == "decoder" else 0), r.get("l1", r.get("loss")))
               for r in recs if r.get("stage") in stages and "loss" in r]
        if pts:
            steps, vals = (np.asarray(v, dtype=float) for v in zip(*pts))
            ax.plot(steps, vals, lw=0.6, alpha=0.5)
            k = min(25, len(vals))
            if k > 1:  # the logged losses are single batches: a running mean shows the trend
                ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), lw=1.6,
                        label=f"mean of {k} logs")
                ax.legend(fontsize=8)
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no steps of this stage logged in this folder", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
        ax.set(title=title, xlabel="step")
    for stage, key, label in (("ae", "val_ssim", "AE"), ("decoder", "val_ssim", "AE, decoder refined"),
                              ("ldae", "val_recon_ssim", "LDAE (inverted x_T)"),
                              ("ldae", "val_sample_ssim", "LDAE (random x_T)")):
        pts = [(r["step"], r[key]) for r in recs if r.get("stage") == stage and key in r]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=label)
    axes[2].set(title="validation SSIM (whole volume)", xlabel="step of its stage")
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no validation logged yet", ha="center", va="center", transform=axes[2].transAxes,
                     fontsize=9)
    pts = [(r["step"], r["val_ysem_gain"]) for r in recs if r.get("stage") == "ldae" and "val_ysem_gain" in r]
    if pts:
        axes[3].plot(*zip(*pts), marker="o", color="C3")
    else:
        axes[3].text(0.5, 0.5, "no stage-2 validation logged in this folder", ha="center", va="center",
                     transform=axes[3].transAxes, fontsize=9)
    axes[3].axhline(0.0, color="0.5", lw=0.8)
    axes[3].set(title="y_sem use (validation gain; 0 = ignored)", xlabel="stage-2 step")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    d, h, w = (s // 2 for s in vol.shape)
    return [np.rot90(vol[d]), np.rot90(vol[:, h]), np.rot90(vol[:, :, w])]


def plot_volumes(rows: dict[str, list[np.ndarray]], target: Path, title: str) -> Path:
    """Grid of mid slices: one row per subject, three views per column group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n_sub = len(rows[names[0]])
    fig, axes = plt.subplots(n_sub, 3 * len(names), figsize=(2.0 * 3 * len(names), 2.2 * n_sub), squeeze=False)
    for j, name in enumerate(names):
        for i, vol in enumerate(rows[name]):
            for k, sl in enumerate(_slices(vol)):
                ax = axes[i, 3 * j + k]
                ax.imshow(sl, cmap="gray", vmin=0, vmax=1)
                ax.axis("off")
                if i == 0 and k == 1:
                    ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def write_report(output: Path, bundle: Path, val_paths: list[Path], steps: int = 20, n: int = 3) -> list[Path]:
    """Write ``report/`` in the training folder from the exported bundle.

    Returns
    -------
    list of Path
        The figures written.
    """
    import torch

    from ldae_bids.model.bundle import load_bundle
    from ldae_bids.model.data import load_volume

    report = Path(output) / "report"
    report.mkdir(parents=True, exist_ok=True)
    figures = [plot_losses(output, report / "loss_curves.png")]
    if not val_paths:
        return figures
    mb = load_bundle(bundle)
    pipe = mb.pipeline
    from ldae_bids.model import loop

    pipe.precision = loop.precision(pipe.device)  # the training run's (--precision)
    x = torch.stack([torch.from_numpy(load_volume(p, mb.config.image_shape))[None] for p in val_paths[:n]])
    ae = pipe.autoencode(x)
    rec = pipe.reconstruct(x, steps=steps)
    smp = pipe.sample(rec.y_sem, torch.Generator().manual_seed(0), steps=steps)
    as_np = lambda t: [v[0].numpy() for v in t.cpu()]  # noqa: E731
    figures.append(plot_volumes({"input": as_np(x), "autoencoder": as_np(ae),
                                 f"LDAE ({steps} steps)": as_np(rec.images)},
                                report / "reconstructions.png", "validation subjects: input and reconstructions"))
    figures.append(plot_volumes({"input": as_np(x), "y_sem + random x_T": as_np(smp)},
                                report / "samples.png", "samples from the semantic code with random x_T"))
    return figures
