"""Stage 1: the KL autoencoder (L1 + KL, optional SSIM and patch-adversarial terms).

Random patches first (cheap, many views per volume), then a short whole-volume phase so
the GroupNorm statistics match inference on full volumes. Resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from ldae_bids.model import checkpoint as ckpt
from ldae_bids.model import data as mdata
from ldae_bids.model import loop

log = logging.getLogger("ldae_bids")


@torch.no_grad()
def validate_autoencoder(ae: nn.Module, val_store, device, limit: int = 4) -> dict:
    """Mean whole-volume SSIM/MSE of the autoencoder on up to ``limit`` validation volumes."""
    from ldae_bids.metrics import similarity

    if val_store is None or len(val_store) == 0:
        return {}
    was_training = ae.training
    ae.eval()
    scores = []
    for i in range(min(limit, len(val_store))):
        x = val_store.batch([i]).to(device)
        with loop.autocast(device):
            recon = ae.decode(ae.encode(x)[0]).float().clamp(0, 1)
        scores.append(similarity(recon.cpu(), x.cpu()))
    ae.train(was_training)
    return {f"val_{k}": float(np.mean([s[k] for s in scores])) for k in scores[0]}


@torch.no_grad()
def init_log_var(ae: nn.Module, value: float) -> None:
    """Start the posterior log-variance at ``value`` (MONAI starts at 0, i.e. sigma = 1).

    With the tiny KL weight the encoder has to learn to shrink sigma before the decoder
    sees a clean latent, which costs many steps; starting small skips that phase.
    """
    conv = ae.quant_conv_log_sigma.conv
    conv.weight.zero_()
    conv.bias.fill_(value)


def train_autoencoder(settings, dist, store, val_store, state, logger, init=None) -> nn.Module:
    """Stage 1; resumes from the checkpoint when ``state`` points into it. Returns the autoencoder.

    ``init`` (a pipeline, from ``--init-from``) gives the starting weights of a new run.
    """
    from ldae_bids.model.distributed import wrap
    from ldae_bids.model.losses import AutoencoderLoss, discriminator_loss
    from ldae_bids.model.networks import build_autoencoder

    tc, device = settings.train, dist.device
    torch.manual_seed(tc.seed)
    ae = build_autoencoder(settings.model.autoencoder).to(device)
    if init is not None:
        ae.load_state_dict(init.autoencoder.state_dict())
    elif tc.ae_init_log_var is not None:
        init_log_var(ae, tc.ae_init_log_var)
    modules: dict[str, nn.Module] = {"autoencoder": ae}
    opt_g = torch.optim.Adam(ae.parameters(), lr=tc.ae_lr)
    optimizers = {"autoencoder": opt_g}
    disc = None
    if tc.adv_weight > 0:
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(spatial_dims=3, num_layers_d=tc.disc_layers, channels=tc.disc_channels,
                                  in_channels=1, out_channels=1, norm="INSTANCE").to(device)
        modules["discriminator"] = disc
        optimizers["discriminator"] = torch.optim.Adam(disc.parameters(), lr=tc.disc_lr)
    full_steps = tc.ae_full_volume_steps if tc.ae_patch_size else 0
    patch_end = int(state.get("ae_patch_end", tc.ae_steps))
    total = int(state.get("ae_end", patch_end + full_steps))
    # --steps-from-budget plans stage 1 on whole volumes throughout (with crops, the budget ends the crop phase and a
    # fixed number of whole-volume steps follows: nothing to plan); the steps asked cap the plan, which the state
    # keeps for resumed calls with the same budget (another budget plans again)
    planning = tc.steps_from_budget and tc.ae_patch_size is None and bool(tc.ae_max_minutes)
    if planning and "latent_scale" not in state:
        total = patch_end = tc.ae_steps
    step = int(state.get("ae_step", 0))
    saved = (settings.output / "ae-weights.safetensors").exists()
    if step > 0 or saved:
        # also at step 0: a run with no stage-1 steps checkpointed its starting (e.g. --init-from) weights,
        # and those, not a fresh network, made the cached latents
        ckpt.load_modules(settings.output, "ae", modules)
        ckpt.load_optimizers(settings.output, "ae", optimizers)
        log.info("autoencoder: resuming at step %d / %d", step, total)
    if "latent_scale" in state and step < total:
        # stage 2 has begun on latents of these weights: training them further would leave its data stale
        log.warning("autoencoder: stage 2 has begun in %s, stage 1 stays at step %d (train the autoencoder further "
                    "in a new folder, e.g. with --init-from this run's bundle)", settings.output, step)
        total = step
    if step >= total:
        if step == 0 and not saved:
            # no stage-1 steps asked (e.g. fine-tuning stage 2 only): keep the starting weights
            state.update(stage="ae", ae_step=0, ae_end=0)
            loop.checkpoint_all(settings, dist, "ae", modules, optimizers, state)
        return ae
    plan = loop.StepPlan("ae", state, tc.ae_max_minutes, planning, total, step)
    if planning:
        total = patch_end = plan.total
    if tc.steps_from_budget and tc.ae_patch_size is not None and tc.ae_max_minutes:
        log.info("autoencoder: --steps-from-budget does not plan the crop phase (its budget ends it; whole-volume "
                 "steps follow)")
    log.info("autoencoder: %s weights", loop.lay_out_autoencoder(ae, dist).replace("_", "-"))
    model = wrap(ae, dist)
    dmodel = wrap(disc, dist) if disc is not None else None
    loss_fn = AutoencoderLoss(tc.kl_weight, tc.ssim_weight, tc.adv_weight)
    ae.train()
    t0 = start = time.time()
    seconds0 = state.get("ae_seconds", 0.0)
    while step < total:
        # the phase test first (the same on every rank): no budget all-reduce once the patch phase has ended
        if (tc.ae_patch_size is None or step < patch_end) \
                and loop.over_budget(dist, seconds0, start, tc.ae_max_minutes):
            # time budget spent: end the patch phase now (whole-volume phase still runs)
            patch_end = step if tc.ae_patch_size else patch_end
            total = step + full_steps if tc.ae_patch_size else step
            state.update(ae_patch_end=patch_end, ae_end=total)
            log.info("autoencoder: time budget reached at step %d, %d whole-volume steps follow", step,
                     total - step)
            if step >= total:
                # checkpoint before leaving: the latents, stage 2 and the bundle must all see these weights
                loop.save_progress(settings, dist, "ae", "ae", modules, optimizers, state, step,
                                   seconds0 + time.time() - start)
                break
        rng = loop.rng_for(tc.seed, 1, dist.rank, step)
        full = tc.ae_patch_size is None or step >= patch_end
        bs = tc.ae_batch_size if not full or tc.ae_patch_size is None else max(1, tc.ae_batch_size // 2)
        x = store.batch(rng.integers(0, len(store), bs))
        if not full:
            x = mdata.random_patches(x, tc.ae_patch_size, rng)
        x = x.to(device)
        loop.set_lr(opt_g, tc.ae_lr, step, total, tc.lr_schedule, tc.lr_min_fraction)
        adv = disc is not None and step >= tc.adv_start
        with loop.autocast(device):
            recon, z_mu, z_sigma = model(x)
            fake_logits = None
            if adv:
                disc.requires_grad_(False)
                fake_logits = disc(recon.contiguous())
        loss, parts = loss_fn(recon, x, z_mu, z_sigma, fake_logits)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), tc.grad_clip)
        opt_g.step()
        if adv:
            disc.requires_grad_(True)
            opt_d = optimizers["discriminator"]
            with loop.autocast(device):
                logits = dmodel(torch.cat([x, recon.detach()]).contiguous())
                real, fake = [lg[: x.shape[0]] for lg in logits], [lg[x.shape[0]:] for lg in logits]
            d_loss = discriminator_loss(real, fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["disc"] = float(d_loss.detach())
        step += 1
        if plan.pending:
            total = patch_end = plan.observe(dist, step, seconds0 + time.time() - start)
            if not plan.pending:
                state.update(ae_patch_end=patch_end, ae_end=total)
        if step % tc.log_every == 0 or step == total:
            loop.adapt_threads(settings.auto_threads)
            logger(stage="ae", step=step, loss=float(loss.detach()), full_volume=full, lr=opt_g.param_groups[0]["lr"],
                   sec_per_step=round((time.time() - t0) / tc.log_every, 3), **parts)
            t0 = time.time()
        if dist.is_main and (step % tc.val_every == 0 or step == total):
            logger(stage="ae", step=step, **validate_autoencoder(ae, val_store, device))
        if step % tc.checkpoint_every == 0 or step == total:
            loop.save_progress(settings, dist, "ae", "ae", modules, optimizers, state, step,
                               seconds0 + time.time() - start)
    return ae


DECODER_PREFIXES = ("post_quant_conv.", "decoder.")


class _Decoder(nn.Module):
    """The decoding half of an autoencoder as one module (what DDP wraps in the decoder phase)."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z)


def decoder_parameters(ae: nn.Module) -> list[nn.Parameter]:
    """The parameters the decoder phase trains (``post_quant_conv`` and ``decoder``); the rest stays frozen."""
    return [p for n, p in ae.named_parameters() if n.startswith(DECODER_PREFIXES)]


def train_decoder(settings, dist, store, val_store, ae, latents, scale, state, logger) -> nn.Module:
    """Decoder refinement, after stage 2: the decoder learns to map the cached training latents back to
    their whole volumes (L1 + ``decoder_ssim_weight`` x (1 - SSIM)); the encoder is not touched, so the
    latent space, the cached latents and stage 2 all stay valid, and a finished run can add this phase
    (call it again with ``--decoder-steps``). Resumes from ``dec-*`` checkpoints; the budget
    (``--decoder-max-minutes``) counts this phase's time over all calls. Returns the autoencoder.
    """
    import torch.nn.functional as F

    from ldae_bids.metrics import ssim_map_tensor
    from ldae_bids.model.distributed import wrap

    tc, device = settings.train, dist.device
    step = int(state.get("dec_step", 0))
    total = tc.decoder_steps
    modules = {"autoencoder": ae}
    params = decoder_parameters(ae)
    opt = torch.optim.Adam(params, lr=tc.decoder_lr)
    if step > 0:
        ckpt.load_modules(settings.output, "dec", modules)
        ckpt.load_optimizers(settings.output, "dec", {"decoder": opt})
        log.info("decoder: resuming at step %d / %d", step, total)
    if step >= total:
        return ae
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    plan = loop.StepPlan("dec", state, tc.decoder_max_minutes, tc.steps_from_budget, total, step)
    total = plan.total
    log.info("decoder: %s weights", loop.lay_out_autoencoder(ae, dist).replace("_", "-"))
    model = wrap(_Decoder(ae), dist)
    ae.train()
    t0 = start = time.time()
    seconds0 = state.get("dec_seconds", 0.0)
    while step < total:
        if loop.over_budget(dist, seconds0, start, tc.decoder_max_minutes):
            total = step
            log.info("decoder: time budget reached at step %d", step)
            loop.save_progress(settings, dist, "dec", "decoder", modules, {"decoder": opt}, state, step,
                               seconds0 + time.time() - start)
            break
        rng = loop.rng_for(tc.seed, 4, dist.rank, step)
        idx = rng.integers(0, len(store), tc.decoder_batch_size)
        x = store.batch(idx).to(device)
        z = (latents[torch.as_tensor(idx)] / scale).to(device)
        loop.set_lr(opt, tc.decoder_lr, step, total, tc.lr_schedule, tc.lr_min_fraction)
        with loop.autocast(device):
            recon = model(z)
        recon = recon.float()
        loss = l1 = F.l1_loss(recon, x)
        parts = {"l1": float(l1.detach())}
        if tc.decoder_ssim_weight > 0:
            # the whole-volume SSIM of ldae_bids.metrics on the clamped output: what the pipeline returns and
            # validation reports (unclamped, the negative background the decoder makes would dominate it)
            ssim = 1.0 - ssim_map_tensor(recon.clamp(0.0, 1.0), x).mean()
            loss = loss + tc.decoder_ssim_weight * ssim
            parts["ssim_loss"] = float(ssim.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        step += 1
        total = plan.observe(dist, step, seconds0 + time.time() - start)
        if step % tc.log_every == 0 or step == total:
            loop.adapt_threads(settings.auto_threads)
            logger(stage="decoder", step=step, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"],
                   sec_per_step=round((time.time() - t0) / tc.log_every, 3), **parts)
            t0 = time.time()
        if dist.is_main and (step % tc.val_every == 0 or step == total):
            logger(stage="decoder", step=step, **validate_autoencoder(ae, val_store, device))
        if step % tc.checkpoint_every == 0 or step == total:
            loop.save_progress(settings, dist, "dec", "decoder", modules, {"decoder": opt}, state, step,
                               seconds0 + time.time() - start)
    ae.eval().requires_grad_(False)
    return ae
