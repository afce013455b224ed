"""Two-stage training of the LDAE on model-ready images, resumable and DDP-ready.

The stages live in :mod:`stage1` and :mod:`stage2`, the export in :mod:`export`.
Stage 1 trains the KL autoencoder (random patches, then whole volumes); the training
latents then give the latent scale (1 / std) and are cached; stage 2 trains the
semantic encoder and the conditional denoiser jointly (EMA kept); an optional decoder
phase (``decoder_steps``) then trains the autoencoder's decoder further with its
encoder frozen, which leaves the latents and stage 2 valid. Everything lands
in one output folder::

    split.json            subject-level train / validation split (seeded)
    state.json, *.safetensors, *-optim.pt   the checkpoint (see checkpoint.py; ae-, ldae-, dec-)
    latents.safetensors   scaled training/validation latents (stage 2 input)
    logs/train.jsonl      one JSON record per logged step / validation
    logs/config-<id>.json the run settings
    report/*.png          loss curves, reconstructions, samples
    bundle/               the exported model bundle

Rerunning the same command resumes from the last checkpoint; the log records of steps after it are dropped
(those steps run again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ldae_bids.model import checkpoint as ckpt
from ldae_bids.model import data as mdata
from ldae_bids.model.config import ModelConfig, TrainConfig, json_ready

log = logging.getLogger("ldae_bids")


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training run needs, built once by the CLI."""

    inputs: tuple[Path, ...]
    output: Path
    model: ModelConfig
    train: TrainConfig
    preset: str = "compact"
    template: str = "MNI152NLin2009cAsym"
    bundle: Path | None = None
    bundle_name: str | None = None
    device: str | None = None
    auto_threads: bool = False
    precision: str = "auto"
    normalisation: str = "percentile"
    bias_correction: str | None = None
    dataset_description: str = ""
    licence: str = "CC-BY-SA-3.0"
    init_from: Path | None = None
    adapt_intensity: bool = False
    extra_metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = [str(p) for p in self.inputs]
        d["output"] = str(self.output)
        d["bundle"] = str(self.bundle) if self.bundle else None
        d["init_from"] = str(self.init_from) if self.init_from else None
        d["model"] = self.model.to_dict()
        d["train"] = self.train.to_dict()
        return json_ready(d)


def prepare_split(settings: TrainSettings, is_main: bool, keep: dict | None = None) -> dict:
    """Load or create the subject-level split (kept across resumes).

    ``keep`` is the split of the bundle a run starts from (``--init-from``): its subjects
    keep their side, so a subject the bundle was trained on never becomes a validation
    subject; only new subjects are split (seeded).
    """
    path = settings.output / "split.json"
    if path.exists():
        return json.loads(path.read_text())
    images = mdata.find_images(list(settings.inputs))
    subjects = [mdata.subject_of(p) for p in images]
    if not keep:
        train, val = mdata.split_subjects(subjects, settings.train.val_fraction, settings.train.seed)
    else:
        old_train, old_val = set(keep.get("train", [])), set(keep.get("validation", []))
        new = [s for s in subjects if s not in old_train | old_val]
        train, val = mdata.split_subjects(new, settings.train.val_fraction, settings.train.seed) if new else ([], [])
        train = sorted(set(train) | (old_train & set(subjects)))
        val = sorted(set(val) | (old_val & set(subjects)))
    split = {
        "seed": settings.train.seed,
        "val_fraction": settings.train.val_fraction,
        "train": train,
        "validation": val,
        "images": {s: [str(p) for p, q in zip(images, subjects) if q == s] for s in sorted(set(subjects))},
    }
    if is_main:
        settings.output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split, indent=2))
    return split


def images_of(split: dict, which: str) -> list[Path]:
    """Images of the subjects of one side of the split (subjects without images are skipped)."""
    return [Path(p) for s in split[which] for p in split["images"].get(s, [])]


def save_settings(settings: TrainSettings) -> None:
    """Write the run settings to ``settings.json`` and ``logs/config-<run id>.json``."""
    text = json.dumps(settings.to_dict(), indent=2)
    (settings.output / "logs").mkdir(parents=True, exist_ok=True)
    (settings.output / "settings.json").write_text(text)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    (settings.output / "logs" / f"config-{run_id}.json").write_text(text)


def load_settings(output: Path) -> TrainSettings:
    """Settings of an earlier run in ``output`` (for export / resume)."""
    from ldae_bids.errors import MissingInputError

    path = Path(output) / "settings.json"
    if not path.exists():
        raise MissingInputError(f"{path}: no training run here")
    d = json.loads(path.read_text())
    return TrainSettings(
        inputs=tuple(Path(p) for p in d["inputs"]), output=Path(d["output"]),
        model=ModelConfig.from_dict(d["model"], str(path)), train=TrainConfig.from_dict(d["train"], str(path)),
        preset=d["preset"], template=d["template"], bundle=Path(d["bundle"]) if d.get("bundle") else None,
        bundle_name=d.get("bundle_name"), device=d.get("device"), precision=d.get("precision", "auto"),
        normalisation=d.get("normalisation", "percentile"), bias_correction=d.get("bias_correction"),
        dataset_description=d.get("dataset_description", ""), licence=d.get("licence", "CC-BY-SA-3.0"),
        init_from=Path(d["init_from"]) if d.get("init_from") else None,
        adapt_intensity=bool(d.get("adapt_intensity", False)),
        extra_metadata=d.get("extra_metadata", {}),
    )


def carried_networks(theirs, ours) -> list[str]:
    """Networks an ``--init-from`` run takes over from a bundle of config ``theirs`` into config ``ours``:
    the autoencoder and the denoiser always (:func:`load_init` checks they match), the semantic encoder
    only when its constructor arguments match too."""
    same = theirs.semantic_encoder == ours.semantic_encoder
    return ["autoencoder", "semantic_encoder", "denoiser"] if same else ["autoencoder", "denoiser"]


def load_init(settings: TrainSettings):
    """The bundle a run starts from (``--init-from``), checked against the run's networks.

    Fine-tuning needs the same autoencoder, denoiser, scheduler and grid (every constructor
    argument; the latent scale is recomputed from the new training latents). A semantic
    encoder of another architecture (e.g. the ``flatten`` head of the current presets on a
    bundle made with the ``mean`` head) starts from fresh weights; the rest is carried.
    """
    from ldae_bids.errors import InputError
    from ldae_bids.model.bundle import load_bundle

    mb = load_bundle(settings.init_from)
    theirs, ours = mb.config.to_dict(), settings.model.to_dict()
    for d in (theirs, ours):
        d.pop("latent_scale", None)  # both recomputed from the new training latents
        d.pop("latent_mean", None)
        d.pop("semantic_encoder", None)
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise InputError(f"{settings.init_from}: bundle networks differ from the {settings.preset} preset "
                         f"in {', '.join(diff)}; fine-tune with the bundle's own preset")
    intensity = mb.metadata.get("intensity", {})
    if intensity.get("normalisation", settings.normalisation) != settings.normalisation or \
            intensity.get("bias_correction") != settings.bias_correction:
        theirs_text = (f"normalisation {intensity.get('normalisation', settings.normalisation)!r}, "
                       f"bias correction {intensity.get('bias_correction')!r}")
        ours_text = f"normalisation {settings.normalisation!r}, bias correction {settings.bias_correction!r}"
        if not settings.adapt_intensity:
            raise InputError(f"{settings.init_from}: bundle was trained on {theirs_text}, this run says {ours_text} "
                             "(--adapt-intensity fine-tunes it to the new intensities)")
        log.warning("--init-from %s: the bundle was trained on %s; adapting it to %s (the new bundle records "
                    "the new intensity spec)", settings.init_from, theirs_text, ours_text)
    return mb


def run_training(settings: TrainSettings) -> Path | None:
    """Train both stages (resuming if possible), write the report, export the bundle.

    Returns
    -------
    Path or None
        The bundle folder (on the main process), None elsewhere.
    """
    from ldae_bids.errors import InputError
    from ldae_bids.model import distributed
    from ldae_bids.model.export import export_bundle
    from ldae_bids.model.loop import JsonlLogger
    from ldae_bids.model.stage1 import train_autoencoder, train_decoder
    from ldae_bids.model.stage2 import prepare_latents, train_ldae

    dist = distributed.setup(settings.device)
    try:
        from ldae_bids.model import loop

        log.info("precision: %s on %s (--precision %s)", loop.set_precision(dist.device, settings.precision),
                 dist.device.type, settings.precision)
        settings.output.mkdir(parents=True, exist_ok=True)
        init = load_init(settings) if settings.init_from else None
        split = prepare_split(settings, dist.is_main, init.metadata["training"].get("split") if init else None)
        distributed.barrier(dist)
        split = json.loads((settings.output / "split.json").read_text())
        train_paths, val_paths = images_of(split, "train"), images_of(split, "validation")
        grid = mdata.grid_of(train_paths[0], settings.template)
        if tuple(grid["shape"]) != tuple(settings.model.image_shape):
            raise InputError(f"{train_paths[0]}: shape {grid['shape']} does not match the {settings.preset} "
                             f"preset grid {list(settings.model.image_shape)}")
        if dist.is_main:
            save_settings(settings)
        logger = JsonlLogger(settings.output / "logs" / "train.jsonl", dist.is_main)
        log.info("training on %d images (%d subjects), validating on %d images (%d subjects)",
                 len(train_paths), len(split["train"]), len(val_paths), len(split["validation"]))
        store = mdata.VolumeStore(train_paths, settings.model.image_shape)
        val_store = mdata.VolumeStore(val_paths, settings.model.image_shape) if val_paths else None
        on_device = mdata.place([store, val_store], dist.device)
        if on_device:
            log.info("training volumes held on %s (%.0f MB)", dist.device,
                     sum(s.nbytes() for s in (store, val_store) if s is not None) / 2**20)
        state = ckpt.read_state(settings.output)
        dropped = logger.rewind({"ae": int(state.get("ae_step", 0)), "ldae": int(state.get("ldae_step", 0)),
                                 "decoder": int(state.get("dec_step", 0))})
        if dropped:
            log.info("resuming: %d log records after the last checkpoint dropped from logs/train.jsonl "
                     "(those steps run again)", dropped)
        weights = init.pipeline if init else None
        ae = train_autoencoder(settings, dist, store, val_store, state, logger, init=weights)
        latents, val_latents, scale = prepare_latents(settings, dist, ae, store, val_store, state)
        if on_device:
            latents = latents.to(dist.device)
        if dist.is_main:
            ckpt.write_state(settings.output, state)
        train_ldae(settings, dist, store, val_store, ae, latents, scale, state, logger, init=weights)
        train_decoder(settings, dist, store, val_store, ae, latents, scale, state, logger)
        if not dist.is_main:
            return None
        state.update(stage="done")
        ckpt.write_state(settings.output, state)
        bundle = export_bundle(settings)
        try:
            from ldae_bids.model.report import write_report

            write_report(settings.output, bundle, val_paths)
        except Exception as exc:  # the report must never cost the model
            log.warning("training report failed: %s", exc)
        return bundle
    finally:
        distributed.cleanup(dist)
