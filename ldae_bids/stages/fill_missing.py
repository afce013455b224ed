"""``fill-missing-sessions``: synthesise visits between two real sessions of a subject.

y_sem is interpolated linearly and x_T spherically at the time fraction, then decoded. With
``--stage-option fill-missing-sessions.evaluate=yes`` each inner real session is also left out, rebuilt
from its neighbours and scored against the real scan and its autoencoder reconstruction, next to two
baselines (the nearest real session; a voxel-wise linear blend of the two neighbours).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SubjectInput
from ldae_bids.plugins.api import Level, Stage, StageContext, StageOption
from ldae_bids.stages._io import grid_image, load_preproc, load_xt, load_ysem


class FillMissingStage(Stage):
    name = "fill-missing-sessions"
    level = Level.PARTICIPANT
    version = "1"
    description = "synthetic sessions between real visits (lerp y_sem, slerp x_T); leave-one-out evaluation"
    requires = ("embed",)
    needs_model = True
    default = False
    options = {"evaluate": StageOption("also leave each inner real session out, rebuild it and score it against the "
                                       "scan and two baselines", "no", ("yes", "no"))}

    def parameters(self, settings) -> dict[str, Any]:
        return {"fill_months": list(settings.fill_months), "schedule_months": settings.fill_schedule_months,
                "session_time": settings.session_time, "ddim_steps": settings.ddim_steps,
                "evaluate": self.option_value(settings, "evaluate")}

    def run(self, ctx: StageContext, unit: SubjectInput) -> None:
        from ldae_bids.analysis.longitudinal import leave_one_out_plan, plan_fills, session_times

        by_label = {ses.session: ses for ses in unit.sessions if ses.session}
        if len(by_label) < 2:
            ctx.log.info("%s: fewer than two sessions, nothing to fill", unit.key)
            return
        tsv = ctx.settings.bids_dir / f"sub-{unit.label}" / f"sub-{unit.label}_sessions.tsv"
        times = session_times(tsv if tsv.is_file() else list(by_label), source=ctx.settings.session_time)
        times = {k: v for k, v in times.items() if k in by_label}
        params = self.parameters(ctx.settings)
        if params["fill_months"] or params["schedule_months"]:
            plan = plan_fills(times, params["fill_months"] or None, step=params["schedule_months"])
            for skip in plan.skipped:
                ctx.log.info("%s: no session synthesised at %g months: %s", unit.key, skip.target_time, skip.reason)
            for fill in plan:
                self._synthesise(ctx, unit, by_label, fill, times)
        if params["evaluate"] == "yes":
            self._evaluate(ctx, unit, by_label, leave_one_out_plan(times))

    # ---------------------------------------------------------------------------------------------
    def _decode(self, ctx, by_label, fill):
        import torch

        from ldae_bids.analysis.longitudinal import interpolate_codes

        b, a = by_label[fill.before_label], by_label[fill.after_label]
        (yb, pyb), (ya, pya) = load_ysem(ctx, b), load_ysem(ctx, a)
        (xb, pxb), (xa, pxa) = load_xt(ctx, b), load_xt(ctx, a)
        y, x = interpolate_codes(torch.from_numpy(yb), torch.from_numpy(ya), xb, xa, fill.fraction)
        img = ctx.model.pipeline.decode(x.to(ctx.device), y[None].to(ctx.device), steps=ctx.settings.ddim_steps)
        _, mb, _ = load_preproc(ctx, b)
        _, ma, _ = load_preproc(ctx, a)
        mask = mb | ma
        vol = np.where(mask, img[0, 0].float().clamp(0, 1).cpu().numpy(), 0.0).astype(np.float32)
        return vol, [pyb, pya, pxb, pxa]

    def _synthesise(self, ctx, unit, by_label, fill, times) -> None:
        from ldae_bids.reports.figures import image_rows

        vol, sources = self._decode(ctx, by_label, fill)
        ents = {"subject": unit.label, "session": fill.label, "space": outputs.SPACE, "res": ctx.grid.res_label,
                "desc": "synthetic", "suffix": "T1w"}
        ctx.writer.write_nifti(grid_image(ctx, vol), ents, {
            "Description": "SYNTHETIC session, not a scan: LDAE interpolation between two real sessions "
                           "(y_sem linear, x_T spherical), decoded.",
            "Synthetic": True, "TargetMonths": fill.target_time,
            "SourceSessions": [f"ses-{fill.before_label}", f"ses-{fill.after_label}"],
            "SourceMonths": [fill.before_time, fill.after_time], "Fraction": fill.fraction,
            "DDIMSteps": ctx.settings.ddim_steps, "SkullStripped": True,
        }, sources=sources)
        before, _, _ = load_preproc(ctx, by_label[fill.before_label])
        after, _, _ = load_preproc(ctx, by_label[fill.after_label])
        fig = image_rows([(f"ses-{fill.before_label} (real)", before), (f"{fill.label} (synthetic)", vol),
                          (f"ses-{fill.after_label} (real)", after)],
                         f"sub-{unit.label}: synthetic session at {fill.target_time:g} months")
        ctx.writer.write_figure(fig, {"subject": unit.label, "session": fill.label, "desc": "synthetic",
                                      "suffix": "T1w"})

    def _evaluate(self, ctx, unit, by_label, plan) -> None:
        import pandas as pd
        import torch

        from ldae_bids.analysis.longitudinal import linear_blend, nearest_session
        from ldae_bids.metrics import similarity

        rows = []
        pipe = ctx.model.pipeline
        for fill in plan:
            real, mask, _ = load_preproc(ctx, by_label[fill.held_out])
            vol, _ = self._decode(ctx, by_label, fill)
            ae = pipe.autoencode(torch.from_numpy(real)[None, None].to(ctx.device))[0, 0].float().clamp(0, 1)
            ae = np.where(mask, ae.cpu().numpy(), 0.0).astype(np.float32)
            before, _, _ = load_preproc(ctx, by_label[fill.before_label])
            after, _, _ = load_preproc(ctx, by_label[fill.after_label])
            near = before if nearest_session(fill) == fill.before_label else after
            blend = linear_blend(before, after, fill.fraction)
            m = torch.from_numpy(mask)
            for method, vol_m in (("ldae", vol), ("nearest", near), ("blend", blend)):
                for ref_name, ref in (("real", real), ("ae_reconstruction", ae)):
                    s = similarity(torch.from_numpy(np.asarray(vol_m, np.float32)), torch.from_numpy(ref), m)
                    rows.append({"participant_id": f"sub-{unit.label}", "held_out": f"ses-{fill.held_out}",
                                 "gap_months": fill.gap, "fraction": fill.fraction, "method": method,
                                 "reference": ref_name, **s})
        if rows:
            ctx.writer.write_tsv(pd.DataFrame(rows), {"subject": unit.label, "desc": "filleval",
                                                      "suffix": "metrics"}, {
                "Description": "Leave-one-session-out: each inner session rebuilt from its neighbours (ldae) vs "
                               "the nearest real session and a voxel-wise linear blend; SSIM/MSE against the real "
                               "scan and against its autoencoder reconstruction (whole volume and in the mask)."})


