"""Configuration dataclasses of the LDAE model and its training, with presets.

Every network is described completely by its constructor arguments; the dataclasses
below are exactly those arguments, and :class:`ModelConfig` (all of them plus the
scheduler and the latent scale) is what a bundle stores in ``config.json``.

Presets
-------
``tiny``
    A few thousand parameters on a 16^3 grid, for tests (seconds on the CPU).
``compact``
    The shipped default: 2 mm MNI grid 80x96x80, latent 3x20x24x20, 512-d y_sem
    (flatten head, standardised), stage-2 loss weight cap 20, about 15 M parameters
    (29 MB as float16). Trains in minutes on one GPU, in hours on a CPU (the shipped
    weights: 2 CPU cores, about 10 hours over four runs; see docs/model.md and the
    bundle's metadata).
``paper``
    The reference configuration: 1.5 mm grid 128x160x128, autoencoder channels
    64/128/128/128, latent 3x16x20x16, 768-d y_sem.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from ldae_bids.errors import ModelError

MNI_TEMPLATE = "MNI152NLin2009cAsym"


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ModelError`."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Constructor arguments of :class:`monai.networks.nets.AutoencoderKL` (3D, one channel)."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 3
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    attention_levels: tuple[bool, ...] = (False, False, False)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False

    @property
    def downsampling(self) -> int:
        """Spatial reduction factor image -> latent."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class SemanticEncoderConfig:
    """Constructor arguments of :class:`ldae_bids.model.semantic.SemanticEncoder`."""

    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_blocks: int = 1
    emb_dim: int = 512
    norm_num_groups: int = 8
    pooling: str = "mean"
    head_channels: int = 16
    grid: tuple[int, int, int] | None = None
    standardise: bool = False


@dataclass(frozen=True)
class DenoiserConfig:
    """Constructor arguments of :class:`ldae_bids.model.denoiser.ConditionalUNet`."""

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 2
    cond_dim: int = 512
    time_dim: int = 128
    norm_num_groups: int = 8
    mid_attention: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    """Constructor arguments of :class:`monai.networks.schedulers.DDIMScheduler`."""

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a pipeline: nets, scheduler, latent scale, image shape."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    semantic_encoder: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    image_shape: tuple[int, int, int] = (80, 96, 80)
    latent_scale: float = 1.0
    # per-channel spatial mean of the scaled training latents (mean over subjects), which sampling from a
    # random x_T anchors its clean-latent prediction to (LdaePipeline.sample); None in older bundles
    latent_mean: tuple[float, ...] | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, D, H, W) of the (scaled) latent the denoiser works on."""
        f = self.autoencoder.downsampling
        return (self.autoencoder.latent_channels, *(s // f for s in self.image_shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Inverse of :meth:`to_dict`; raises :class:`ModelError` on unknown keys."""
        sub = {
            "autoencoder": AutoencoderConfig,
            "semantic_encoder": SemanticEncoderConfig,
            "denoiser": DenoiserConfig,
            "scheduler": SchedulerConfig,
        }
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ModelError(f"{where}: unknown key(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sub:
                kwargs[key] = _from_dict(sub[key], value, f"{where} [{key}]")
            elif key == "image_shape":
                kwargs[key] = tuple(int(v) for v in value)
            elif key == "latent_mean":
                kwargs[key] = None if value is None else tuple(float(v) for v in value)
            else:
                kwargs[key] = float(value)
        config = cls(**kwargs)
        config.validate(where)
        return config

    def validate(self, where: str = "config") -> None:
        """Check the pieces fit together (channels, conditioning size, grid divisibility)."""
        ae, den, sem = self.autoencoder, self.denoiser, self.semantic_encoder
        if den.in_channels != ae.latent_channels:
            raise ModelError(f"{where}: denoiser in_channels {den.in_channels} != latent_channels {ae.latent_channels}")
        if den.cond_dim != sem.emb_dim:
            raise ModelError(f"{where}: denoiser cond_dim {den.cond_dim} != semantic emb_dim {sem.emb_dim}")
        if sem.pooling == "flatten" and tuple(sem.grid or ()) != tuple(self.image_shape):
            raise ModelError(f"{where}: semantic encoder grid {sem.grid} != image shape {list(self.image_shape)}")
        if sem.pooling not in ("mean", "flatten"):
            raise ModelError(f"{where}: semantic encoder pooling {sem.pooling!r} is not 'mean' or 'flatten'")
        if self.latent_mean is not None and len(self.latent_mean) != ae.latent_channels:
            raise ModelError(f"{where}: latent_mean has {len(self.latent_mean)} values for {ae.latent_channels} "
                             "latent channels")
        f = ae.downsampling * 2 ** (len(den.channels) - 1)
        if any(s % f for s in self.image_shape):
            raise ModelError(f"{where}: image shape {list(self.image_shape)} not divisible by {f}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the two training stages (not needed for inference)."""

    seed: int = 0
    val_fraction: float = 0.15
    # stage 1: autoencoder
    ae_steps: int = 3000
    ae_batch_size: int = 2
    # random crops are cheaper (CPU) but GroupNorm statistics then differ from whole volumes:
    # a whole-volume phase of ae_full_volume_steps follows them (None = whole volumes throughout)
    ae_patch_size: tuple[int, int, int] | None = None
    ae_full_volume_steps: int = 100
    ae_max_minutes: float | None = None
    ae_lr: float = 3e-4
    ae_init_log_var: float | None = -8.0
    disc_lr: float = 1e-4
    kl_weight: float = 1e-7
    ssim_weight: float = 0.0
    adv_weight: float = 0.0
    adv_start: int = 0
    disc_channels: int = 32
    disc_layers: int = 3
    # decoder refinement (after stage 2): the decoder trained further on whole volumes with the encoder frozen,
    # so the latent space, the cached latents and stage 2 all stay valid (0 steps = off)
    decoder_steps: int = 0
    decoder_batch_size: int = 2
    decoder_lr: float = 4e-5
    decoder_ssim_weight: float = 0.5
    decoder_max_minutes: float | None = None
    # stage 2: latent diffusion autoencoder
    ldae_steps: int = 3000
    ldae_batch_size: int = 4
    ldae_max_minutes: float | None = None
    ldae_lr: float = 3e-4
    # epsilon-loss weight clip(1 / SNR(t), 1, cap): 1 = plain epsilon loss (see losses.high_noise_weights)
    ldae_weight_cap: float = 1.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # learning rate after the warm-up, in every stage: constant, or a half cosine to lr_min_fraction x the stage's
    # rate at its last planned step (ae_steps + ae_full_volume_steps, ldae_steps, decoder_steps)
    lr_schedule: str = "constant"
    lr_min_fraction: float = 0.0
    # plan each phase that has a wall-clock budget to end with it (loop.StepPlan): its step count from the speed of
    # its first steps, so that a decaying schedule reaches its floor when the budget ends; the steps asked cap it
    steps_from_budget: bool = False
    # bookkeeping
    checkpoint_every: int = 200
    log_every: int = 10
    val_every: int = 500
    val_steps: int = 20
    num_workers: int = 0  # reserved (volumes are held in memory; no loader workers yet)

    def to_dict(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> TrainConfig:
        data = dict(data)
        if data.get("ae_patch_size") is not None:
            data["ae_patch_size"] = tuple(data["ae_patch_size"])
        return _from_dict(cls, data, where)


def json_ready(obj: Any) -> Any:
    """Tuples -> lists, recursively, so ``json.dump`` output round-trips predictably."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configuration of a named preset.

    Parameters
    ----------
    name
        ``"tiny"``, ``"compact"`` or ``"paper"``.

    Returns
    -------
    (ModelConfig, TrainConfig)
    """
    if name == "tiny":
        model = ModelConfig(
            autoencoder=AutoencoderConfig(channels=(4, 8), latent_channels=2, norm_num_groups=4,
                                          attention_levels=(False, False)),
            semantic_encoder=SemanticEncoderConfig(channels=(4, 8), emb_dim=16, norm_num_groups=4,
                                                   pooling="flatten", head_channels=2, grid=(16, 16, 16),
                                                   standardise=True),
            denoiser=DenoiserConfig(in_channels=2, channels=(8, 16), num_res_blocks=1, cond_dim=16,
                                    time_dim=16, norm_num_groups=4),
            image_shape=(16, 16, 16),
        )
        train = TrainConfig(ae_steps=6, ae_patch_size=(8, 8, 8), ae_full_volume_steps=2, ldae_steps=6,
                            ldae_batch_size=2, checkpoint_every=3, log_every=1, val_every=4, val_steps=5,
                            ssim_weight=0.1, adv_weight=0.1, adv_start=2, disc_channels=4, disc_layers=1)
        return model, train
    if name == "compact":
        return ModelConfig(semantic_encoder=SemanticEncoderConfig(pooling="flatten", grid=(80, 96, 80),
                                                                  standardise=True)), TrainConfig(ldae_weight_cap=20.0)
    if name == "paper":
        model = ModelConfig(
            autoencoder=AutoencoderConfig(channels=(64, 128, 128, 128), latent_channels=3, num_res_blocks=2,
                                          norm_num_groups=32, attention_levels=(False,) * 4),
            semantic_encoder=SemanticEncoderConfig(channels=(32, 64, 128, 256, 512), num_res_blocks=2,
                                                   emb_dim=768, norm_num_groups=32, pooling="flatten",
                                                   grid=(128, 160, 128), standardise=True),
            denoiser=DenoiserConfig(channels=(128, 256, 256), num_res_blocks=2, cond_dim=768, time_dim=512,
                                    norm_num_groups=32, mid_attention=True),
            image_shape=(128, 160, 128),
        )
        train = TrainConfig(ae_steps=100_000, ae_batch_size=4, ae_patch_size=None, ae_full_volume_steps=0,
                            ae_lr=5e-5, kl_weight=1e-7, adv_weight=0.025, adv_start=10_000,
                            ldae_steps=200_000, ldae_batch_size=16, ldae_lr=1e-4, checkpoint_every=2000,
                            log_every=50, val_every=5000)
        return model, train
    raise ModelError(f"unknown preset {name!r} (choose tiny, compact or paper)")


PRESETS = ("tiny", "compact", "paper")
