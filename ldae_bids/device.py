"""Device selection, threads and mixed precision."""

from __future__ import annotations

import contextlib
import logging
import os

from ldae_bids.errors import UsageError

log = logging.getLogger("ldae_bids")


def set_threads(nprocs: int | None, omp_nthreads: int | None) -> None:
    """Limit CPU threads (torch intra-op, OpenMP/MKL) to what the user allows."""
    n = omp_nthreads or nprocs
    if n is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # can only be set once per process
        torch.set_num_interop_threads(max(1, min(n, 4)))


def select_device(requested: str = "auto"):
    """The torch device for this run.

    ``auto`` takes the first CUDA GPU when one is visible, else the CPU. Asking for
    ``cuda`` when none is visible is an error with the usual cause spelled out.
    """
    import torch

    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda was asked for but no CUDA GPU is visible "
                "(in Apptainer/Singularity add --nv; in Docker add --gpus all; check CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) visible")
    else:
        device = torch.device("cpu")
    return device


def describe(device) -> str:
    """A log line naming the device, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return f"cpu ({torch.get_num_threads()} threads)"


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AVX512-BF16 or AMX), through oneDNN."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private probe: absent in some builds
        return False


def resolve_precision(device, precision: str = "auto") -> str:
    """``"bf16"`` or ``"fp32"`` for ``device``: ``auto`` is bf16 on CUDA and on CPUs with native bf16
    (about twice as fast there, ``benchmarks/bench_precision.py``), fp32 elsewhere (emulated bf16 is slow)."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def autocast(device, precision: str = "auto"):
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else nothing."""
    import torch

    if resolve_precision(device, precision) == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_memory_format(device, precision: str) -> str:
    """How the networks' weights are laid out for inference: ``channels_last`` (NDHWC) where it was
    measured faster, ``contiguous`` (NCDHW) elsewhere.

    On the CPU under bf16 oneDNN's channels-last 3-D convolutions are faster: autoencoder 1.25-1.45x, a
    20-step reconstruction 1.1x (``benchmarks/bench_memory_format.py``); in fp32 a reconstruction is within
    the timing noise either way at batch 1 (0.91x-1.04x), so the layout stays contiguous. On CUDA it is not
    measured yet, so the layout stays contiguous there. (Training: ``model.loop.lay_out_autoencoder``.)
    """
    return "channels_last" if device.type == "cpu" and resolve_precision(device, precision) == "bf16" \
        else "contiguous"


def default_batch_size(device) -> int:
    """Subjects per batch: several on a GPU, one on the CPU (bounded memory)."""
    return 8 if device.type == "cuda" else 1
