"""Build the networks and the scheduler of a :class:`ModelConfig` (no weights, no I/O)."""

from __future__ import annotations

import dataclasses

from torch import nn

from ldae_bids.model.config import AutoencoderConfig, ModelConfig, SchedulerConfig


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """MONAI's KL autoencoder from its constructor arguments."""
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(**dataclasses.asdict(cfg))


def build_scheduler(cfg: SchedulerConfig):
    """MONAI's DDIM scheduler (1000 steps, linear betas by default)."""
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(**dataclasses.asdict(cfg))


def build_networks(cfg: ModelConfig) -> dict[str, nn.Module]:
    """The three networks of the pipeline, freshly initialised.

    Returns
    -------
    dict
        ``{"autoencoder": ..., "semantic_encoder": ..., "denoiser": ...}``
    """
    from ldae_bids.model.denoiser import ConditionalUNet
    from ldae_bids.model.semantic import SemanticEncoder

    return {
        "autoencoder": build_autoencoder(cfg.autoencoder),
        "semantic_encoder": SemanticEncoder(**dataclasses.asdict(cfg.semantic_encoder)),
        "denoiser": ConditionalUNet(**dataclasses.asdict(cfg.denoiser)),
    }


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
