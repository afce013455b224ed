"""``manipulate``: counterfactual images by moving y_sem along a probe direction.

For each saved probe and each strength alpha: ``y' = unscale(z(y) + alpha * sqrt(d) * w/|w|)``, decoded with
the session's own x_T, with the latent channel means anchored to the training latents' (``LdaePipeline.ddim``;
bundles that record them; ``--stage-option manipulate.anchor_mean=no`` decodes without). With
``--strength-unit target`` a strength is the change of the probe's prediction asked for (``+10`` = ten years
older for an age probe; log-odds for a two-class probe, the class's logit minus the mean logit with more
classes), turned into ``alpha = change / (sqrt(d) |w|)``; files are then named
``desc-manip<Target>DeltaPlus10``. The result is re-encoded and the probe applied again, so the sidecar shows
whether the attribute moved as asked (monotonically with the strength; ``change_reencoded`` is the change the
re-encoded image shows, to compare with the change asked).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.bids.discover import SubjectInput
from ldae_bids.errors import MissingInputError, UsageError
from ldae_bids.plugins.api import Level, Stage, StageContext, StageOption
from ldae_bids.stages._io import grid_image, load_preproc, load_xt, load_ysem
from ldae_bids.stages.probe import first_clash, target_label


def strength_label(alpha: float) -> str:
    """``1.0`` -> ``Plus1``, ``-0.5`` -> ``Minus0p5``, ``2.25`` -> ``Plus2p25`` ('p' is the decimal point:
    BIDS labels are alphanumeric). Strengths have at most two decimals (checked by the settings)."""
    digits = f"{abs(alpha):.2f}".rstrip("0").rstrip(".")  # fixed point: never an exponent ('1e+06')
    return ("Plus" if alpha >= 0 else "Minus") + digits.replace(".", "p")


def target_name(target: str) -> str:
    """The probe's target in file names: the probe stage's label, capitalised (``age`` -> ``desc-manipAgePlus1``)."""
    label = target_label(target)
    return label[:1].upper() + label[1:]


def output_name(probe) -> str:
    """What the probe's output is: the value predicted, or the log-odds of the class."""
    if probe.kind == "regression":
        return "prediction"
    return "log-odds" if len(probe.classes) == 2 else "logit minus the mean logit"


@functools.lru_cache(maxsize=64)
def _load_probe(path: str, mtime_ns: int, size: int):
    from ldae_bids.analysis.probe import load_probe

    return load_probe(path)


def read_probe(path: Path):
    """The probe saved at ``path``, read once per run rather than once per subject (every subject's resume key
    needs it); a changed file (another stat) is read again."""
    from ldae_bids.analysis.probe import load_probe

    try:
        st = Path(path).stat()
    except OSError:
        return load_probe(path)  # raises the one-line error of a missing probe file
    return _load_probe(str(path), st.st_mtime_ns, st.st_size)


def probe_paths(settings) -> list[Path]:
    if settings.probe:
        return list(settings.probe)
    found = sorted((settings.output_dir / "group").glob("target-*_desc-probe_probe.json"))
    if not found:
        raise MissingInputError(f"{settings.output_dir / 'group'}: no saved probe; run the group level (probe "
                                "stage) first or give --probe FILE")
    return found


class ManipulateStage(Stage):
    name = "manipulate"
    level = Level.PARTICIPANT
    version = "4"  # 4: decoding anchors the latent channel means (LdaePipeline.ddim)
    description = "counterfactual images along probe directions (needs probes from the group level)"
    requires = ("embed",)
    needs_model = True
    default = False
    options = {
        "class": StageOption("for a probe of more than two classes: the class to move towards"),
        "anchor_mean": StageOption("anchor the latent channel means to the training latents' while decoding "
                                   "(no: plain DDIM from the session's x_T, as the method does)", "yes",
                                   ("yes", "no"))}

    def parameters(self, settings) -> dict[str, Any]:
        from ldae_bids.state import digest

        paths = probe_paths(settings)
        targets = {p: read_probe(p).target for p in paths}
        if clash := first_clash(paths, lambda p: target_label(targets[p])):
            raise UsageError(f"{clash[1]}: its target names the same manipulate outputs as {clash[0]}'s "
                             f"(desc-manip{target_name(targets[clash[1]])}...): give one of them (--probe)")
        return {"strengths": list(settings.strengths), "strength_unit": settings.strength_unit, "ddim_steps": settings.ddim_steps,
                "probes": {str(p): digest(p) for p in paths},
                "class": self.option_value(settings, "class"),
                "anchor_mean": self.option_value(settings, "anchor_mean")}

    def run(self, ctx: StageContext, unit: SubjectInput) -> None:
        import pandas as pd
        import torch

        from ldae_bids.reports.figures import image_rows

        pipe = ctx.model.pipeline
        steps = ctx.settings.ddim_steps
        unit_name = ctx.settings.strength_unit
        strengths = [0.0] + [a for a in ctx.settings.strengths if a != 0.0]
        cls = ctx.option("class")
        anchor = ctx.option("anchor_mean") == "yes"
        probes = [(p, read_probe(p)) for p in probe_paths(ctx.settings)]
        for ses in unit.sessions:
            data, mask, src = load_preproc(ctx, ses)
            y, ypath = load_ysem(ctx, ses)
            xt, xpath = load_xt(ctx, ses)
            for ppath, probe in probes:
                if probe.kind == "classification" and len(probe.classes) > 2 and cls is None:
                    ctx.log.warning("%s: probe %s has %d classes; give --stage-option manipulate.class=NAME",
                                    ses.key, probe.target, len(probe.classes))
                    continue
                # alpha: the method's strength; in target units, the alpha that moves the probe's output as asked
                alphas = [probe.alpha_for_change(a, cls) if unit_name == "target" else a for a in strengths]
                edited = np.stack([probe.manipulate(y, a, cls) for a in alphas]).astype(np.float32)
                y_t = torch.from_numpy(edited).to(ctx.device)
                # anchored channel means: a code moved far along the probe otherwise lets them drift, and the
                # counterfactuals saturate sooner (benchmarks/results/analyses.md, manipulation)
                images = pipe.decode(xt.to(ctx.device).expand(len(alphas), *xt.shape[1:]), y_t, steps=steps,
                                     anchor_mean=anchor)
                images = images.float().clamp(0, 1)
                images = images * torch.from_numpy(mask).to(images.device)
                reenc = pipe.encode_semantic(images).float().cpu().numpy()
                score_orig = _score(probe, y[None], cls)[0]
                scores = _score(probe, reenc, cls)
                change = probe.output(reenc, cls) - probe.output(reenc[:1], cls)[0]
                label = target_name(probe.target)
                vols = images[:, 0].cpu().numpy()
                unit_text = (f"change of the '{probe.target}' probe's {output_name(probe)}"
                             if unit_name == "target" else "z-scored units x sqrt(d)")
                rows, jobs = [], []
                for i, (a, alpha) in enumerate(zip(strengths, alphas)):
                    rows.append({"target": probe.target, "strength": a, "strength_unit": unit_name, "alpha": alpha,
                                 "score_reencoded": float(scores[i]), "change_reencoded": float(change[i]),
                                 "score_original_codes": float(score_orig) if a == 0 else None})
                    if a == 0:
                        continue
                    desc = f"manip{label}{'Delta' if unit_name == 'target' else ''}{strength_label(a)}"
                    side = {"Description": f"Counterfactual: y_sem moved by {a:+g} ({unit_text}) along the "
                                           f"'{probe.target}' probe direction; x_T of the session kept.",
                            "Strength": a, "StrengthUnit": unit_name, "Alpha": alpha, "Probe": str(ppath),
                            "Target": probe.target, "DDIMSteps": steps,
                            "AnchoredLatentMean": anchor and pipe.latent_mean is not None,
                            "ProbeScoreOriginal": float(score_orig), "ProbeScoreReconstruction": float(scores[0]),
                            "ProbeScoreManipulated": float(scores[i]),
                            "ProbeOutputChange": float(change[i]), "SkullStripped": True}
                    jobs.append((desc, vols[i], side, (src, ypath, xpath, ppath)))
                    jobs.append((desc + "diff", vols[i] - vols[0], {
                        "Description": f"manipulated ({a:+g}) minus reconstruction (0)", "Strength": a,
                        "StrengthUnit": unit_name, "SkullStripped": True}, (src,)))
                ctx.for_each(lambda job: ctx.writer.write_nifti(grid_image(ctx, job[1]), {
                    **ses.entities, "space": outputs.SPACE, "res": ctx.grid.res_label, "desc": job[0],
                    "suffix": "T1w"}, job[2], sources=list(job[3])), jobs)
                table = pd.DataFrame(rows).sort_values("strength")
                ordered = table["score_reencoded"].to_numpy()
                monotonic = bool(np.all(np.diff(ordered) > 0))
                ctx.writer.write_tsv(table, {**ses.entities, "desc": f"manip{label}", "suffix": "predictions"}, {
                    "Description": "probe score of the re-encoded counterfactuals by strength (0 = reconstruction)",
                    "Monotonic": monotonic,
                    "strength": {"Description": f"asked strength ({unit_text})"},
                    "alpha": {"Description": "the same strength in the method's units (z-scored y_sem x sqrt(d))"},
                    "score_reencoded": {
                        "Description": "regression: predicted value; classification: probability of the class"},
                    "change_reencoded": {
                        "Description": f"probe output ({output_name(probe)}) of the re-encoded image "
                                       "minus that of the re-encoded reconstruction; with --strength-unit target "
                                       "compare it with the strength asked"}},
                    sources=[ypath, ppath])
                order = np.argsort(strengths)
                what = "asked change" if unit_name == "target" else "alpha"
                score_name = "predicted" if probe.kind == "regression" else "p"
                fig = image_rows([(f"{what} {strengths[j]:+g}: {score_name} {scores[j]:.3g}", vols[j]) for j in order],
                                 f"{ses.key}: manipulation along {probe.target} (monotonic: {monotonic})")
                ctx.writer.write_figure(fig, {**ses.entities, "desc": f"manipulation{label}", "suffix": "T1w"})


def _score(probe, X: np.ndarray, cls) -> np.ndarray:
    if probe.kind == "regression":
        return np.asarray(probe.predict(X), dtype=float)
    proba = probe.predict_proba(X)
    idx = probe._class_index(cls) if cls is not None else len(probe.classes) - 1
    return proba[:, idx]
