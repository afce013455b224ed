"""``embed``: y_sem (and x_T by DDIM inversion) per session; ``collect-embeddings``: the group table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SubjectInput
from ldae_bids.errors import MissingInputError
from ldae_bids.plugins.api import GroupInput, Level, Stage, StageContext, StageOption
from ldae_bids.stages._io import load_preproc, ysem_columns


class EmbedStage(Stage):
    name = "embed"
    level = Level.PARTICIPANT
    version = "1"
    description = "semantic code y_sem and stochastic code x_T (deterministic DDIM inversion) per session"
    options = {"refine_latent": StageOption(
        "steps of latent refinement before the inversion (LdaePipeline.refine_latent): x_T then decodes closer to "
        "the image in every later stage (30: +0.013 SSIM for the shipped model; 10 give most of that, docs/model.md); "
        "about 1.2 s per subject and step on 2 CPU cores",
        "0", kind=int, minimum=0)}
    requires = ("preprocess",)
    needs_model = True
    batchable = True

    def parameters(self, settings) -> dict[str, Any]:
        params = {"ddim_steps": settings.ddim_steps, "save_xt": settings.save_xt}
        refine = self.option_value(settings, "refine_latent") if settings.save_xt else 0  # y_sem does not use it
        if refine:  # only when it applies: outputs made without it keep their resume key
            params["refine_latent"] = refine
        return params

    def run(self, ctx: StageContext, unit: SubjectInput) -> None:
        self.run_batch(ctx, [unit])

    def run_batch(self, ctx: StageContext, units: Sequence[SubjectInput]) -> None:
        import pandas as pd
        import torch
        from safetensors.torch import save_file

        sessions = [ses for u in units for ses in u.sessions]
        loaded = ctx.for_each(lambda ses: load_preproc(ctx, ses), sessions)
        images = torch.from_numpy(np.stack([d for d, _, _ in loaded]))[:, None]
        pipe = ctx.model.pipeline
        steps = ctx.settings.ddim_steps
        torch.manual_seed(ctx.settings.random_seed)
        refine = self.parameters(ctx.settings).get("refine_latent", 0)
        codes = pipe.encode(images.to(ctx.device), invert=ctx.settings.save_xt, steps=steps, refine_steps=refine)
        y = codes.y_sem.float().cpu().numpy()
        cols = ysem_columns(y.shape[1])
        for i, (ses, (_, _, src)) in enumerate(zip(sessions, loaded)):
            row = {"participant_id": f"sub-{ses.subject}"}
            if ses.session:
                row["session_id"] = f"ses-{ses.session}"
            row.update(dict(zip(cols, y[i].tolist())))
            ctx.writer.write_tsv(pd.DataFrame([row]), outputs.ysem(ses), {
                "Description": "LDAE semantic code y_sem of the model-ready image (one row).",
                "ysem_000": {"Description": f"y_sem component 0 of {len(cols)} (raw, not z-scored)"},
            }, sources=[src])
            if codes.x_T is not None:
                xt = codes.x_T[i:i + 1].float().cpu().contiguous()
                path = ctx.writer.write_file(outputs.xt(ses), ".safetensors",
                                             lambda tmp, t=xt: save_file({"x_T": t}, str(tmp)))
                ctx.writer.write_sidecar(path, {
                    "Description": "LDAE stochastic code x_T (deterministic DDIM inversion of the scaled latent, "
                                   "conditioned on y_sem); safetensors file with one float32 tensor 'x_T'.",
                    "Shape": list(xt.shape), "DDIMSteps": steps, "LatentRefinementSteps": refine,
                }, sources=[src])


class CollectEmbeddingsStage(Stage):
    name = "collect-embeddings"
    level = Level.GROUP
    version = "1"
    description = "one group table of y_sem (participant_id, session_id, ysem_*) from the participant outputs"
    options = {}  # no --stage-option: any given is refused

    def run(self, ctx: StageContext, unit: GroupInput) -> None:
        table, missing = collect_ysem(ctx, unit)
        if table is None:
            raise MissingInputError(f"{unit.output_dir}: no y_sem tables found; run the participant level "
                                    "(embed stage) first")
        if missing:
            ctx.log.warning("%d session(s) without y_sem (not embedded yet): %s", len(missing),
                            ", ".join(missing[:10]))
        ctx.writer.write_tsv(table, {"desc": "ysem", "suffix": "features"}, {
            "Description": "y_sem of every embedded session (raw values).",
            "brain_volume_ml": {"Description": "native-space brain-mask volume from the preprocess QC (n/a when "
                                               "not recorded); a head-size covariate, not part of y_sem",
                                "Units": "ml"},
            "MissingSessions": missing,
        })


def collect_ysem(ctx: StageContext, unit: GroupInput):
    """All sessions' y_sem rows as one DataFrame, and the keys of sessions without one."""
    import pandas as pd

    frames, missing = [], []
    for subject in unit.subjects:
        for ses in subject.sessions:
            path = ctx.writer.path(**outputs.ysem(ses), extension=".tsv")
            if path.is_file():
                frame = pd.read_csv(path, sep="\t")
                frame.insert(2 if "session_id" in frame.columns else 1, "brain_volume_ml",
                             brain_volume(ctx, ses))
                frames.append(frame)
            else:
                missing.append(ses.key)
    if not frames:
        return None, missing
    return pd.concat(frames, ignore_index=True), missing


def brain_volume(ctx: StageContext, ses) -> float:
    """Native-space brain-mask volume (ml) from the preprocess sidecar's QC, NaN when not recorded.

    The affine to the template removes head size from the model-ready image (and so from y_sem);
    this puts it back as a covariate (``probe.covariates=brain_volume_ml``).
    """
    import json

    path = ctx.writer.path(**outputs.preproc_t1w(ses, ctx.grid.res_label), extension=".json")
    try:
        value = json.loads(path.read_text()).get("QC", {}).get("brain_volume_ml")
        return float(value) if value is not None else float("nan")
    except (OSError, ValueError, TypeError, AttributeError):
        return float("nan")
