"""Image similarity for intensities in [0, 1]: 3D SSIM and MSE, whole volume or inside a mask.

SSIM uses an 11-voxel gaussian window (sigma 1.5), data range 1, and the usual
constants (K1 = 0.01, K2 = 0.03); the masked value is the mean of the SSIM map over
mask voxels. Inputs are numpy arrays or tensors of shape (D, H, W), (1, D, H, W) or
(B, 1, D, H, W); batched inputs give one value per item.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ssim", "mse", "ssim_map", "ssim_map_tensor", "similarity", "similarity_batch"]


def _as_batch(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().float().cpu()
    while t.ndim < 5:
        t = t.unsqueeze(0)
    return t


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable gaussian filter of every channel of (B, C, D, H, W) ``x``, zero padding (callers divide by
    the blurred ones to renormalise).

    One grouped convolution per axis for all channels: the five moments of SSIM blurred together are several
    times faster on the CPU than five single-channel passes, which ran on PyTorch's slow native kernel
    (``cpu_conv.py``); ``benchmarks/bench_host_io.py``: the reconstruct stage's SSIM/MSE 0.26 -> 0.07 s per
    subject. Same arithmetic, same result.
    """
    k, c = kernel.numel(), x.shape[1]
    out = x
    for dim in range(3):
        shape = [c, 1, 1, 1, 1]
        shape[2 + dim] = k
        padding = [0, 0, 0]
        padding[dim] = k // 2
        out = F.conv3d(out, kernel.reshape(1, k).expand(c, k).reshape(shape), padding=tuple(padding), groups=c)
    return out


def ssim_map(a, b, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Voxel-wise SSIM map, (B, 1, D, H, W); border voxels use a renormalised window."""
    x, y = _as_batch(a), _as_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    return ssim_map_tensor(x, y, window, sigma, data_range)


def ssim_map_tensor(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
                    data_range: float = 1.0) -> torch.Tensor:
    """:func:`ssim_map` of two (B, 1, D, H, W) float tensors on their device, differentiable (a training
    loss can be 1 - its mean: the same SSIM the benchmarks report)."""
    if x.shape != y.shape or x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, D, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    kernel = _gaussian_kernel(window, sigma).to(x.device, x.dtype)
    with torch.no_grad():
        norm = _blur(torch.ones_like(x[:1]), kernel)  # corrects the zero padding at the borders
    # the five local moments, blurred in one pass: E[x], E[y], E[x^2], E[y^2], E[xy]
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel) / norm
    mu_x, mu_y, exx, eyy, exy = moments.split(1, dim=1)
    sxx, syy, sxy = exx - mu_x**2, eyy - mu_y**2, exy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def _reduce(values: torch.Tensor, mask) -> np.ndarray:
    if mask is None:
        return values.flatten(1).mean(1).numpy()
    m = _as_batch(mask) > 0.5
    m = m.expand_as(values)
    out = [(v[mm].mean() if mm.any() else torch.tensor(float("nan"))) for v, mm in zip(values, m)]
    return torch.stack(out).numpy()


def _scalar(values: np.ndarray, batched: bool):
    return values.astype(float) if batched else float(values[0])


def ssim(a, b, mask=None, window: int = 11, sigma: float = 1.5) -> float | np.ndarray:
    """Mean 3D SSIM of ``a`` and ``b`` (whole volume, or inside ``mask`` when given)."""
    batched = _as_batch(a).shape[0] > 1
    return _scalar(_reduce(ssim_map(a, b, window, sigma), mask), batched)


def mse(a, b, mask=None) -> float | np.ndarray:
    """Mean squared error (whole volume, or inside ``mask`` when given)."""
    x, y = _as_batch(a), _as_batch(b)
    batched = x.shape[0] > 1
    return _scalar(_reduce((x - y) ** 2, mask), batched)


def similarity(a, b, mask=None) -> dict[str, float]:
    """SSIM and MSE of one pair, whole volume and (if ``mask``) inside the mask."""
    return similarity_batch(_as_batch(a), _as_batch(b), None if mask is None else _as_batch(mask))[0]


def similarity_batch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict[str, float]]:
    """:func:`similarity` of each pair of two (B, 1, D, H, W) tensors, computed on their device (a GPU batch
    takes milliseconds; on the CPU an 80x96x80 pair takes a few hundredths of a second)."""
    x, y = a.detach().float(), b.detach().float()
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    smap = ssim_map_tensor(x, y)
    sq = (x - y) ** 2
    values = {"ssim": smap.flatten(1).mean(1), "mse": sq.flatten(1).mean(1)}
    if mask is not None:
        m = (mask.to(x.device).float() > 0.5).expand_as(x).flatten(1).float()
        count = m.sum(1)
        nan = torch.full_like(count, float("nan"))
        values["ssim_mask"] = torch.where(count > 0, (smap.flatten(1) * m).sum(1) / count.clamp(min=1), nan)
        values["mse_mask"] = torch.where(count > 0, (sq.flatten(1) * m).sum(1) / count.clamp(min=1), nan)
    host = {k: v.double().cpu().tolist() for k, v in values.items()}  # one transfer per metric
    return [{k: float(host[k][i]) for k in host} for i in range(x.shape[0])]
