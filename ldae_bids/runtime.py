"""Shared, lazily created resources of a run: device, model bundle, grid."""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from ldae_bids.config import Settings
from ldae_bids.errors import ModelError

log = logging.getLogger("ldae_bids")


def default_model_path() -> Path:
    """The bundle shipped inside the package."""
    return Path(__file__).parent / "data" / "models" / "ldae-compact-ixi"


class Resources:
    """Created once per run and shared by every stage's context."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def device(self):
        from ldae_bids.device import describe, select_device

        device = select_device(self.settings.device)
        log.info("device: %s", describe(device))
        return device

    @cached_property
    def precision(self) -> str:
        """``bf16`` or ``fp32``: ``--precision`` resolved for the device (see ``resolve_precision``)."""
        from ldae_bids.device import resolve_precision

        used = resolve_precision(self.device, self.settings.precision)
        log.info("precision: %s (--precision %s)", used, self.settings.precision)
        return used

    @property
    def model_path(self) -> Path:
        return self.settings.model or default_model_path()

    @cached_property
    def model_metadata(self) -> dict[str, Any]:
        """The bundle's metadata.json, read without loading any weights."""
        path = self.model_path / "metadata.json"
        if not path.is_file():
            where = "--model" if self.settings.model else "the default model (not installed with this package)"
            raise ModelError(f"{path}: model bundle metadata not found ({where})")
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable model metadata ({exc})") from None

    @cached_property
    def model(self):
        from ldae_bids.model.bundle import load_bundle

        bundle = load_bundle(self.model_path, device=self.device)
        bundle.pipeline.precision = self.precision
        from ldae_bids.device import resolve_memory_format

        bundle.pipeline.set_memory_format(resolve_memory_format(self.device, self.precision))
        log.info("model: %s (content hash %s) from %s; weights %s", bundle.name, bundle.content_hash[:12],
                 self.model_path, bundle.pipeline.memory_format.replace("_", "-"))
        return bundle

    @cached_property
    def model_hash(self) -> str:
        """The bundle's content hash, verified against its files (cheap: no weights loaded)."""
        from ldae_bids.model.bundle import verify_bundle

        _ = self.model_metadata  # clear error when the bundle is absent
        return verify_bundle(self.model_path)

    @cached_property
    def model_name(self) -> str:
        return str(self.model_metadata.get("name", self.model_path.name))

    @cached_property
    def grid(self):
        """The model grid from the bundle; the compact grid when no bundle is available."""
        from ldae_bids.preprocessing import Grid

        try:
            grid = Grid.from_dict(self.model_metadata["grid"])
        except ModelError:
            if self.settings.model is not None:
                raise
            grid = Grid.compact()
            log.warning("no default model installed: preprocessing to the compact grid %s", grid.shape)
        return grid

    @cached_property
    def memory_per_subject_mb(self) -> float:
        """Estimated host memory one more subject of a batch costs (``--mem``; see ldae_bids.memory)."""
        from ldae_bids.memory import estimate_for_bundle, refines_latent, subject_mb

        refine = refines_latent(self.settings.stage_options)
        try:
            return float(estimate_for_bundle(self.model_path, self.precision, refine)["per_subject_mb"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # no readable bundle: the compact width
            return subject_mb(self.grid.shape, 16, self.precision, refine)

    @cached_property
    def intensity(self) -> dict[str, Any]:
        """How preprocessing must treat intensities so inputs match the model's training data.

        ``{"normalisation": "percentile" | "minmax", "bias_correction": "n4" | None}`` from the
        bundle's ``metadata.json`` (``intensity``); without a bundle, the app's defaults
        (percentile scaling, N4 when SimpleITK is installed).
        """
        try:
            spec = dict(self.model_metadata.get("intensity") or {})
        except ModelError:
            if self.settings.model is not None:
                raise
            spec = {}
        bias = spec["bias_correction"] if "bias_correction" in spec else "n4"
        return {"normalisation": spec.get("normalisation", "percentile"), "bias_correction": bias}

    @cached_property
    def template_mask_on_grid(self):
        """The template brain mask resampled to the model grid (for QC figures), or None."""
        import nibabel as nib
        import numpy as np
        from nibabel.processing import resample_from_to

        from ldae_bids.templates import get_template

        try:
            tpl = nib.load(get_template(resolution=2, suffix="mask", desc="brain"))
        except Exception as exc:  # QC figures go on without the outline
            log.warning("template brain mask unavailable for QC figures: %s", exc)
            return None
        grid = self.grid
        out = resample_from_to(tpl, (tuple(grid.shape), np.asarray(grid.affine)), order=0)
        return np.asarray(out.dataobj) > 0

    def provenance(self, needs_model: bool) -> dict[str, Any]:
        if not needs_model:
            return {}
        return {"ModelBundle": {"Name": self.model_name, "ContentHash": self.model_hash},
                "Precision": self.precision}
