"""What a compute node needs, checked without the network.

``ldae-bids-tools self-check`` (the container's ``%test``) runs :func:`run_checks`:
the default model bundle, the TemplateFlow files the app reads, deepbet's weights,
the installed stages and the torch device. Each check says what is missing and how
to fix it; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

OK, WARN, MISSING, SKIPPED = "ok", "warn", "missing", "skipped"

#: TemplateFlow files the app uses: (template, resolution, suffix, desc).
TEMPLATE_FILES = (
    ("MNI152NLin2009cAsym", 2, "T1w", None),
    ("MNI152NLin2009cAsym", 2, "mask", "brain"),
)
DEEPBET_WEIGHTS = ("model.pt", "bbox_model.pt")


@dataclass(frozen=True)
class Check:
    """One line of the self-check table."""

    name: str
    status: str
    detail: str


def run_checks(model: Path | None = None, check_model: bool = True) -> list[Check]:
    """Run every check.

    Parameters
    ----------
    model : Path, optional
        A bundle folder to check instead of the default one shipped with the package.
    check_model : bool
        ``False`` skips the model bundle (an image built before the weights exist).

    Returns
    -------
    list of Check
        ``missing`` entries make the self-check fail (exit 66).
    """
    checks = [_version()]
    checks += check_bundle(model) if check_model else [Check("model bundle", SKIPPED, "--no-model given")]
    checks += check_templateflow()
    checks += check_deepbet()
    checks += check_stages()
    checks += check_torch()
    checks += check_validator()
    return checks


def _version() -> Check:
    import platform

    from ldae_bids import __version__

    where = os.environ.get("LDAE_BIDS_CONTAINER") or "no container"
    return Check("ldae-bids", OK, f"{__version__}, Python {platform.python_version()}, {where}")


# ------------------------------------------------------------------------------ model
def default_model_path() -> Path:
    from ldae_bids.runtime import default_model_path as path

    return path()


def check_bundle(model: Path | None = None) -> list[Check]:
    """The model bundle: folder, readable metadata, and (when the loader exists) checksums and weights."""
    path = Path(model) if model is not None else default_model_path()
    which = "model bundle" if model is not None else "default model bundle"
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        hint = ("pass an existing bundle folder" if model is not None else
                "the package was installed without its weights: put the bundle in ldae_bids/data/models/"
                "ldae-compact-ixi before 'pip install .' (containers/install.sh --model-from DIR)")
        return [Check(which, MISSING, f"{meta_file} not found; {hint}")]
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        return [Check(which, MISSING, f"{meta_file}: unreadable ({exc})")]
    name = meta.get("name", path.name)
    try:
        from ldae_bids.model.bundle import load_bundle
    except ImportError:
        return [Check(which, OK, f"{name} at {path} (metadata only: ldae_bids.model.bundle not available)")]
    try:
        bundle = load_bundle(path, device="cpu")
    except Exception as exc:  # ModelError names the file; anything else is a broken bundle too
        msg = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return [Check(which, MISSING, f"{name} at {path}: {msg}")]
    recorded = meta.get("content_hash") or meta.get("hash")
    if recorded and recorded != bundle.content_hash:
        return [Check(which, MISSING, f"{name}: metadata hash {recorded[:12]} != verified {bundle.content_hash[:12]}")]
    return [Check(which, OK, f"{bundle.name}, sha256 {bundle.content_hash[:16]}..., checksums and weights verified")]


# ------------------------------------------------------------------------ templateflow
def templateflow_home() -> Path:
    try:
        from ldae_bids.templates import templateflow_home as home

        return home()
    except ImportError:  # pragma: no cover - templates.py absent
        env = os.environ.get("TEMPLATEFLOW_HOME")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "templateflow"


def template_name(template: str, resolution: int, suffix: str, desc: str | None) -> str:
    """TemplateFlow file name, e.g. ``tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz``."""
    try:
        from ldae_bids.templates import expected_name

        return expected_name(template, resolution, suffix, desc)
    except ImportError:  # pragma: no cover
        parts = [f"tpl-{template}", f"res-{int(resolution):02d}"] + ([f"desc-{desc}"] if desc else [])
        return "_".join(parts) + f"_{suffix}.nii.gz"


def check_templateflow() -> list[Check]:
    """The template files under ``TEMPLATEFLOW_HOME`` (complete, readable NIfTI headers)."""
    home = templateflow_home()
    env = os.environ.get("TEMPLATEFLOW_HOME")
    out = []
    for template, res, suffix, desc in TEMPLATE_FILES:
        name = template_name(template, res, suffix, desc)
        label = f"template {suffix}" + (f" desc-{desc}" if desc else "") + f" res-{res:02d}"
        path = home / f"tpl-{template}" / name
        if not path.is_file() or path.stat().st_size == 0:
            where = (f"TEMPLATEFLOW_HOME={env}" if env else
                     f"TemplateFlow's default home {home} (TEMPLATEFLOW_HOME unset)")
            out.append(Check(label, MISSING,
                             f"{name} not in {where}; bake it in (containers/install.sh --templateflow-from DIR, "
                             "or let install.sh fetch it at build time)"))
            continue
        try:
            import nibabel as nib

            shape = nib.load(path).shape
        except Exception as exc:
            out.append(Check(label, MISSING, f"{path}: unreadable NIfTI ({exc})"))
            continue
        out.append(Check(label, OK, f"{path} {tuple(shape)}"))
    if os.environ.get("LDAE_BIDS_CONTAINER") == "apptainer" and env:
        home_dir = os.environ.get("HOME")
        if home_dir and Path(env).resolve().is_relative_to(Path(home_dir).resolve()):
            out.append(Check("TEMPLATEFLOW_HOME", WARN, f"{env} is under $HOME, which Apptainer mounts from "
                             "the host: the baked templates are hidden"))
    return out


# ----------------------------------------------------------------------------- deepbet
def check_deepbet() -> list[Check]:
    """deepbet importable and its two TorchScript weights present (they ship in its wheel)."""
    try:
        from deepbet.utils import DATA_PATH
    except Exception as exc:
        return [Check("deepbet", MISSING, f"not importable ({type(exc).__name__}: {exc}); pip install deepbet")]
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("deepbet")
    except PackageNotFoundError:  # pragma: no cover
        ver = "?"
    folder = Path(DATA_PATH) / "models"
    absent = [w for w in DEEPBET_WEIGHTS if not (folder / w).is_file() or (folder / w).stat().st_size == 0]
    if absent:
        return [Check("deepbet weights", MISSING, f"deepbet {ver}: {', '.join(absent)} not in {folder} "
                      "(reinstall the deepbet wheel)")]
    return [Check("deepbet weights", OK, f"deepbet {ver}: {', '.join(DEEPBET_WEIGHTS)} in {folder}")]


# ------------------------------------------------------------------------------ stages
def check_stages() -> list[Check]:
    """Installed stage plugins; a broken one is a warning (the app leaves it out)."""
    from ldae_bids.plugins.registry import Registry

    infos = Registry().info()
    broken = [i for i in infos if i.error]
    good = [i.name for i in infos if not i.error]
    out = [Check("stages", OK if good else MISSING, ", ".join(good) or "no stage installed")]
    for info in broken:
        out.append(Check(f"stage {info.name}", WARN, info.error or "broken"))
    return out


# ------------------------------------------------------------------------------- torch
def check_torch() -> list[Check]:
    """torch version and build, and the device the app would pick."""
    try:
        import torch
    except Exception as exc:
        return [Check("torch", MISSING, f"not importable ({type(exc).__name__}: {exc})")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    out = [Check("torch", OK, f"{torch.__version__} ({build}), {torch.get_num_threads()} CPU threads")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out.append(Check("device", OK, f"cuda: {len(names)} GPU(s): {', '.join(names)}"))
    elif torch.version.cuda:
        hint = " (add --nv to apptainer run)" if os.environ.get("LDAE_BIDS_CONTAINER") == "apptainer" else (
            " (add --gpus all to docker run)" if os.environ.get("LDAE_BIDS_CONTAINER") == "docker" else "")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        extra = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        out.append(Check("device", WARN, f"cpu: no CUDA GPU visible{hint}{extra}"))
    else:
        out.append(Check("device", OK, "cpu"))
    from ldae_bids.device import cpu_has_native_bf16, resolve_memory_format, resolve_precision

    native = cpu_has_native_bf16()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = f"{resolve_precision(dev, 'auto')}{' on the GPU' if dev.type == 'cuda' else ''}, " \
           f"{resolve_memory_format(dev, 'auto').replace('_', '-')} weights"
    out.append(Check("precision", OK, f"--precision auto uses {auto}; this CPU "
                     f"{'computes bf16 natively' if native else 'has no native bf16 (emulated bf16 would be slow)'}"))
    return out


def check_validator() -> list[Check]:
    import shutil

    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe:
        return [Check("bids-validator", OK, exe)]
    return [Check("bids-validator", WARN, "not found: only basic BIDS checks (pip install bids-validator-deno)")]


def exit_code(checks: list[Check]) -> int:
    """0 when nothing is missing, else 66 (missing input, BIDS execution spec)."""
    from ldae_bids.errors import ExitCode

    return int(ExitCode.MISSING_INPUT if any(c.status == MISSING for c in checks) else ExitCode.OK)
