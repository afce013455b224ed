"""The LDAE pipeline: autoencoder + semantic encoder + conditional denoiser + DDIM.

All diffusion goes through one visible loop, :meth:`LdaePipeline.ddim`, used both
for decoding (x_T -> latent) and for the deterministic inversion (latent -> x_T).
Images are (B, 1, D, H, W) float tensors in [0, 1] on the model grid; latents are
scaled by ``latent_scale`` (1/std of the training latents) before diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldae_bids.model.config import ModelConfig
from ldae_bids.model.networks import build_networks, build_scheduler

# Adam's step size of the latent refinement, in scaled-latent units (standard deviation 1). 30 steps on the first
# 4 validation subjects of the shipped model (benchmarks/results/reconstruction-refined/, lr-*/): 0.02 and 0.05
# give the same SSIM (0.9365 / 0.9367 autoencoder, 0.9358 / 0.9357 LDAE at 50 steps), 0.1 less (0.9344 / 0.9300)
REFINE_LR = 0.05


@dataclass
class EncodeOutput:
    """Codes of a batch of images.

    Attributes
    ----------
    y_sem
        Semantic codes, (B, emb_dim).
    x_T
        Stochastic codes from DDIM inversion, (B, *latent_shape); None if not inverted.
    latent
        Scaled autoencoder latents, (B, *latent_shape) (refined when :meth:`LdaePipeline.encode` was asked to).
    """

    y_sem: torch.Tensor
    x_T: torch.Tensor | None
    latent: torch.Tensor


@dataclass
class ReconstructOutput:
    """Reconstruction of a batch: images plus the codes that produced them."""

    images: torch.Tensor
    y_sem: torch.Tensor
    x_T: torch.Tensor


class LdaePipeline(nn.Module):
    """Encode images to (y_sem, x_T) and decode them back.

    Parameters
    ----------
    config
        Model configuration (network arguments, scheduler, latent scale, image shape).
    networks
        Optional ready networks (``autoencoder``, ``semantic_encoder``, ``denoiser``);
        built fresh from ``config`` when omitted.
    """

    def __init__(self, config: ModelConfig, networks: dict[str, nn.Module] | None = None):
        super().__init__()
        config.validate()
        self.config = config
        nets = networks if networks is not None else build_networks(config)
        self.autoencoder = nets["autoencoder"]
        self.semantic_encoder = nets["semantic_encoder"]
        self.denoiser = nets["denoiser"]
        self.scheduler = build_scheduler(config.scheduler)
        self.latent_scale = float(config.latent_scale)
        self.latent_mean = None if config.latent_mean is None else \
            torch.tensor(config.latent_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # "auto": bf16 autocast on CUDA, fp32 on the CPU unless set (the app's --precision, resolved by
        # ldae_bids.device.resolve_precision: bf16 on CPUs with native bf16); "fp32" or "bf16" on either
        self.precision = "auto"
        # weight layout of the 3-D convolutions (set_memory_format); the app picks it with
        # ldae_bids.device.resolve_memory_format
        self.memory_format = "contiguous"
        from ldae_bids.model.cpu_conv import route_conv3d_to_onednn

        route_conv3d_to_onednn(self)  # CPU inference at batch 1: see cpu_conv.py

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self):
        """bf16 autocast when :attr:`precision` asks for it: by default on CUDA only."""
        from ldae_bids.device import autocast

        device = self.device
        if self.precision == "auto":  # not resolve_precision's auto: a library default stays fp32 on the CPU
            return autocast(device, "bf16" if device.type == "cuda" else "fp32")
        return autocast(device, self.precision)

    def set_memory_format(self, name: str) -> "LdaePipeline":
        """Lay the networks' 5-D weights out as ``channels_last`` (NDHWC) or ``contiguous`` (NCDHW).

        Convolutions follow their weights' layout, so activations stay in it through the networks; the
        results agree to the arithmetic's rounding (exactly the same maths, another summation order).
        """
        formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
        if name not in formats:
            raise ValueError(f"memory format must be one of {', '.join(formats)}, not {name!r}")
        for net in (self.autoencoder, self.semantic_encoder, self.denoiser):
            net.to(memory_format=formats[name])
        self.memory_format = name
        return self

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 5 or images.shape[1] != 1 or tuple(images.shape[2:]) != tuple(self.config.image_shape):
            raise ValueError(f"expected images (B, 1, {', '.join(map(str, self.config.image_shape))}), "
                             f"got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def timesteps(self, steps: int) -> list[int]:
        """Descending DDIM timesteps for ``steps`` steps (from the scheduler)."""
        self.scheduler.set_timesteps(int(steps))
        return [int(t) for t in self.scheduler.timesteps]

    # ------------------------------------------------------------------ autoencoder
    @torch.no_grad()
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled autoencoder latents (posterior mean) of ``images``."""
        with self.autocast():
            z_mu, _ = self.autoencoder.encode(self._images(images))
        return (z_mu.float() * self.latent_scale).contiguous()  # NCDHW whatever the weights' layout

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents."""
        with self.autocast():
            images = self.autoencoder.decode(latent.to(self.device) / self.latent_scale)
        return images.float().clamp(0.0, 1.0).contiguous()

    @torch.no_grad()
    def autoencode(self, images: torch.Tensor) -> torch.Tensor:
        """Autoencoder-only reconstruction (the ceiling of LDAE reconstructions)."""
        return self.decode_latent(self.encode_latent(images))

    def refine_latent(self, images: torch.Tensor, latent: torch.Tensor | None = None, steps: int = 30,
                      lr: float = REFINE_LR) -> torch.Tensor:
        """The scaled latent that the decoder turns into ``images`` more faithfully than the encoder's.

        Starts from ``latent`` (default: :meth:`encode_latent`) and takes ``steps`` Adam steps on the latent
        only, minimising L1 + (1 - SSIM) between the decoded image (clamped to [0, 1]) and ``images``; the
        networks are not changed. The loss is each subject's own, summed over the batch, so a batch gives each
        subject what it would get alone (to rounding).

        Why: the decoder can draw a closer image than the one the encoder's latent gives it (an amortised
        encoder is not the decoder's inverse). x_T inverted from the refined latent carries the gain into
        every decoding (reconstruct, manipulate, fill-missing-sessions). Costs ``steps`` decoder forward and
        backward passes, about 1.2 s per subject and step on 2 CPU cores under bf16 (docs/model.md, "Latent
        refinement": 30 steps gave +0.012 SSIM on the shipped model's validation subjects).
        """
        from ldae_bids.metrics import ssim_map_tensor

        x = self._images(images)
        start = self.encode_latent(x) if latent is None else latent.to(self.device, torch.float32)
        if steps <= 0:
            return start
        z = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(int(steps)):
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    out = self.autoencoder.decode(z / self.latent_scale)
                out = out.float().clamp(0.0, 1.0)
                # each subject's own mean, summed: its gradient is the one it would get alone
                loss = ((out - x).abs().flatten(1).mean(1) + 1.0 - ssim_map_tensor(out, x).flatten(1).mean(1)).sum()
                loss.backward(inputs=[z])  # gradients for the latent only, none for the weights
                opt.step()
        return z.detach().contiguous()

    # ------------------------------------------------------------------ semantic code
    @torch.no_grad()
    def encode_semantic(self, images: torch.Tensor) -> torch.Tensor:
        """y_sem only (one forward pass of the semantic encoder), (B, emb_dim)."""
        with self.autocast():
            return self.semantic_encoder(self._images(images)).float()

    # ------------------------------------------------------------------ the sampling loop
    @torch.no_grad()
    def ddim(self, x: torch.Tensor, y_sem: torch.Tensor, steps: int, invert: bool = False,
             anchor_mean: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) between the clean latent and x_T.

        Parameters
        ----------
        x
            Start: x_T when decoding, the clean scaled latent when inverting.
        y_sem
            Semantic codes conditioning every step.
        steps
            Number of DDIM steps.
        invert
            False: x_T -> latent (sampling). True: latent -> x_T (inversion).
        anchor_mean
            Sampling only, for a random x_T (:meth:`sample`): at every step, set the per-channel spatial mean
            of the predicted clean latent to the training latents' (``config.latent_mean``; ignored when the
            bundle has none) and take the step with the noise that this prediction implies. Every brain's
            latent has nearly the same channel means (standard deviation 0.005 over the shipped model's
            training subjects: the skull-stripped brain on a fixed grid), but a standard-normal x_T carries a
            random one, which the denoiser cannot read at the first steps (where the clean-latent estimate
            amplifies its error 157-fold) and the later steps keep: sampled latents came out with channel
            means off by up to 1 and images too bright or too dark. An inverted x_T carries the subject's
            own means, so reconstruction does not anchor (anchoring did not help it); the ``manipulate`` stage
            does, since a code moved far along a probe lets the means drift (its counterfactuals saturated
            sooner without).

        Returns
        -------
        torch.Tensor
            The end of the trajectory, float32.
        """
        alphas = self.scheduler.alphas_cumprod.to(self.device, torch.float64)
        ts = self.timesteps(steps)  # descending, e.g. 999 ... 0
        # trajectory nodes: None is the clean end (alpha = 1)
        nodes: list[int | None] = ts + [None]
        pairs = list(zip(nodes[:-1], nodes[1:]))  # (t, t_next) from noisy to clean
        if invert:
            pairs = [(dst, src) for src, dst in reversed(pairs)]  # clean -> noisy
        x = x.to(self.device, torch.float32)
        y_sem = y_sem.to(self.device, torch.float32)
        mean = self.latent_mean.to(self.device) if anchor_mean and not invert and self.latent_mean is not None \
            else None
        for src, dst in pairs:
            t_model = src if src is not None else dst  # the network is evaluated at the noisy node
            a_src = alphas[src] if src is not None else alphas.new_tensor(1.0)
            a_dst = alphas[dst] if dst is not None else alphas.new_tensor(1.0)
            t = torch.full((x.shape[0],), t_model, device=self.device, dtype=torch.long)
            with self.autocast():
                eps = self.denoiser(x, t, y_sem).float()
            x0 = (x - (1 - a_src).sqrt().float() * eps) / a_src.sqrt().float()
            if mean is not None:
                x0 = x0 - x0.mean(dim=(2, 3, 4), keepdim=True) + mean
                if src is not None:  # the noise this clean latent implies (at the clean end there is none)
                    eps = (x - a_src.sqrt().float() * x0) / (1 - a_src).sqrt().float()
            x = a_dst.sqrt().float() * x0 + (1 - a_dst).sqrt().float() * eps
        return x.contiguous()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, images: torch.Tensor, invert: bool = True, steps: int = 50, refine_steps: int = 0
               ) -> EncodeOutput:
        """Semantic code, scaled latent and (optionally) x_T by DDIM inversion; ``refine_steps`` > 0 first
        refines the latent (:meth:`refine_latent`), so x_T decodes closer to the image."""
        latent = self.encode_latent(images)
        if refine_steps > 0:
            latent = self.refine_latent(images, latent, steps=refine_steps)
        y_sem = self.encode_semantic(images)
        x_T = self.ddim(latent, y_sem, steps, invert=True) if invert else None
        return EncodeOutput(y_sem=y_sem, x_T=x_T, latent=latent)

    @torch.no_grad()
    def decode(self, x_T: torch.Tensor, y_sem: torch.Tensor, steps: int = 50, anchor_mean: bool = False
               ) -> torch.Tensor:
        """Images in [0, 1] from (x_T, y_sem) by DDIM sampling then the AE decoder (``anchor_mean``: see
        :meth:`ddim`; for a random x_T)."""
        return self.decode_latent(self.ddim(x_T, y_sem, steps, invert=False, anchor_mean=anchor_mean))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, steps: int = 50, refine_steps: int = 0) -> ReconstructOutput:
        """Encode (with inversion) then decode, with the same number of steps (``refine_steps``: see
        :meth:`encode`)."""
        enc = self.encode(images, invert=True, steps=steps, refine_steps=refine_steps)
        return ReconstructOutput(images=self.decode(enc.x_T, enc.y_sem, steps), y_sem=enc.y_sem, x_T=enc.x_T)

    def random_x_T(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard-normal x_T of the latent shape (drawn on the CPU for reproducibility)."""
        noise = torch.randn((batch, *self.config.latent_shape), generator=generator)
        return noise.to(self.device)

    @torch.no_grad()
    def sample(self, y_sem: torch.Tensor, generator: torch.Generator | None = None, steps: int = 50,
               x_T: torch.Tensor | None = None, anchor_mean: bool = True) -> torch.Tensor:
        """Images from semantic codes alone: random x_T (from ``generator``), then :meth:`decode` with the
        latent channel means anchored (``anchor_mean``, see :meth:`ddim`; a no-op for bundles without
        ``latent_mean``)."""
        if x_T is None:
            x_T = self.random_x_T(y_sem.shape[0], generator)
        return self.decode(x_T, y_sem, steps, anchor_mean=anchor_mean)
