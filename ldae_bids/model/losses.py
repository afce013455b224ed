"""Training losses: autoencoder (L1 + KL + optional SSIM / adversarial) and diffusion (eps MSE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


class AutoencoderLoss:
    """Generator-side loss of stage 1; returns the total and its parts.

    Parameters
    ----------
    kl_weight, ssim_weight, adv_weight
        Weights of the KL, (1 - SSIM) and least-squares adversarial terms (L1 has weight 1).

    The SSIM term is ``1 -`` the mean of :func:`ldae_bids.metrics.ssim_map_tensor` on the output clamped to
    [0, 1]: the SSIM that validation and the benchmarks report, as in the decoder refinement (MONAI's
    ``SSIMLoss`` with a 7-voxel window, and the unclamped output, both lowered the reported SSIM there: the
    decoder then fights a negative background; docs/model.md).
    """

    def __init__(self, kl_weight: float = 1e-7, ssim_weight: float = 0.0, adv_weight: float = 0.0):
        self.kl_weight, self.ssim_weight, self.adv_weight = kl_weight, ssim_weight, adv_weight

    def __call__(self, recon, target, z_mu, z_sigma, disc_fake_logits=None) -> tuple[torch.Tensor, dict]:
        recon, target = recon.float(), target.float()
        parts = {"l1": F.l1_loss(recon, target), "kl": kl_loss(z_mu.float(), z_sigma.float())}
        total = parts["l1"] + self.kl_weight * parts["kl"]
        if self.ssim_weight > 0:
            from ldae_bids.metrics import ssim_map_tensor

            parts["ssim"] = 1.0 - ssim_map_tensor(recon.clamp(0.0, 1.0), target).mean()
            total = total + self.ssim_weight * parts["ssim"]
        if disc_fake_logits is not None and self.adv_weight > 0:
            parts["adv"] = generator_adversarial_loss(disc_fake_logits)
            total = total + self.adv_weight * parts["adv"]
        return total, {k: float(v.detach()) for k, v in parts.items()}


def _last(logits):
    return (logits[-1] if isinstance(logits, (list, tuple)) else logits).float()


def generator_adversarial_loss(fake_logits) -> torch.Tensor:
    """Least-squares GAN loss of the generator (fake patches should score 1)."""
    return (_last(fake_logits) - 1).pow(2).mean()


def discriminator_loss(real_logits, fake_logits) -> torch.Tensor:
    """Least-squares GAN loss of the discriminator (real -> 1, fake -> 0)."""
    return 0.5 * ((_last(real_logits) - 1).pow(2).mean() + _last(fake_logits).pow(2).mean())


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE, optionally weighted per sample (``weights``, shape (B,))."""
    err = (eps_pred.float() - noise.float()).square().flatten(1).mean(1)
    return err.mean() if weights is None else (weights.to(err) * err).mean()


def high_noise_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample loss weights ``clip(1 / SNR(t), 1, cap)``; ``cap`` 1 gives the plain epsilon loss.

    With epsilon prediction the error at timestep t is ``SNR(t) * |x0_hat - x0|^2``: at high noise,
    where x_t shows almost nothing of the subject and only y_sem can tell subjects apart, a wrong
    x0 costs almost nothing, so the semantic encoder gets almost no training signal. Weighting by
    1/SNR there scores those steps on their x0 error instead (capped, so the loss stays bounded).
    """
    ab = alphas_cumprod.to(t.device)[t].float()
    return (1.0 - ab).div(ab).clamp(min=1.0, max=max(1.0, float(cap)))
