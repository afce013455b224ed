"""Model bundles: a folder with config, safetensors weights, metadata, licence and checksums.

Layout::

    config.json         ModelConfig (constructor arguments of every net, scheduler, latent scale)
    model.safetensors   weights, keys "<net>.<param>" (float16 by default; never pickle)
    metadata.json       grid, intensity normalisation, training data and split, metrics, versions
    LICENSE, README.md  licence of the weights, model card
    checksums.json      sha256 of each file and the content hash over config + weights + metadata

:func:`load_bundle` verifies every checksum, the config keys and the weight shapes,
and raises :class:`~ldae_bids.errors.ModelError` naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldae_bids.errors import ModelError
from ldae_bids.model.config import ModelConfig, json_ready

if TYPE_CHECKING:
    from ldae_bids.model.pipeline import LdaePipeline

FORMAT = "ldae-bids-bundle"
FORMAT_VERSION = 1
HASHED = ("config.json", "model.safetensors", "metadata.json")
REQUIRED = HASHED + ("checksums.json",)
DEFAULT_BUNDLE = "ldae-compact-ixi"
NETS = ("autoencoder", "semantic_encoder", "denoiser")


@dataclass
class ModelBundle:
    """A loaded bundle: the ready pipeline and what describes it."""

    pipeline: LdaePipeline
    config: ModelConfig
    metadata: dict
    content_hash: str
    name: str
    path: Path


def default_bundle_path() -> Path:
    """Folder of the model shipped with the package (``ldae_bids/data/models/ldae-compact-ixi``)."""
    from importlib.resources import files

    return Path(str(files("ldae_bids") / "data" / "models" / DEFAULT_BUNDLE))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(file_hashes: dict[str, str]) -> str:
    """sha256 over the per-file hashes of config, weights and metadata (in that order)."""
    return hashlib.sha256("".join(file_hashes[f] for f in HASHED).encode()).hexdigest()


def write_checksums(path: Path) -> str:
    """(Re)compute ``checksums.json`` of a bundle folder; returns the content hash."""
    path = Path(path)
    files = {f: _sha256(path / f) for f in HASHED}
    digest = content_hash(files)
    (path / "checksums.json").write_text(json.dumps({"files": files, "content_hash": digest}, indent=2) + "\n")
    return digest


def _licence_text(metadata: dict) -> str:
    lic = metadata.get("licence", "")
    if "CC-BY-SA-3.0" in lic or "CC BY-SA 3.0" in lic:
        return ("The model weights in this folder are licensed under the Creative Commons\n"
                "Attribution-ShareAlike 3.0 Unported licence (CC BY-SA 3.0),\n"
                "https://creativecommons.org/licenses/by-sa/3.0/\n\n"
                "They were trained on the IXI dataset, brain-development.org/ixi-dataset, CC BY-SA 3.0.\n"
                "Any redistribution or derivative must keep this notice and the same licence.\n")
    return f"Licence of these weights: {lic or 'unspecified'}\n"


def _readme(name: str, config: ModelConfig, metadata: dict, digest: str) -> str:
    grid = metadata.get("grid", {})
    train = metadata.get("training", {})
    lines = [
        f"# {name}", "",
        "Latent diffusion autoencoder (LDAE) for T1w MRI, an ldae-bids model bundle.", "",
        f"- grid: {grid.get('shape')} at {grid.get('spacing')} mm, template {grid.get('template')}",
        f"- intensities: {metadata.get('intensity', {}).get('description', '[0, 1]')}",
        f"- latent: {list(config.latent_shape)}, scale factor {config.latent_scale:.5g}"
        + ("" if config.latent_mean is None else
           ", channel means " + " / ".join(f"{v:.4f}" for v in config.latent_mean) + " (anchor of sampling)"),
        f"- y_sem: {config.semantic_encoder.emb_dim}-d",
        f"- training data: {train.get('data', 'n/a')}",
        f"- subjects: {train.get('n_train_subjects')} training, {train.get('n_val_subjects')} validation "
        "(subject-level split in metadata.json)",
        f"- steps: autoencoder {train.get('ae_steps')}, LDAE {train.get('ldae_steps')}"
        + (f", decoder refinement {train['decoder_steps']}" if train.get("decoder_steps") else "")
        + (" (this run)" if train.get("init_from") else ""),
        *([f"- started from: {init.get('name')} (content hash {str(init.get('content_hash'))[:16]}..., autoencoder "
           f"{init.get('ae_steps')} / LDAE {init.get('ldae_steps')}"
           + (f" / decoder refinement {init['decoder_steps']}" if init.get("decoder_steps") else "") + " steps); carried: "
           f"{', '.join(init.get('carried') or ['all networks'])}"] if (init := train.get("init_from")) else []),
        f"- licence: {metadata.get('licence', 'n/a')} (see LICENSE)",
        f"- content hash (sha256 over config, weights, metadata): {digest}", "",
    ]
    bench = metadata.get("metrics", {}).get("reconstruction_benchmark")
    if bench:
        lines += [f"## Reconstruction on {bench.get('n_validation_subjects')} validation subjects", "",
                  "| method | SSIM | SSIM (brain) | MSE | MSE (brain) |", "|---|---|---|---|---|"]
        for key, v in bench.get("summary", {}).items():
            label = bench.get("labels", {}).get(key, key)
            lines.append(f"| {label} | {v['ssim']['mean']:.4f} | {v['ssim_mask']['mean']:.4f} | "
                         f"{v['mse']['mean']:.5f} | {v['mse_mask']['mean']:.5f} |")
        lines.append("")
    if metadata.get("notes"):
        lines += ["## Notes", "", str(metadata["notes"]), ""]
    lines += ["Load with `ldae_bids.model.load_bundle(path)`; everything above is in metadata.json.", ""]
    return "\n".join(lines)


def save_bundle(path: Path, pipeline, metadata: dict, name: str | None = None,
                dtype: torch.dtype = torch.float16) -> str:
    """Write ``pipeline`` and ``metadata`` as a bundle folder.

    Parameters
    ----------
    path
        Target folder (created; existing bundle files are overwritten).
    pipeline
        A :class:`~ldae_bids.model.pipeline.LdaePipeline`.
    metadata
        JSON-serialisable description (grid, normalisation, training data, split, metrics, licence...).
    name
        Bundle name (default: the folder name).
    dtype
        Storage precision of floating-point weights (float16, bfloat16 or float32).

    Returns
    -------
    str
        The content hash.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = name or path.name
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, **pipeline.config.to_dict()}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {}
    for net in NETS:
        for key, value in getattr(pipeline, net).state_dict().items():
            value = value.detach().cpu()
            keep = not value.is_floating_point() or key.endswith(("running_mean", "running_var"))  # statistics: float32
            tensors[f"{net}.{key}"] = (value if keep else value.to(dtype)).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": FORMAT})
    meta = json_ready({"name": name, **metadata, "weights_dtype": str(dtype).replace("torch.", "")})
    (path / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    digest = write_checksums(path)
    (path / "LICENSE").write_text(_licence_text(metadata))
    (path / "README.md").write_text(_readme(name, pipeline.config, metadata, digest))
    return digest


def update_metadata(path: Path, updates: dict) -> str:
    """Merge ``updates`` into the metadata of a verified bundle (e.g. benchmark metrics).

    The checksums and the content hash are recomputed; returns the new content hash.
    """
    path = Path(path)
    verify_bundle(path)
    meta = _read_json(path / "metadata.json")

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    (path / "metadata.json").write_text(json.dumps(json_ready(merge(meta, updates)), indent=2) + "\n")
    digest = write_checksums(path)
    config = ModelConfig.from_dict({k: v for k, v in _read_json(path / "config.json").items()
                                    if k not in ("format", "format_version", "name")})
    (path / "README.md").write_text(_readme(meta.get("name", path.name), config, meta, digest))
    return digest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable JSON ({exc})") from exc


def verify_bundle(path: Path) -> str:
    """Check presence and checksums of every bundle file; returns the content hash."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: model bundle folder not found")
    for f in REQUIRED:
        if not (path / f).is_file():
            raise ModelError(f"{path / f}: missing bundle file")
    sums = _read_json(path / "checksums.json")
    recorded = sums.get("files", {})
    for f in HASHED:
        if recorded.get(f) != _sha256(path / f):
            raise ModelError(f"{path / f}: sha256 does not match checksums.json (corrupted or modified)")
    digest = content_hash(recorded)
    if sums.get("content_hash") != digest:
        raise ModelError(f"{path / 'checksums.json'}: content hash does not match the file hashes")
    return digest


def load_bundle(path: Path | None = None, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and verify a bundle.

    Parameters
    ----------
    path
        Bundle folder (default: :func:`default_bundle_path`).
    device
        Where to put the networks.

    Returns
    -------
    ModelBundle
        ``pipeline`` (eval mode, float32), ``config``, ``metadata``, ``content_hash``, ``name``, ``path``.

    Raises
    ------
    ModelError
        Missing file, checksum mismatch, unknown config key, wrong weight names or shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ldae_bids.model.pipeline import LdaePipeline

    path = Path(path) if path is not None else default_bundle_path()
    digest = verify_bundle(path)
    raw = _read_json(path / "config.json")
    if raw.pop("format", None) != FORMAT:
        raise ModelError(f"{path / 'config.json'}: not an {FORMAT} config")
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ModelError(f"{path / 'config.json'}: format_version {version} unsupported (expected {FORMAT_VERSION})")
    name = raw.pop("name", path.name)
    config = ModelConfig.from_dict(raw, str(path / "config.json"))
    metadata = _read_json(path / "metadata.json")
    grid_shape = metadata.get("grid", {}).get("shape")
    if grid_shape is not None and tuple(grid_shape) != tuple(config.image_shape):
        raise ModelError(f"{path / 'metadata.json'}: grid shape {grid_shape} != config image_shape "
                         f"{list(config.image_shape)}")
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path / 'model.safetensors'}: unreadable weights ({exc})") from exc
    pipeline = LdaePipeline(config)
    for net in NETS:
        module = getattr(pipeline, net)
        expected = module.state_dict()
        prefix = f"{net}."
        given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ModelError(f"{path / 'model.safetensors'}: {net} weights do not fit config.json ({what})")
        for key, value in given.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ModelError(f"{path / 'model.safetensors'}: {net}.{key} has shape {list(value.shape)}, "
                                 f"config.json implies {list(expected[key].shape)}")
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in given.items()}, strict=True)
    pipeline = pipeline.to(device).eval()
    return ModelBundle(pipeline=pipeline, config=config, metadata=metadata, content_hash=digest,
                       name=name, path=path)
