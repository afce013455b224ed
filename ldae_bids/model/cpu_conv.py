"""CPU inference: run every 3-D convolution through oneDNN, whatever the batch size.

For a CPU float32 convolution PyTorch picks its native kernel (``aten::slow_conv3d_forward``)
instead of oneDNN when ``N * C * D * H <= 20480``, a heuristic in ATen's ``ConvUtils`` tuned on
small 2-D inputs. At batch 1 that is every convolution on the compact latent grid (20x24x20) and the
low-resolution levels of the encoders: ``benchmarks/profile_stages.py`` found most of a denoiser step
there. Called directly, oneDNN computes the same convolution (equal to float32 rounding) about 2.4x
faster for the compact denoiser on one thread. Gradients, other dtypes, CPU bf16 autocast (which
casts the convolution to bf16 itself) and other devices keep PyTorch's own path.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _is_channels_last(w: torch.Tensor) -> bool:
    """Whether a 5-D weight is laid out NDHWC (a 1x1x1 kernel with one input channel is both: NCDHW wins)."""
    return w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()


def _forward(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and x.dim() == 5 and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
        # the input follows the weights' layout (``LdaePipeline.set_memory_format``): oneDNN then runs its
        # channels-last kernel instead of converting the activations back to NCDHW at every convolution
        layout = torch.channels_last_3d if _is_channels_last(self.weight) else torch.contiguous_format
        return torch.mkldnn_convolution(x.contiguous(memory_format=layout), self.weight, self.bias, self.padding,
                                        self.stride, self.dilation, self.groups)
    return nn.Conv3d.forward(self, x)


def route_conv3d_to_onednn(module: nn.Module) -> int:
    """Give every plain ``nn.Conv3d`` of ``module`` the oneDNN inference path; returns how many.

    Only zero-padded convolutions with explicit (tuple) padding are routed; weights and state
    dicts are untouched. A no-op where PyTorch was built without oneDNN.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv3d and m.padding_mode == "zeros" and isinstance(m.padding, tuple) \
                and not getattr(m, "_onednn_routed", False):
            m.forward = types.MethodType(_forward, m)
            m._onednn_routed = True
            n += 1
    return n
