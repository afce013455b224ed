"""Semantic encoder: a 3D CNN mapping a whole image to the semantic code y_sem.

Strided residual stages reduce the volume, global average pooling and a linear
layer give y_sem. The first stage already works at half resolution, so the encoder
stays cheap next to the denoiser. Fully described by its constructor arguments
(:class:`ldae_bids.model.config.SemanticEncoderConfig`).
"""

from __future__ import annotations

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
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (16, 32, 64, 128), num_res_blocks: int = 1,
                 emb_dim: int = 512, norm_num_groups: int = 8):
        super().__init__()
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
        self.head = nn.Linear(ch, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.stages(self.stem(x))))
        return self.head(h.mean(dim=(2, 3, 4)))
