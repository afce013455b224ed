"""Utilities shared by the training stages: seeded randomness, autocast, learning-rate warm-up,
CPU threads, wall-clock budgets, JSONL logging and synchronised checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ldae_bids.model import checkpoint as ckpt

log = logging.getLogger("ldae_bids")


class JsonlLogger:
    """Appends one JSON object per line (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> None:
        if self.enabled:
            record["time"] = round(time.time(), 3)
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def rewind(self, steps: dict[str, int]) -> int:
        """Drop the records of ``stage`` logged after ``steps[stage]`` (the checkpoint's step): steps that ran
        after the last checkpoint of an interrupted run run again on resume and would be logged twice.
        Returns how many records were dropped."""
        if not (self.enabled and self.path.is_file()):
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            stage = rec.get("stage")
            if stage in steps and int(rec.get("step", 0)) > steps[stage]:
                continue
            kept.append(line)
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        return len(lines) - len(kept)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator determined by (seed, keys): batches are reproducible across resumes."""
    return np.random.default_rng([seed, *keys])


def torch_gen_for(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch generator determined by (seed, keys)."""
    return torch.Generator().manual_seed(int(rng_for(seed, *keys).integers(2**62)))


_PRECISION: str | None = None  # the run's, from set_precision; None: bf16 on CUDA, fp32 on the CPU


def set_precision(device: torch.device, precision: str = "auto") -> str:
    """Choose the training run's mixed precision (``auto``, ``fp32``, ``bf16``; see
    :func:`ldae_bids.device.resolve_precision`) and return what it resolved to."""
    global _PRECISION
    from ldae_bids.device import resolve_precision

    _PRECISION = resolve_precision(device, precision)
    return _PRECISION


def precision(device: torch.device) -> str:
    """The run's precision on ``device``: ``bf16`` or ``fp32``."""
    if _PRECISION is None:
        return "bf16" if device.type == "cuda" else "fp32"
    return _PRECISION


def autocast(device: torch.device):
    """bf16 autocast when the run's precision is bf16 (CUDA, or a CPU with native bf16), else a no-op."""
    from ldae_bids.device import autocast as precision_autocast

    return precision_autocast(device, precision(device))


def lay_out_autoencoder(ae: torch.nn.Module, dist) -> str:
    """Put the autoencoder's weights channels-last for training on the CPU, where a decoder training step (forward
    + backward) is faster in that layout in both precisions (``benchmarks/bench_memory_format.py --training``:
    1.42x in fp32, 1.35x in bf16, ``benchmarks/results/memory_format.md``); contiguous on CUDA (not measured
    yet) and always under DDP, whose all-reduce sums gradients as flat buffers, so ranks must not mix layouts.
    The denoiser stays contiguous (its training step is not faster channels-last). Checkpoints and bundles store
    contiguous copies."""
    name = "channels_last" if dist.device.type == "cpu" and not dist.enabled else "contiguous"
    ae.to(memory_format=torch.channels_last_3d if name == "channels_last" else torch.contiguous_format)
    return name


LR_SCHEDULES = ("constant", "cosine")


def lr_at(base: float, step: int, total: int, schedule: str = "constant", min_fraction: float = 0.0,
          warmup: int = 100) -> float:
    """Learning rate of ``step`` (0-based) of a stage planned for ``total`` steps: linear warm-up over ``warmup``
    steps, then constant, or (``cosine``) a half cosine from ``base`` at the start to ``base * min_fraction`` at
    step ``total``. A function of the step alone, so a resumed run (or every DDP rank) gets the same rates."""
    rate = base * min(1.0, (step + 1) / warmup)
    if schedule == "cosine" and total > 0:
        progress = min(1.0, max(0.0, step / total))
        rate *= min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} ({', '.join(LR_SCHEDULES)})")
    return rate


def set_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int = 0, schedule: str = "constant",
           min_fraction: float = 0.0, warmup: int = 100) -> None:
    """Set every parameter group's rate to :func:`lr_at` (stateless, so resumes need nothing)."""
    rate = lr_at(base, step, total, schedule, min_fraction, warmup)
    for group in opt.param_groups:
        group["lr"] = rate


def adapt_threads(enabled: bool) -> None:
    """Use the CPU cores other processes leave free (1-minute load average); CPU runs only."""
    if not enabled:
        return
    cpus = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()
    want = int(min(cpus, max(1, round(cpus - others))))
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
        log.info("using %d CPU thread(s)", want)


def elapsed_minutes(earlier_seconds: float, start: float) -> float:
    """Minutes spent in a stage: ``earlier_seconds`` from earlier runs plus this run since ``start``."""
    return (earlier_seconds + time.time() - start) / 60


def over_budget(dist, earlier_seconds: float, start: float, minutes: float | None) -> bool:
    """Whether a stage has spent its wall-clock budget (``minutes``, None = no budget); under DDP every rank gets
    the same answer (one small all-reduce per call, only when there is a budget)."""
    if not minutes:
        return False
    from ldae_bids.model import distributed

    return distributed.any_rank(dist, elapsed_minutes(earlier_seconds, start) > minutes)


class StepPlan:
    """``--steps-from-budget``: the length of a training phase planned from its wall-clock budget.

    A learning-rate schedule that decays (``cosine``) needs the phase's last step in advance, but with a time
    budget only the time is known (a GPU run of a few minutes). The plan times steps ``SKIP`` to
    ``SKIP + TIMED`` of a call (after allocation, cuDNN autotuning and the first validation-free steps), then
    sets the phase's last step to where the rest of the budget runs out at that speed, at most the steps asked
    (``limit``). The plan is kept in the checkpoint state (``<name>_plan``: the budget and the steps), so a
    resumed call with the same budget continues the same curve; a call with another budget plans again. Under
    DDP the ranks take the smallest plan. The budget still ends the phase if it runs slower than planned.
    """

    SKIP, TIMED = 5, 20
    MARGIN = 0.95  # of the remaining budget: validations and checkpoints are not in the timed steps

    def __init__(self, name: str, state: dict, minutes: float | None, enabled: bool, limit: int, step: int):
        self.key, self.state, self.minutes = f"{name}_plan", state, minutes
        self.total, self.first, self.t_skip = int(limit), int(step), None
        saved = state.get(self.key)
        self.pending = bool(enabled and minutes) and step < limit
        if self.pending and saved and float(saved.get("minutes", -1)) == float(minutes):
            self.total, self.pending = min(int(limit), int(saved["steps"])), False

    def observe(self, dist, step: int, spent_seconds: float) -> int:
        """Call after each step with the phase's seconds over all calls so far; returns the phase's last step."""
        if not self.pending:
            return self.total
        done = step - self.first
        if done == self.SKIP:
            self.t_skip = time.perf_counter()
        elif done == self.SKIP + self.TIMED and self.t_skip is not None:
            from ldae_bids.model import distributed

            per_step = (time.perf_counter() - self.t_skip) / self.TIMED
            remaining = self.MARGIN * max(0.0, float(self.minutes) * 60.0 - spent_seconds)
            planned = distributed.min_rank(dist, min(self.total, step + int(remaining / max(per_step, 1e-6))))
            self.total, self.pending = max(step, planned), False
            self.state[self.key] = {"minutes": float(self.minutes), "steps": self.total,
                                    "sec_per_step": round(per_step, 4)}
            log.info("%s: %.3f s per step; %d steps fit the %.1f-minute budget (--steps-from-budget)",
                     self.key[:-5], per_step, self.total, float(self.minutes))
        return self.total


def checkpoint_all(settings, dist, stage, modules, optimizers, state) -> None:
    """Checkpoint on the main process, then wait for every process."""
    from ldae_bids.model.distributed import barrier

    if dist.is_main:
        ckpt.save_checkpoint(settings.output, stage, modules, optimizers, state)
    barrier(dist)


def save_progress(settings, dist, name, stage, modules, optimizers, state, step, seconds) -> None:
    """Record where a training phase is (``state["stage"]``, ``<name>_step``, ``<name>_seconds``: its time over all
    calls, what its budget counts) and checkpoint it as ``<name>-*``."""
    state.update({"stage": stage, f"{name}_step": step, f"{name}_seconds": seconds})
    checkpoint_all(settings, dist, name, modules, optimizers, state)
