"""Exponential moving average of a module's parameters, with warm-up."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Ema(nn.Module):
    """Holds an EMA copy of ``model``; call :meth:`update` after each optimiser step.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))``, so short runs are not
    dominated by the initial weights (with a fixed 0.999, the initialisation still weighs
    37 % after 1000 steps). The warm-up depends on the step only, so resuming needs no state.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimiser step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else self.decay_at(step)
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
