"""Export a training run's checkpoint as a model bundle (EMA weights, metadata, split, metrics)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ldae_bids.model import checkpoint as ckpt
from ldae_bids.model import data as mdata

log = logging.getLogger("ldae_bids")

def intensity_spec(normalisation: str, bias_correction: str | None) -> dict:
    """The bundle's ``intensity`` entry: what preprocessing must do so inputs match training.

    ``normalisation`` and ``bias_correction`` are read back by the ``preprocess`` stage, which
    applies exactly them (see :meth:`ldae_bids.runtime.Resources.intensity`).
    """
    bias = None if bias_correction in (None, "none") else bias_correction
    done = "N4 bias-corrected" if bias == "n4" else "not bias-corrected"
    how = {
        "percentile": "the 0.5 and 99.5 percentiles inside the brain mask map to 0 and 1 (clipped)",
        "minmax": "per-volume min-max over the brain mask",
    }.get(normalisation, normalisation)
    spec = {"range": [0.0, 1.0], "normalisation": normalisation, "bias_correction": bias,
            "description": f"skull-stripped T1w on the model grid ({done}); {how}, background 0"}
    if normalisation == "percentile":
        spec["percentiles"] = [0.5, 99.5]
    return spec


def export_bundle(settings, bundle: Path | None = None) -> Path:
    """Export the current checkpoint of ``settings.output`` as a bundle (EMA weights)."""
    from ldae_bids import __version__
    from ldae_bids.errors import MissingInputError
    from ldae_bids.model.bundle import save_bundle
    from ldae_bids.model.networks import build_networks
    from ldae_bids.model.stage2 import Stage2, make_pipeline
    from ldae_bids.model.train import images_of

    out = settings.output
    state = ckpt.read_state(out)
    if "latent_scale" not in state or not (out / "ldae-weights.safetensors").exists():
        raise MissingInputError(f"{out}: no stage-2 checkpoint to export yet")
    model_cfg = dataclasses.replace(settings.model, latent_scale=float(state["latent_scale"]),
                                    latent_mean=_latent_mean(out, state))
    nets = build_networks(model_cfg)
    # the decoder phase's checkpoint holds the whole autoencoder: the same encoder, the refined decoder
    refined = state.get("dec_step", 0) > 0 and (out / "dec-weights.safetensors").exists()
    ckpt.load_modules(out, "dec" if refined else "ae", {"autoencoder": nets["autoencoder"]})
    ckpt.load_modules(out, "ldae", {"ema": Stage2(nets["semantic_encoder"], nets["denoiser"])})
    pipeline = make_pipeline(model_cfg, nets["autoencoder"], nets["semantic_encoder"], nets["denoiser"]).eval()
    split = json.loads((out / "split.json").read_text())
    train_paths = images_of(split, "train")
    log_file = out / "logs" / "train.jsonl"  # absent when no step ran (--ldae-steps 0 with --init-from)
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line] if log_file.is_file() else []
    last_val = {}
    for stage in ("ae", "ldae", "decoder"):
        vals = [r for r in records if r.get("stage") == stage and any(k.startswith("val_") for k in r)]
        if vals:
            last_val[stage] = vals[-1]
    losses = {}
    for stage in ("ae", "ldae", "decoder"):
        rec = [r["loss"] for r in records if r.get("stage") == stage and "loss" in r]
        if rec:
            losses[stage] = float(np.mean(rec[-10:]))
    metadata = {
        "grid": mdata.grid_of(train_paths[0], settings.template),
        "intensity": intensity_spec(settings.normalisation, settings.bias_correction),
        "latent_scale": model_cfg.latent_scale,
        "latent_mean": None if model_cfg.latent_mean is None else list(model_cfg.latent_mean),
        "training": {
            "preset": settings.preset,
            "data": settings.dataset_description,
            "n_train_subjects": len(split["train"]), "n_val_subjects": len(split["validation"]),
            "split": {"seed": split["seed"], "train": split["train"], "validation": split["validation"]},
            "ae_steps": state.get("ae_step"), "ldae_steps": state.get("ldae_step"),
            "decoder_steps": state.get("dec_step", 0),
            "ae_steps_planned": state.get("ae_plan", {}).get(
                "steps", settings.train.ae_steps + settings.train.ae_full_volume_steps),
            "ldae_steps_planned": state.get("ldae_plan", {}).get("steps", settings.train.ldae_steps),
            # --steps-from-budget: each phase's budget, planned steps and measured seconds per step
            "step_plans": {k[:-5]: v for k, v in state.items() if k.endswith("_plan")},
            "train_config": settings.train.to_dict(),
            "final_train_loss": losses,
            "init_from": _init_record(settings.init_from, settings.model),
        },
        "metrics": {"validation_during_training": last_val},
        "licence": settings.licence,
        "versions": {"ldae_bids": __version__, "torch": torch.__version__, "monai": _version("monai")},
        **settings.extra_metadata,
    }
    target = bundle or settings.bundle or (out / "bundle")
    name = settings.bundle_name or Path(target).name
    save_bundle(target, pipeline, metadata, name=name)
    log.info("bundle written to %s", target)
    return Path(target)


def _latent_mean(out: Path, state: dict) -> tuple[float, ...] | None:
    """The training latents' channel means: from the run's state, else (a run started by an earlier version)
    from its cached latents; None when neither has them."""
    if "latent_mean" in state:
        return tuple(state["latent_mean"])
    if (out / "latents.safetensors").is_file():
        from safetensors.torch import load_file

        from ldae_bids.model.stage2 import latent_channel_mean

        return tuple(latent_channel_mean(load_file(str(out / "latents.safetensors"))["train"]))
    return None


def _init_record(path, model_cfg) -> dict | None:
    """What a fine-tuned bundle started from (name, content hash, that bundle's training steps, and
    which networks were carried: see :func:`ldae_bids.model.train.load_init`)."""
    if not path:
        return None
    from ldae_bids.model.bundle import _read_json, verify_bundle
    from ldae_bids.model.config import ModelConfig
    from ldae_bids.model.train import carried_networks

    metadata = _read_json(Path(path) / "metadata.json")
    meta = metadata.get("training", {})
    config = _read_json(Path(path) / "config.json")
    theirs = ModelConfig.from_dict({k: v for k, v in config.items() if k not in ("format", "format_version", "name")})
    carried = carried_networks(theirs, model_cfg)
    return {"name": config.get("name", Path(path).name), "content_hash": verify_bundle(Path(path)),
            "ae_steps": meta.get("ae_steps"), "ldae_steps": meta.get("ldae_steps"),
            "decoder_steps": meta.get("decoder_steps", 0), "init_from": meta.get("init_from"), "carried": carried,
            "intensity": metadata.get("intensity")}


def _version(dist_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "unknown"
