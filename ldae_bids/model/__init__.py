"""The LDAE model: configs, networks, pipeline, bundles and training.

Heavy imports (torch, monai) happen when a name is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "config", "TrainConfig": "config", "preset": "config", "PRESETS": "config",
    "LdaePipeline": "pipeline", "EncodeOutput": "pipeline", "ReconstructOutput": "pipeline",
    "ModelBundle": "bundle", "save_bundle": "bundle", "load_bundle": "bundle",
    "default_bundle_path": "bundle", "verify_bundle": "bundle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldae_bids.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldae_bids.model' has no attribute {name!r}")
