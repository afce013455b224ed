"""``ldae-bids-tools train``: train an LDAE on model-ready images and export a bundle.

Single process::

    ldae-bids-tools train DERIV_DIR -o TRAIN_DIR --preset compact

Several GPUs or nodes, through torchrun (same arguments)::

    torchrun --nproc_per_node 4 -m ldae_bids.cli.train DERIV_DIR -o TRAIN_DIR

Rerunning the command resumes from the last checkpoint in TRAIN_DIR.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def train(
    inputs: Annotated[list[Path], typer.Argument(
        help="Model-ready images (*_desc-preproc_T1w.nii.gz) or folders searched for them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Training folder (checkpoints, logs, report).")],
    preset: Annotated[str, typer.Option(help="Model preset: tiny, compact or paper.")] = "compact",
    ae_steps: Annotated[Optional[int], typer.Option(help="Stage-1 steps (patch phase).")] = None,
    ae_patch_size: Annotated[Optional[int], typer.Option(
        help="Stage-1 random cubic crops of this size (cheaper on CPU), 0 = whole volumes.")] = None,
    ae_full_volume_steps: Annotated[Optional[int], typer.Option(
        help="Whole-volume steps after the crop phase.")] = None,
    ldae_steps: Annotated[Optional[int], typer.Option(help="Stage-2 steps.")] = None,
    ae_max_minutes: Annotated[Optional[float], typer.Option(
        help="Wall-clock budget of stage 1 (then the whole-volume phase runs).")] = None,
    ldae_max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget of stage 2.")] = None,
    ae_batch_size: Annotated[Optional[int], typer.Option(help="Stage-1 batch per process.")] = None,
    ae_lr: Annotated[Optional[float], typer.Option(help="Stage-1 learning rate (after the warm-up).")] = None,
    ae_ssim_weight: Annotated[Optional[float], typer.Option(
        help="Weight of (1 - SSIM) next to L1 in stage 1 (the reported whole-volume SSIM of the clamped "
             "output); 0 = off.")] = None,
    ldae_batch_size: Annotated[Optional[int], typer.Option(help="Stage-2 batch per process.")] = None,
    ldae_weight_cap: Annotated[Optional[float], typer.Option(
        help="Stage-2 loss weight clip(1/SNR(t), 1, CAP): scores high-noise steps on their x0 error, where "
             "only y_sem tells subjects apart; 1 = plain epsilon loss.")] = None,
    ldae_lr: Annotated[Optional[float], typer.Option(help="Stage-2 learning rate (after the warm-up).")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(
        help="Learning rate after the 100-step warm-up, in every stage: constant, or cosine (a half cosine down to "
             "--lr-min-fraction x the rate at the stage's last planned step: --ldae-steps for stage 2; set the "
             "steps to what a time budget allows).")] = None,
    lr_min_fraction: Annotated[Optional[float], typer.Option(
        help="With --lr-schedule cosine: the final rate as a fraction of the stage's rate.")] = None,
    steps_from_budget: Annotated[Optional[bool], typer.Option(
        "--steps-from-budget/--no-steps-from-budget",
        help="Plan each phase that has a --*-max-minutes budget to end with it: its step count from the speed "
             "of its first steps (the steps given cap it), so --lr-schedule cosine reaches its floor when the "
             "budget ends. Stage 1 only on whole volumes (--ae-patch-size 0).")] = None,
    decoder_steps: Annotated[Optional[int], typer.Option(
        help="Decoder refinement after stage 2: steps training the autoencoder's decoder on whole volumes with "
             "its encoder frozen (latents and stage 2 stay valid, so a finished run can add it). 0 = off.")] = None,
    decoder_max_minutes: Annotated[Optional[float], typer.Option(
        help="Wall-clock budget of the decoder refinement (over all calls).")] = None,
    decoder_batch_size: Annotated[Optional[int], typer.Option(help="Decoder-refinement batch per process.")] = None,
    decoder_lr: Annotated[Optional[float], typer.Option(help="Decoder-refinement learning rate.")] = None,
    decoder_ssim_weight: Annotated[Optional[float], typer.Option(
        help="Weight of (1 - SSIM) next to L1 in the decoder refinement.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of subjects held out.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split and of training.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints.")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Steps between validations.")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Where to export the bundle (default OUTPUT/bundle).")] = None,
    bundle_name: Annotated[Optional[str], typer.Option(help="Name recorded in the bundle.")] = None,
    template: Annotated[str, typer.Option(help="Template of the model grid.")] = "MNI152NLin2009cAsym",
    data_description: Annotated[str, typer.Option(help="Training data, for the bundle metadata.")] = "",
    normalisation: Annotated[str, typer.Option(
        help="Intensity normalisation of the inputs, recorded in the bundle: percentile or minmax.")] = "percentile",
    bias_correction: Annotated[str, typer.Option(
        help="Bias-field correction the inputs had, recorded in the bundle (the preprocess stage then "
             "applies the same): none or n4.")] = "none",
    licence: Annotated[str, typer.Option(help="Licence of the trained weights.")] = "unspecified",
    init_from: Annotated[Optional[Path], typer.Option(
        help="Start from this bundle's weights (fine-tuning, e.g. the shipped default on your data). Same "
             "preset and intensity spec required; its training subjects stay out of validation.")] = None,
    adapt_intensity: Annotated[bool, typer.Option(
        "--adapt-intensity", help="With --init-from: accept a bundle trained on other intensities (e.g. without "
        "N4, for a run with --bias-correction n4) and fine-tune it to these; the new bundle records the new spec "
        "and, under training.init_from, the old one.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA if present).")] = None,
    threads: Annotated[Optional[str], typer.Option(
        help="CPU threads for torch: a number, or 'auto' (follow the cores other processes leave free).")] = None,
    precision: Annotated[str, typer.Option(
        help="Mixed precision: auto (bf16 on CUDA and on CPUs with native bf16, about twice as fast there; "
             "fp32 elsewhere), fp32 or bf16.")] = "auto",
    export_only: Annotated[bool, typer.Option(
        "--export-only", help="Export the current checkpoint of OUTPUT as a bundle, do not train.")] = False,
) -> None:
    """Train both stages (resuming from OUTPUT if possible) and export a bundle."""
    from ldae_bids.errors import LdaeError, UsageError

    overrides = {k: v for k, v in dict(
        ae_steps=ae_steps, ae_full_volume_steps=ae_full_volume_steps, ldae_steps=ldae_steps,
        ae_max_minutes=ae_max_minutes, ldae_max_minutes=ldae_max_minutes, ae_batch_size=ae_batch_size, ldae_batch_size=ldae_batch_size,
        ae_lr=ae_lr, ssim_weight=ae_ssim_weight, steps_from_budget=steps_from_budget,
        ldae_weight_cap=ldae_weight_cap, ldae_lr=ldae_lr, lr_schedule=lr_schedule, lr_min_fraction=lr_min_fraction,
        decoder_steps=decoder_steps, decoder_max_minutes=decoder_max_minutes,
        decoder_batch_size=decoder_batch_size, decoder_lr=decoder_lr, decoder_ssim_weight=decoder_ssim_weight,
        val_fraction=val_fraction, seed=seed,
        checkpoint_every=checkpoint_every, val_every=val_every).items() if v is not None}
    if ae_patch_size is not None:
        overrides["ae_patch_size"] = (ae_patch_size,) * 3 if ae_patch_size > 0 else None
    try:
        import logging

        import torch

        from ldae_bids.model.config import preset as get_preset
        from ldae_bids.model.export import export_bundle
        from ldae_bids.model.train import TrainSettings, load_settings, run_training

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if threads and threads != "auto":
            if not threads.isdigit() or int(threads) < 1:
                raise UsageError("--threads must be a positive number or 'auto'")
            torch.set_num_threads(int(threads))
        from ldae_bids.device import PRECISIONS

        if precision not in PRECISIONS:
            raise UsageError(f"--precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
        if bias_correction not in ("none", "n4"):
            raise UsageError("--bias-correction must be none or n4")
        from ldae_bids.model.loop import LR_SCHEDULES

        if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule must be {' or '.join(LR_SCHEDULES)}")
        if lr_min_fraction is not None and not 0 <= lr_min_fraction <= 1:
            raise UsageError("--lr-min-fraction must be in [0, 1]")
        if ldae_lr is not None and not ldae_lr > 0:
            raise UsageError("--ldae-lr must be positive")
        if ae_lr is not None and not ae_lr > 0:
            raise UsageError("--ae-lr must be positive")
        if ae_ssim_weight is not None and ae_ssim_weight < 0:
            raise UsageError("--ae-ssim-weight must be 0 or more")
        if decoder_steps is not None and decoder_steps < 0:
            raise UsageError("--decoder-steps must be 0 or more")
        if decoder_batch_size is not None and decoder_batch_size < 1:
            raise UsageError("--decoder-batch-size must be at least 1")
        if decoder_ssim_weight is not None and decoder_ssim_weight < 0:
            raise UsageError("--decoder-ssim-weight must be 0 or more")
        if adapt_intensity and init_from is None:
            raise UsageError("--adapt-intensity needs --init-from")
        if val_fraction is not None and not 0 <= val_fraction < 1:
            raise UsageError("--val-fraction must be in [0, 1)")
        model_cfg, train_cfg = get_preset(preset)
        settings = TrainSettings(
            inputs=tuple(inputs), output=output, model=model_cfg,
            train=dataclasses.replace(train_cfg, **overrides), preset=preset, template=template,
            bundle=bundle, bundle_name=bundle_name, device=device, auto_threads=threads == "auto",
            precision=precision, normalisation=normalisation,
            bias_correction=None if bias_correction == "none" else bias_correction,
            dataset_description=data_description, licence=licence, init_from=init_from,
            adapt_intensity=adapt_intensity)
        if export_only and (output / "settings.json").exists():
            # the run's own settings (data description, licence...), only the target may change; the folder is
            # the one given (settings.json records where the run was made: it may have been moved or copied)
            saved = load_settings(output)
            settings = dataclasses.replace(saved, output=output, bundle=bundle or saved.bundle,
                                           bundle_name=bundle_name or saved.bundle_name)
        path = export_bundle(settings) if export_only else run_training(settings)
        if path is not None:
            typer.echo(f"bundle: {path}")
    except LdaeError as exc:
        typer.echo(f"ldae-bids-tools train: {exc.message}", err=True)
        raise typer.Exit(int(exc.exit_code)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
