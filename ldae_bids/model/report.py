"""Training report: loss curves, reconstructions and samples as PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _records(output: Path) -> list[dict]:
    path = Path(output) / "logs" / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(output: Path, target: Path) -> Path:
    """Training losses of both stages and validation SSIM against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(output)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, stage, title in ((axes[0], "ae", "stage 1: autoencoder L1"), (axes[1], "ldae", "stage 2: eps MSE")):
        pts = [(r["step"], r.get("l1", r.get("loss"))) for r in recs if r.get("stage") == stage and "loss" in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8)
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
    for stage, key, label in (("ae", "val_ssim", "AE"), ("ldae", "val_recon_ssim", "LDAE (inverted x_T)"),
                              ("ldae", "val_sample_ssim", "LDAE (random x_T)")):
        pts = [(r["step"], r[key]) for r in recs if r.get("stage") == stage and key in r]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=label)
    axes[2].set(title="validation SSIM (whole volume)", xlabel="step of its stage")
    axes[2].legend(fontsize=8)
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
