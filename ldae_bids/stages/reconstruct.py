"""``reconstruct``: decode (x_T, y_sem) back to an image; SSIM/MSE to the input in the sidecar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SubjectInput
from ldae_bids.plugins.api import Level, Stage, StageContext, StageOption
from ldae_bids.stages._io import grid_image, load_preproc, load_xt, load_ysem


class ReconstructStage(Stage):
    name = "reconstruct"
    level = Level.PARTICIPANT
    version = "1"
    description = "LDAE reconstruction in template space with SSIM/MSE to the input"
    requires = ("embed",)
    needs_model = True
    batchable = True
    options = {"mask": StageOption("set the reconstruction to 0 outside the input's brain mask", "yes", ("yes", "no"))}

    def parameters(self, settings) -> dict[str, Any]:
        return {"ddim_steps": settings.ddim_steps, "mask": self.option_value(settings, "mask")}

    def run(self, ctx: StageContext, unit: SubjectInput) -> None:
        self.run_batch(ctx, [unit])

    def run_batch(self, ctx: StageContext, units: Sequence[SubjectInput]) -> None:
        """Decode every session of ``units`` in one batch (one DDIM loop for all of them)."""
        import torch

        from ldae_bids.metrics import similarity_batch

        pipe = ctx.model.pipeline
        steps = ctx.settings.ddim_steps
        sessions = [ses for u in units for ses in u.sessions]
        loaded = ctx.for_each(lambda ses: (load_preproc(ctx, ses), load_ysem(ctx, ses), load_xt(ctx, ses)),
                              sessions)
        xt = torch.cat([x for _, _, (x, _) in loaded]).to(ctx.device)
        y = torch.from_numpy(np.stack([v for _, (v, _), _ in loaded])).to(ctx.device)
        recon = pipe.decode(xt, y, steps=steps).float().clamp(0, 1)
        images = torch.from_numpy(np.stack([d for (d, _, _), _, _ in loaded]))[:, None].to(ctx.device)
        masks = torch.from_numpy(np.stack([m for (_, m, _), _, _ in loaded]))[:, None].to(ctx.device)
        masked = ctx.option("mask") == "yes"
        if masked:
            recon = torch.where(masks, recon, torch.zeros_like(recon))
        metrics = similarity_batch(images, recon, masks)  # on the device, the whole batch at once
        out = recon.cpu().numpy()
        ctx.for_each(lambda i: self._write(ctx, sessions[i], loaded[i], out[i, 0], metrics[i], steps, masked),
                     range(len(sessions)))

    @staticmethod
    def _write(ctx: StageContext, ses, loaded, recon: np.ndarray, metrics: dict, steps: int, masked: bool = True
               ) -> None:
        """One session's reconstruction, sidecar with its metrics, and figure."""
        from ldae_bids.reports.figures import image_rows

        (data, mask, src), (_, ypath), (_, xpath) = loaded
        ctx.writer.write_nifti(grid_image(ctx, recon), outputs.reconstruction(ses, ctx.grid.res_label), {
            "Description": "LDAE reconstruction: DDIM decoding of (x_T, y_sem), then the autoencoder decoder"
                           + ("; outside the brain mask set to 0." if masked else "."),
            "SkullStripped": True, "DDIMSteps": steps,
            "Metrics": {k: round(v, 6) for k, v in metrics.items()},
        }, sources=[src, ypath, xpath])
        fig = image_rows([("input", data), ("reconstruction", recon)],
                         f"{ses.key}: SSIM {metrics['ssim_mask']:.3f} (brain), {steps} DDIM steps", diff_of=(0, 1))
        ctx.writer.write_figure(fig, {**ses.entities, "desc": "reconstruction", "suffix": "T1w"})
