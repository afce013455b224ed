"""Stage 2: cached scaled latents, then the semantic encoder and the y_sem-conditioned denoiser,
trained jointly on the epsilon-prediction loss with an EMA copy. Resumes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from torch import nn

from ldae_bids.model import checkpoint as ckpt
from ldae_bids.model import loop
from ldae_bids.model.config import ModelConfig

log = logging.getLogger("ldae_bids")


class Stage2(nn.Module):
    """Semantic encoder + denoiser as one module (one DDP wrapper, one EMA)."""

    def __init__(self, semantic_encoder: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.semantic_encoder, self.denoiser = semantic_encoder, denoiser

    def forward(self, images: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(noisy, t, self.semantic_encoder(images))


@torch.no_grad()
def encode_all(ae: nn.Module, store, device, batch: int = 2) -> torch.Tensor:
    """Unscaled posterior-mean latents of every volume of ``store`` (CPU tensor), in float32 whatever the run's
    precision: they are stage 2's training data and give the latent scale, which then does not depend on
    ``--precision`` (under bf16 it came out 1.1375 instead of 1.1364 for the same autoencoder and images)."""
    ae.eval()
    out = []
    for i in range(0, len(store), batch):
        x = store.batch(range(i, min(i + batch, len(store)))).to(device)
        out.append(ae.encode(x)[0].float().cpu())
    return torch.cat(out)


def prepare_latents(settings, dist, ae, store, val_store, state) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Scaled train/validation latents and the latent scale (1 / std of training latents), cached."""
    from safetensors.torch import load_file, save_file

    from ldae_bids.model.distributed import barrier

    path = settings.output / "latents.safetensors"
    stale = not path.exists() or load_file(str(path))["train"].shape[0] != len(store)
    if "latent_scale" not in state or stale:
        if dist.is_main:
            train = encode_all(ae, store, dist.device)
            val = encode_all(ae, val_store, dist.device) if val_store is not None and len(val_store) else train[:0]
            scale = float(1.0 / train.std())
            save_file({"train": (train * scale).contiguous(), "val": (val * scale).contiguous(),
                       "scale": torch.tensor([scale])}, str(path))
            log.info("latent scale factor %.4f (1 / std of %d training latents)", scale, len(train))
        barrier(dist)
    saved = load_file(str(path))
    scale = float(saved["scale"][0])
    state.update(latent_scale=scale, latent_mean=latent_channel_mean(saved["train"]))
    return saved["train"], saved["val"], scale


def latent_channel_mean(latents: torch.Tensor) -> list[float]:
    """Per-channel spatial mean of scaled latents (N, C, D, H, W), averaged over the N images: the
    ``latent_mean`` that sampling from a random x_T anchors to (:meth:`LdaePipeline.ddim`)."""
    return [float(v) for v in latents.float().mean(dim=(0, 2, 3, 4))]


def make_pipeline(model_cfg: ModelConfig, ae, semantic_encoder, denoiser):
    """A pipeline around existing networks (no copy)."""
    from ldae_bids.model.pipeline import LdaePipeline

    pipe = LdaePipeline(model_cfg, {"autoencoder": ae, "semantic_encoder": semantic_encoder, "denoiser": denoiser})
    pipe.precision = loop.precision(pipe.device)  # the training run's (--precision), for validation too
    return pipe


@torch.no_grad()
def ysem_use(pipeline, images: torch.Tensor, timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> dict:
    """Does the denoiser use y_sem? Its noise-prediction error with each image's own y_sem against
    the error with another image's (the batch rolled by one), at fixed timesteps.

    ``gain`` = other / own - 1: 0 means the denoiser ignores which subject the code comes from
    (the semantic code then carries nothing the model relies on). Needs at least two images.

    Returns
    -------
    dict
        ``timesteps``, ``own``, ``other`` (mean squared errors) and ``gain`` per timestep, and their
        mean ``mean_gain``.
    """
    if images.shape[0] < 2:
        raise ValueError("ysem_use needs at least two images")
    device = pipeline.device
    z0 = torch.cat([pipeline.encode_latent(images[i:i + 2].to(device)) for i in range(0, images.shape[0], 2)])
    y = torch.cat([pipeline.encode_semantic(images[i:i + 2].to(device)) for i in range(0, images.shape[0], 2)])
    other = torch.roll(y, 1, dims=0)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {"timesteps": [], "own": [], "other": [], "gain": []}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen).to(device)
        tt = torch.full((z0.shape[0],), int(t), device=device, dtype=torch.long)
        noisy = pipeline.scheduler.add_noise(z0, noise, tt)
        err = {}
        for name, cond in (("own", y), ("other", other)):
            with pipeline.autocast():
                eps = pipeline.denoiser(noisy, tt, cond).float()
            err[name] = float((eps - noise).square().mean())
        out["timesteps"].append(int(t))
        out["own"].append(err["own"])
        out["other"].append(err["other"])
        out["gain"].append(err["other"] / err["own"] - 1.0)
    out["mean_gain"] = float(np.mean(out["gain"]))
    return out


@torch.no_grad()
def validate_ldae(pipeline, val_store, steps: int, seed: int, limit: int = 2) -> dict:
    """SSIM/MSE of LDAE reconstructions (inverted x_T) and of y_sem-only samples on validation volumes."""
    from ldae_bids.metrics import similarity

    if val_store is None or len(val_store) == 0:
        return {}
    x = val_store.batch(range(min(limit, len(val_store)))).to(pipeline.device)
    rec = pipeline.reconstruct(x, steps=steps)
    smp = pipeline.sample(rec.y_sem, torch.Generator().manual_seed(seed), steps=steps)
    out: dict[str, list] = {}
    for i in range(x.shape[0]):
        for key, img in (("recon", rec.images), ("sample", smp)):
            for k, v in similarity(img[i].cpu(), x[i].cpu()).items():
                out.setdefault(f"val_{key}_{k}", []).append(v)
    result = {k: float(np.mean(v)) for k, v in out.items()}
    if len(val_store) >= 2:  # denoiser calls only: cheap enough for more subjects
        more = val_store.batch(range(min(8, len(val_store))))
        result["val_ysem_gain"] = ysem_use(pipeline, more, seed=seed)["mean_gain"]
    return result


def calibrate_semantic(encoder: nn.Module, store, device, batch: int = 4) -> int:
    """Standardisation statistics of ``encoder`` (the EMA copy) over every image of ``store``."""
    if getattr(encoder, "out_norm", None) is None:
        return 0
    with loop.autocast(device):
        return encoder.calibrate(store.batch(range(i, min(i + batch, len(store)))).to(device)
                                 for i in range(0, len(store), batch))


def train_ldae(settings, dist, store, val_store, ae, latents, scale, state, logger, init=None):
    """Stage 2: semantic encoder + conditional denoiser, jointly, with EMA. Returns the EMA Stage2 module.

    ``init`` (a pipeline, from ``--init-from``) gives the starting weights of a new run (EMA too).
    """
    from ldae_bids.model.distributed import wrap
    from ldae_bids.model.ema import Ema
    from ldae_bids.model.losses import diffusion_loss, high_noise_weights
    from ldae_bids.model.networks import build_networks, build_scheduler

    tc, device = settings.train, dist.device
    model_cfg = dataclasses.replace(settings.model, latent_scale=scale, latent_mean=tuple(state["latent_mean"]))
    torch.manual_seed(tc.seed + 1)
    nets = build_networks(model_cfg)
    carried = []
    if init is not None:
        from ldae_bids.model.train import carried_networks

        carried = carried_networks(init.config, model_cfg)
        for net in carried:
            if net != "autoencoder":  # stage 1 carries that one
                nets[net].load_state_dict(getattr(init, net).state_dict())
    stage2 = Stage2(nets["semantic_encoder"], nets["denoiser"]).to(device)
    ema = Ema(stage2, tc.ema_decay)
    opt = torch.optim.AdamW(stage2.parameters(), lr=tc.ldae_lr, weight_decay=0.0)
    step = int(state.get("ldae_step", 0))
    # the steps asked now, not those of the first call: a finished or budget-stopped run continues when called
    # again with more steps or a larger --ldae-max-minutes (the budget counts this stage's time over all calls)
    total = tc.ldae_steps
    modules = {"stage2": stage2, "ema": ema.module}
    if step > 0:  # the folder's own checkpoint wins over --init-from
        ckpt.load_modules(settings.output, "ldae", modules)
        ckpt.load_optimizers(settings.output, "ldae", {"ldae": opt})
        log.info("ldae: resuming at step %d / %d", step, total)
    elif init is not None and "semantic_encoder" not in carried:
        log.info("%s: its semantic encoder differs from the %s preset's; that network starts fresh, the "
                 "autoencoder and the denoiser are carried", settings.init_from, settings.preset)
    # the y_sem statistics are the last checkpoint's (calibrated when it was saved) or the carried bundle's:
    # recalibrating unchanged weights would only recompute them (in this run's precision); fresh weights need them
    fresh_encoder = step == 0 and "semantic_encoder" not in carried
    if step >= total:
        if fresh_encoder:
            calibrate_semantic(ema.module.semantic_encoder, store, device)
        if step == 0 and init is not None:  # --ldae-steps 0: the carried networks, checkpointed for export
            loop.save_progress(settings, dist, "ldae", "ldae", modules, {"ldae": opt}, state, 0,
                               state.get("ldae_seconds", 0.0))
        return ema.module
    plan = loop.StepPlan("ldae", state, tc.ldae_max_minutes, tc.steps_from_budget, total, step)
    total = plan.total
    model = wrap(stage2, dist)
    scheduler = build_scheduler(model_cfg.scheduler)
    ae.eval().requires_grad_(False)
    stage2.train()
    t0 = start = time.time()
    seconds0 = state.get("ldae_seconds", 0.0)
    first = step
    while step < total:
        if loop.over_budget(dist, seconds0, start, tc.ldae_max_minutes):
            total = step
            log.info("ldae: time budget reached at step %d", step)
            if step > first or fresh_encoder:  # else the statistics stand
                calibrate_semantic(ema.module.semantic_encoder, store, device)
            loop.save_progress(settings, dist, "ldae", "ldae", modules, {"ldae": opt}, state, step,
                               seconds0 + time.time() - start)
            break
        rng = loop.rng_for(tc.seed, 2, dist.rank, step)
        idx = rng.integers(0, len(store), tc.ldae_batch_size)
        images = store.batch(idx).to(device)
        z0 = latents[torch.as_tensor(idx)].to(device)
        gen = loop.torch_gen_for(tc.seed, 3, dist.rank, step)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.num_train_timesteps, (z0.shape[0],), generator=gen).to(device)
        noisy = scheduler.add_noise(z0, noise, t)
        loop.set_lr(opt, tc.ldae_lr, step, total, tc.lr_schedule, tc.lr_min_fraction)
        with loop.autocast(device):
            eps = model(images, noisy, t)
        weights = high_noise_weights(scheduler.alphas_cumprod, t, tc.ldae_weight_cap) if tc.ldae_weight_cap > 1 else None
        loss = diffusion_loss(eps, noise, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(stage2.parameters(), tc.grad_clip)
        opt.step()
        ema.update(stage2, step)
        step += 1
        total = plan.observe(dist, step, seconds0 + time.time() - start)
        if step % tc.log_every == 0 or step == total:
            loop.adapt_threads(settings.auto_threads)
            logger(stage="ldae", step=step, loss=float(loss.detach()), grad_norm=float(gnorm),
                   lr=opt.param_groups[0]["lr"], sec_per_step=round((time.time() - t0) / tc.log_every, 3))
            t0 = time.time()
        if step % tc.val_every == 0 or step % tc.checkpoint_every == 0 or step == total:
            # y_sem standardised with the EMA encoder's own statistics before it is validated or saved
            calibrate_semantic(ema.module.semantic_encoder, store, device)
        if dist.is_main and (step % tc.val_every == 0 or step == total):
            pipe = make_pipeline(model_cfg, ae, ema.module.semantic_encoder, ema.module.denoiser)
            logger(stage="ldae", step=step, **validate_ldae(pipe, val_store, tc.val_steps, tc.seed))
        if step % tc.checkpoint_every == 0 or step == total:
            loop.save_progress(settings, dist, "ldae", "ldae", modules, {"ldae": opt}, state, step,
                               seconds0 + time.time() - start)
    return ema.module
