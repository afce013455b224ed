"""``--mem``: the host memory a run may use, and how the participant level keeps to it.

The participant level holds a batch of subjects in memory at once, so its host memory grows with the batch
size. ``--mem`` caps the batch size from an estimate of the memory one subject of a batch costs, and lowers
it for the rest of the run when the process's measured peak goes over the limit anyway. The estimate is
calibrated by ``benchmarks/bench_memory.py`` (peak resident memory of the app at batch sizes 1, 2, 4 and 8 on
IXI; ``benchmarks/results/memory.md``): the largest activations are the autoencoder's full-resolution
feature maps, so it scales with the grid's voxels times the autoencoder's first width. It is a guide, not
a hard limit: nothing is killed, and on a GPU the device memory is governed by the out-of-memory retry.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from ldae_bids.errors import UsageError

# Calibration (benchmarks/results/memory.md, CPU, shipped compact bundle: 80x96x80 grid, width 16): the peak
# after reconstruct at batch sizes 1, 2, 4, 8 follows about 825 MiB + 291 MiB per subject in fp32 and 695-703 MiB
# + 145-162 MiB per subject under bf16 autocast (2026-12-07, run 8's bundle, two runs; `--precision fp32` and
# `auto` on a CPU with native bf16), i.e. about 30 and 15-17 bytes per voxel and channel of the autoencoder's
# first level. bf16 is set at 18. The base is set higher, 1000 MiB, for the run-to-run spread (about 100 MiB)
# and for several batches in one process: with a base of 900 MiB, --mem 2GB ran batches of 4 and peaked at
# 2041 MiB, too close to the limit.
BYTES_PER_VOXEL_CHANNEL = {"fp32": 30.0, "bf16": 18.0}
# With latent refinement (--stage-option embed.refine_latent=N) embed keeps the decoder's activations for the
# backward pass: its peak follows about 768-828 MiB + 527-561 MiB per subject under bf16 (two runs) and 817 + 835
# in fp32 (benchmarks/results/memory-refine/, its before-estimate/, and memory-refine-fp32/), 56-60 and 89 bytes
# per voxel and channel; set at 62 and 92.
REFINE_BYTES_PER_VOXEL_CHANNEL = {"fp32": 92.0, "bf16": 62.0}
BASE_MB = 1000.0

_UNITS = {"": 1.0, "B": 1 / 2**20, "K": 1 / 2**10, "M": 1.0, "G": 2**10, "T": 2**20}


def parse_memory(value: str | int | float) -> int:
    """``--mem`` text to MiB: a number with an optional unit (``16GB``, ``16G``, ``16000MB``, ``16000``).

    A bare number is MB, as in fMRIPrep's ``--mem``/``--mem-mb``; units are binary (``1GB`` = 1024 MB).
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BKMGT]?)(?:I?B)?\s*", str(value).upper())
        if not match:
            raise UsageError(f"--mem {value!r}: expected a size such as 16GB, 16G or 16000MB (a bare number is MB)")
        number, unit = float(match.group(1)), match.group(2)
    mb = number * _UNITS[unit]
    if not math.isfinite(mb) or mb < 1:
        raise UsageError(f"--mem {value!r}: must be at least 1 MB")
    return int(mb)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def subject_mb(grid_shape, first_channels: int, precision: str = "fp32", refine: bool = False) -> float:
    """Estimated host memory (MiB) one more subject in a batch costs, under ``precision`` (bf16 or fp32), with
    or without latent refinement in ``embed`` (which then holds the most)."""
    voxels = math.prod(int(n) for n in grid_shape)
    per = BYTES_PER_VOXEL_CHANNEL[precision]
    if refine:
        per = max(per, REFINE_BYTES_PER_VOXEL_CHANNEL[precision])
    return voxels * int(first_channels) * per / 2**20


def refines_latent(stage_options: dict[str, dict[str, str]]) -> bool:
    """Whether ``embed`` refines latents in a run given these ``--stage-option``s (``embed.refine_latent`` > 0)."""
    from ldae_bids.stages.embed import EmbedStage

    given = stage_options.get("embed", {}).get("refine_latent")
    return EmbedStage.options["refine_latent"].parse("embed.refine_latent", given) > 0


def estimate_for_bundle(path: Path, precision: str = "fp32", refine: bool = False) -> dict:
    """The estimate for a model bundle folder under ``precision`` (and latent refinement), from its config.json
    (no weights read)."""
    config = json.loads((Path(path) / "config.json").read_text())
    grid = [int(n) for n in config["image_shape"]]
    first = int(config["autoencoder"]["channels"][0])
    return {"grid": grid, "first_channels": first, "precision": precision, "refine": refine,
            "per_subject_mb": subject_mb(grid, first, precision, refine), "base_mb": BASE_MB}


def max_batch(mem_mb: float, per_subject: float, base_mb: float = BASE_MB) -> int:
    """The largest batch size whose estimate fits in ``mem_mb`` (at least 1)."""
    return max(1, int((mem_mb - base_mb) // max(per_subject, 1e-6)))


def lowered_batch(batch: int, mem_mb: float, peak_mb: float, base_mb: float) -> int:
    """After a batch of ``batch`` peaked at ``peak_mb`` (over ``mem_mb``): the batch size that would have fit,
    from the memory the batch added over ``base_mb`` (at least 1, below ``batch``)."""
    per_subject = max(peak_mb - base_mb, 1.0) / batch
    return max(1, min(batch - 1, int((mem_mb - base_mb) // per_subject)))
