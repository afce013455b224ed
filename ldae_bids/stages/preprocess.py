"""``preprocess``: raw T1w -> skull-stripped, template-aligned, normalised image on the model grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SessionInput, SubjectInput
from ldae_bids.plugins.api import Level, Stage, StageContext


class PreprocessStage(Stage):
    name = "preprocess"
    level = Level.PARTICIPANT
    version = "3"  # 2: registration also starts its coarse level from pitched starts (tilted heads; register.py);
    # 3: each subject keeps its best start after 30 of the coarse level's 100 steps (register.START_KEEP_STEP)
    description = "deepbet brain extraction, affine registration to MNI152NLin2009cAsym, resampling, normalisation"
    options = {}  # no --stage-option: any given is refused
    batchable = True
    uses_grid = True
    uses_precision = True  # deepbet runs under bf16 autocast when --precision resolves to bf16

    def parameters(self, settings) -> dict[str, Any]:
        return {"derivatives": [str(p) for p in settings.derivatives]}

    def precision_matters(self, settings) -> bool:
        """With ``--derivatives`` no network runs (the images are only resampled and normalised)."""
        return not settings.derivatives

    def preflight(self, ctx: StageContext) -> None:
        """The template is needed by every subject: a missing one stops the run once (exit 66)."""
        if not ctx.settings.derivatives:
            from ldae_bids.preprocessing import load_template

            load_template(ctx.grid.template)

    def run(self, ctx: StageContext, unit: SubjectInput) -> None:
        self.run_batch(ctx, [unit])

    def run_batch(self, ctx: StageContext, units: Sequence[SubjectInput]) -> None:
        from ldae_bids.preprocessing import load_t1w, preprocess_batch

        grid = ctx.grid
        sessions = [ses for unit in units for ses in unit.sessions]
        intensity = ctx.resources.intensity
        if ctx.settings.derivatives:
            from ldae_bids.preprocessing.derivatives import from_derivatives

            results = ctx.for_each(lambda ses: from_derivatives(ses, ctx.settings.derivatives, grid,
                                                                normalisation=intensity["normalisation"]), sessions)
        else:
            images = ctx.for_each(lambda ses: load_t1w(ses.t1w), sessions)
            results = preprocess_batch(images, grid, device=ctx.device, normalisation=intensity["normalisation"],
                                       bias_correction=intensity["bias_correction"],
                                       precision=ctx.resources.precision)
        for res in results:
            if isinstance(res, BaseException):
                raise res
        ctx.for_each(lambda item: self._write(ctx, *item, grid), list(zip(sessions, results)))

    def _write(self, ctx: StageContext, ses: SessionInput, res, grid) -> None:
        from ldae_bids.preprocessing import write_itk_affine
        from ldae_bids.reports.figures import qc_overlay

        w = ctx.writer
        res_label = grid.res_label
        params = dict(res.params)
        common = {"Parameters": params}
        if res.mask_native is not None:
            w.write_nifti(res.mask_native, outputs.brain_mask_native(ses),
                          {"Type": "Brain", "RawSources": [w.bids_uri(ses.t1w)], **common}, sources=[ses.t1w])
        if res.native_to_template is not None:
            xfm_path = w.write_file(outputs.xfm(ses), ".txt",
                                    lambda tmp: write_itk_affine(res.native_to_template, tmp))
            w.write_sidecar(xfm_path, {"Description": "Affine (12 dof) from the T1w to the template, ITK/ANTs "
                                       "convention (LPS, maps template points to T1w points)", **common},
                            sources=[ses.t1w])
        img_path = w.write_nifti(
            res.image, outputs.preproc_t1w(ses, res_label),
            {"SkullStripped": True, "Resolution": {res_label: f"{grid.spacing:g} mm isotropic, "
             f"{'x'.join(map(str, grid.shape))} voxels on {grid.template}"},
             "IntensityNormalisation": params.get("normalisation"),
             "QC": res.qc, **common},
            sources=[ses.t1w],
        )
        w.write_nifti(res.mask_grid, outputs.brain_mask_grid(ses, res_label),
                      {"Type": "Brain", "Resolution": {res_label: f"{grid.spacing:g} mm isotropic"}},
                      sources=[img_path])
        tpl = ctx.resources.template_mask_on_grid
        fig = qc_overlay(np.asarray(res.image.dataobj, dtype=np.float32), np.asarray(res.mask_grid.dataobj) > 0,
                         tpl, f"{ses.key}: model-ready image, brain mask (red), template brain (blue)")
        w.write_figure(fig, outputs.qc_figure(ses))
