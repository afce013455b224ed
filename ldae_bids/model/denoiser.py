"""Latent denoiser: a 3D UNet whose residual blocks are conditioned by adaptive group norm.

Each residual block normalises its input with GroupNorm, then applies a timestep
scale/shift and a multiplicative y_sem scale (DiffAE's AdaGN:
``h = (1 + s_y) * ((1 + s_t) * GN(h) + b_t)``), so the semantic code steers every
block of the network. The network does no I/O and is fully described by its
constructor arguments (:class:`ldae_bids.model.config.DenoiserConfig`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaGNResBlock(nn.Module):
    """Residual block with AdaGN conditioning on the time embedding and on y_sem."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch)
        self.cond_proj = nn.Linear(cond_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(t_emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = h * (1 + self.cond_proj(cond)[:, :, None, None, None])
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention3d(nn.Module):
    """Single-head self-attention over all voxels (used at the bottleneck only)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv3d(ch, 3 * ch, 1)
        self.out = nn.Conv3d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(h.transpose(1, 2).reshape(b, c, *spatial))


class ConditionalUNet(nn.Module):
    """Epsilon-predicting 3D UNet over the latent, conditioned on (t, y_sem).

    Parameters
    ----------
    in_channels
        Latent channels (output has the same number).
    channels
        Width at each resolution level; ``len(channels) - 1`` down/up-samplings.
    num_res_blocks
        AdaGN residual blocks per level (the decoder path has one more).
    cond_dim
        Size of the semantic code y_sem.
    time_dim
        Size of the timestep embedding.
    norm_num_groups
        GroupNorm groups; must divide every width.
    mid_attention
        Add a self-attention block at the bottleneck.
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (64, 128, 192), num_res_blocks: int = 2,
                 cond_dim: int = 512, time_dim: int = 256, norm_num_groups: int = 16, mid_attention: bool = False):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU())
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)

        def block(i: int, o: int) -> AdaGNResBlock:
            return AdaGNResBlock(i, o, time_dim, cond_dim, norm_num_groups)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [channels[0]]
        ch = channels[0]
        for level, width in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(ch, width))
                ch = width
                skips.append(ch)
            self.down.append(blocks)
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = block(ch, ch)
        self.mid_attn = SelfAttention3d(ch, norm_num_groups) if mid_attention else nn.Identity()
        self.mid2 = block(ch, ch)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), width))
                ch = width
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv3d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(norm_num_groups, ch)
        self.conv_out = nn.Conv3d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` at ``timesteps`` (B,) given semantic codes ``cond`` (B, cond_dim)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = self.time_mlp(timestep_embedding(timesteps, self.time_dim).to(x.dtype))
        c = self.cond_mlp(cond)
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, t_emb, c)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, t_emb, c)), t_emb, c)
        for i, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), t_emb, c)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
