"""Training checkpoints: module weights as safetensors, optimiser state, a small JSON state.

Layout of a checkpoint folder::

    state.json                 stage, step, latent scale, anything small
    <stage>-weights.safetensors   every module of the stage, keys "<module>.<param>"
    <stage>-optim.pt           optimiser states (torch.save; reloaded weights_only=True)

Files are written to a temporary name then renamed, so an interruption never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_state(folder: Path) -> dict:
    """The checkpoint state (``{}`` when there is none yet)."""
    path = Path(folder) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(folder: Path, state: dict) -> None:
    _atomic(Path(folder) / "state.json", lambda p: p.write_text(json.dumps(state, indent=2)))


def module_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Flat ``{"<module>.<param>": tensor}`` of several modules (contiguous CPU copies)."""
    return {f"{name}.{k}": v.detach().cpu().contiguous().clone()
            for name, mod in modules.items() for k, v in mod.state_dict().items()}


def save_checkpoint(folder: Path, stage: str, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict) -> None:
    """Write weights, optimiser states, then ``state.json`` (last, so it only points at complete files)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / f"{stage}-weights.safetensors", lambda p: save_file(module_state(modules), str(p)))
    optim = {k: o.state_dict() for k, o in optimizers.items()}
    _atomic(folder / f"{stage}-optim.pt", lambda p: torch.save(optim, p))
    write_state(folder, state)


def load_modules(folder: Path, stage: str, modules: dict[str, nn.Module]) -> None:
    """Load the weights of a stage into ``modules`` (strict)."""
    from safetensors.torch import load_file

    flat = load_file(str(Path(folder) / f"{stage}-weights.safetensors"))
    for name, mod in modules.items():
        prefix = f"{name}."
        mod.load_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, strict=True)


def load_optimizers(folder: Path, stage: str, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Load optimiser states saved by :func:`save_checkpoint` (weights_only=True)."""
    path = Path(folder) / f"{stage}-optim.pt"
    if not path.exists():
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        if name in saved:
            opt.load_state_dict(saved[name])
