"""Semantic encoder: a 3D CNN mapping a whole image to the semantic code y_sem.

Strided residual stages reduce the volume; a head turns the last feature map into
y_sem. Two heads:

``mean``
    Global average pooling and a linear layer (DiffAE's head for natural images).
``flatten``
    A 1x1x1 convolution to ``head_channels``, then a linear layer over every position of
    the last grid. Images here are aligned to a template, so *where* a feature is (a
    ventricle, a sulcus) is information; averaging over positions discards it. Measured
    on the first shipped model (mean head): the pooled features varied across subjects by
    1.5% of their magnitude against 9% for the per-position features, and its denoiser
    gave the same loss with another subject's y_sem (the code carried almost nothing).
    Needs ``grid``, the input image shape.

``standardise`` ends the encoder with a per-dimension standardisation (batch statistics in
training, the training set's statistics afterwards: :meth:`SemanticEncoder.calibrate`). Registered
brains look alike, so without it y_sem varies across subjects by about 1-2% of its magnitude (first
shipped model), and the denoiser's conditioning, a multiplicative scale per channel, barely moves
between subjects; standardised, every dimension varies by about 1 from the start. A linear probe on
z-scored y_sem is unaffected by it (a per-dimension affine map).

The first stage already works at half resolution, so the encoder stays cheap next to
the denoiser. Fully described by its constructor arguments
(:class:`ldae_bids.model.config.SemanticEncoderConfig`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3x3 conv)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SemanticEncoder(nn.Module):
    """Image (B, in_channels, D, H, W) -> y_sem (B, emb_dim).

    Parameters
    ----------
    in_channels
        Image channels (1 for T1w).
    channels
        Width of each stage; every stage halves the resolution (the first with a
        stride-2 stem).
    num_res_blocks
        Residual blocks per stage.
    emb_dim
        Size of y_sem.
    norm_num_groups
        GroupNorm groups; must divide every width.
    pooling
        ``"mean"`` or ``"flatten"`` (see the module docstring).
    head_channels
        Channels of the 1x1x1 convolution before flattening (``flatten`` only).
    grid
        Input image shape (D, H, W); required by ``flatten``.
    standardise
        End with a per-dimension standardisation (see the module docstring).
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (16, 32, 64, 128), num_res_blocks: int = 1,
                 emb_dim: int = 512, norm_num_groups: int = 8, pooling: str = "mean", head_channels: int = 16,
                 grid: tuple[int, int, int] | None = None, standardise: bool = False):
        super().__init__()
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling must be 'mean' or 'flatten', not {pooling!r}")
        if pooling == "flatten" and grid is None:
            raise ValueError("pooling 'flatten' needs the input grid")
        self.pooling = pooling
        self.stem = nn.Conv3d(in_channels, channels[0], 3, stride=2, padding=1)
        stages = []
        ch = channels[0]
        for i, width in enumerate(channels):
            if i > 0:
                stages.append(nn.Conv3d(ch, width, 3, stride=2, padding=1))
                ch = width
            stages.extend(ResBlock(ch, ch, norm_num_groups) for _ in range(num_res_blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.GroupNorm(norm_num_groups, ch)
        if pooling == "flatten":
            self.final_grid = tuple(int(s) for s in grid)
            for _ in channels:  # every stride-2 convolution (kernel 3, padding 1) gives ceil(n / 2)
                self.final_grid = tuple((s + 1) // 2 for s in self.final_grid)
            self.reduce = nn.Conv3d(ch, head_channels, 1)
            self.head = nn.Linear(head_channels * math.prod(self.final_grid), emb_dim)
        else:
            self.head = nn.Linear(ch, emb_dim)
        self.out_norm = nn.BatchNorm1d(emb_dim, affine=False) if standardise else None

    def unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """The code before the standardisation (equal to :meth:`forward` without ``standardise``)."""
        h = F.silu(self.norm(self.stages(self.stem(x))))
        if self.pooling == "flatten":
            return self.head(self.reduce(h).flatten(1))
        return self.head(h.mean(dim=(2, 3, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unnormalised(x)
        if self.out_norm is None:
            return y
        if self.training and y.shape[0] > 1:
            return self.out_norm(y)
        n = self.out_norm  # inference, or a training batch of one: the stored statistics
        return F.batch_norm(y, n.running_mean, n.running_var, training=False, eps=n.eps)

    @torch.no_grad()
    def calibrate(self, batches) -> int:
        """Set the standardisation to the exact mean and variance of the code over ``batches``
        (an iterable of image batches, e.g. the whole training set); returns the number of images.
        A no-op without ``standardise``."""
        if self.out_norm is None:
            return 0
        was_training = self.training
        self.eval()
        codes = torch.cat([self.unnormalised(b).float() for b in batches])
        self.out_norm.running_mean.copy_(codes.mean(0))
        self.out_norm.running_var.copy_(codes.var(0, unbiased=codes.shape[0] > 1))
        self.train(was_training)
        return int(codes.shape[0])
