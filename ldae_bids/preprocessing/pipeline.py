"""Raw T1w -> model grid: brain extraction, affine registration, one resampling, scaling."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ldae_bids.errors import InputError, LdaeError

from . import brain as _brain
from .bias import correct_bias
from .grid import Grid
from .io import load_t1w, validate_t1w
from .normalise import normalise
from .register import (DEFAULT_LEVELS, DEFAULT_STARTS, START_KEEP_STEP, START_MARGIN, TemplateBrain, alignment_qc,
                       register_batch)
from .spatial import pull, resolve_device, voxel_world

MIN_BRAIN_ML = 300.0  # a brain mask smaller than this is a failed extraction
MASK_THRESHOLD = 0.5  # on the trilinearly resampled mask
# qc["registration_ok"] is False below these (IXI: NCC 0.4-0.6, Dice 0.95-0.97 when it works).
QC_MIN_NCC = 0.25
QC_MIN_DICE = 0.90  # 0.85 passed a wrong optimum (IXI012 tilted 20 degrees: 0.86); the 134 IXI subjects: 0.931-0.971


@dataclass
class PreprocResult:
    """What preprocessing one T1w produces.

    Attributes
    ----------
    image : nibabel.Nifti1Image
        Model input on ``grid``: float32 in [0, 1], skull-stripped, background 0.
    mask_native : nibabel.Nifti1Image
        uint8 brain mask on the input's grid.
    mask_grid : nibabel.Nifti1Image
        uint8 brain mask on ``grid``.
    native_to_template : numpy.ndarray
        4x4 RAS world-to-world affine taking native points to template points.
    qc : dict
        ``ncc_to_template``, ``mask_dice_to_template``, ``brain_volume_ml``, and
        ``seconds`` per step.
    params : dict
        Method parameters and software versions, for the JSON sidecar.
    grid : Grid
        The model grid.
    image_unscaled : nibabel.Nifti1Image or None
        The same image before intensity scaling (bias-corrected intensities, float32).
    source : str
        File name of the input (or ``"<in-memory image>"``).
    """

    image: nib.Nifti1Image
    mask_native: nib.Nifti1Image
    mask_grid: nib.Nifti1Image
    native_to_template: np.ndarray
    qc: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    grid: Grid | None = None
    image_unscaled: nib.Nifti1Image | None = None
    source: str = "<in-memory image>"

    @property
    def template_to_native(self) -> np.ndarray:
        """Inverse of :attr:`native_to_template` (the pull mapping used to resample)."""
        return np.linalg.inv(self.native_to_template)


@functools.lru_cache(maxsize=4)
def _template_cached(t1w_path: str, mask_path: str, _mtimes: tuple) -> TemplateBrain:
    t1 = nib.load(t1w_path)
    mk = nib.load(mask_path)
    return TemplateBrain(t1.get_fdata(dtype=np.float32), np.asarray(mk.dataobj) > 0, np.asarray(t1.affine, float))


def load_template(template: str = "MNI152NLin2009cAsym", resolution: int = 2) -> TemplateBrain:
    """Template T1w and brain mask from TemplateFlow (``MissingInputError`` when absent)."""
    from ldae_bids.templates import get_template

    t1w = get_template(resolution=resolution, suffix="T1w", template=template)
    mask = get_template(resolution=resolution, suffix="mask", desc="brain", template=template)
    return _template_cached(str(t1w), str(mask), (t1w.stat().st_mtime, mask.stat().st_mtime))


def _name(img, fallback="<in-memory image>") -> str:
    if isinstance(img, (str, Path)):
        return str(img)
    fn = img.get_filename() if hasattr(img, "get_filename") else None
    return fn or fallback


def _as_image(img) -> nib.Nifti1Image:
    if isinstance(img, (str, Path)):
        return load_t1w(img)
    return validate_t1w(img, _name(img))


def resample_to_grid(
    data: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    template_to_native: np.ndarray,
    grid: Grid,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped image and mask on ``grid`` with one trilinear interpolation each.

    The brain is pulled as ``(I * m)`` and divided by the pulled mask, so edge voxels keep
    brain intensities instead of being darkened by the zeros outside the mask.
    """
    pts = voxel_world(grid.shape, grid.affine, device)
    w2v = torch.as_tensor(np.linalg.inv(affine) @ template_to_native, dtype=torch.float32, device=device)
    m = mask.astype(np.float32)
    vols = torch.from_numpy(np.stack([data * m, m])).to(device)[None]
    with torch.no_grad():
        out = pull(vols, pts, w2v[None])[0].cpu().numpy()
    mask_grid = out[1] > MASK_THRESHOLD
    image = np.where(mask_grid, out[0] / np.maximum(out[1], 1e-6), 0.0).astype(np.float32)
    return image, mask_grid


def _params(grid: Grid, norm_info: dict, template: TemplateBrain, levels, bias, precision: str = "fp32") -> dict:
    from importlib.metadata import version

    import ldae_bids

    return {
        "brain_extraction": {
            "tool": "deepbet",
            "version": _brain.deepbet_version(),
            "threshold": _brain.DEFAULT_THRESHOLD,
            "n_dilate": _brain.DEFAULT_DILATE,
            "precision": precision,
        },
        "bias_field_correction": bias,
        "registration": {
            "method": "ldae_bids torch affine (12 dof)",
            "metric": "global NCC over the dilated template brain mask",
            "init": "brain-mask centre of mass + isotropic volume scale",
            "levels_factor_steps_lr": [list(level) for level in levels],
            "extra_starts_axis_degrees": [list(start) for start in DEFAULT_STARTS],
            "start_margin_ncc": START_MARGIN,
            "best_start_kept_after_step": START_KEEP_STEP,
            "fixed": f"tpl-{template.name}_res-{template.resolution:02d} T1w x desc-brain_mask",
        },
        "resampling": "one trilinear interpolation native -> grid (composed affine), mask > 0.5",
        "normalisation": norm_info,
        "grid": grid.to_dict(),
        "versions": {"ldae_bids": ldae_bids.__version__, "torch": torch.__version__, "nibabel": version("nibabel")},
    }


def _register_robust(staged, tpl, dev, levels) -> list:
    """Batched registration; if the batch fails (e.g. out of memory), one by one, errors per item."""
    args = ([s[5] for s in staged], [s[4] for s in staged], [s[2].affine for s in staged])
    try:
        return register_batch(*args, tpl, dev, levels)
    except Exception:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out = []
    for data, mask, affine, item in zip(*args, staged):
        try:
            out.extend(register_batch([data], [mask], [affine], tpl, dev, levels))
        except Exception as exc:
            out.append(InputError(f"{item[1]}: registration failed ({type(exc).__name__}: {exc})"))
    return out


def preprocess_batch(
    imgs: list,
    grid: Grid,
    *,
    device="cpu",
    normalisation: str = "percentile",
    bias_correction: str | None = "n4",
    batch_size: int | None = None,
    template: TemplateBrain | None = None,
    levels=DEFAULT_LEVELS,
    precision: str = "fp32",
) -> list:
    """Preprocess several T1w images; registration runs batched (on GPU when ``device`` is).

    Parameters
    ----------
    imgs : list
        Paths or nibabel images.
    grid : Grid
        Target model grid.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, a ``torch.device``, or ``"auto"`` (CUDA when available).
    normalisation : {"percentile", "minmax"}
        See :func:`ldae_bids.preprocessing.normalise.normalise`.
    bias_correction : {"n4", None}
        N4 inside the deepbet mask before registration (skipped with a warning when
        SimpleITK is missing; ``params["bias_field_correction"]`` is then ``None``).
    batch_size : int, optional
        Subjects registered together (default 16 on CUDA, 4 on CPU; bounds memory).
    template : TemplateBrain, optional
        Fixed image; default: MNI152NLin2009cAsym res-02 from TemplateFlow.
    levels : sequence of (factor, steps, lr)
        Registration schedule.
    precision : {"fp32", "bf16"}
        Arithmetic of the brain extraction network (bf16 autocast; the registration stays fp32).

    Returns
    -------
    list
        One entry per input, in order: a :class:`PreprocResult`, or, for an input that
        failed, the exception (an :class:`~ldae_bids.errors.InputError` naming the file for
        bad inputs). Failures never abort the other items; template problems
        (``MissingInputError``) do raise, since they concern every item.
    """
    dev = resolve_device(device)
    tpl = template if template is not None else load_template(grid.template)
    bs = batch_size or (16 if dev.type == "cuda" else 4)
    results: list = [None] * len(imgs)
    for start in range(0, len(imgs), bs):
        chunk = list(range(start, min(start + bs, len(imgs))))
        staged = []
        for n in chunk:
            name = _name(imgs[n])
            try:
                t0 = time.perf_counter()
                img = _as_image(imgs[n])
                t1 = time.perf_counter()
                mask_img = _brain.brain_mask(img, dev, precision=precision)
                t2 = time.perf_counter()
                mask = np.asarray(mask_img.dataobj) > 0
                vol = float(mask.sum() * abs(np.linalg.det(img.affine[:3, :3])) / 1000.0)
                if vol < MIN_BRAIN_ML:
                    raise InputError(f"{name}: brain extraction found no brain ({vol:.0f} ml); is this a T1w head MRI?")
                data, bias = correct_bias(np.asarray(img.dataobj, dtype=np.float32), mask, img.affine, bias_correction)
                t3 = time.perf_counter()
                secs = {"load": t1 - t0, "brain_extraction": t2 - t1, "bias_correction": t3 - t2}
                staged.append((n, name, img, mask_img, mask, data, vol, secs, bias))
            except LdaeError as exc:
                results[n] = exc
            except Exception as exc:  # unexpected: keep the batch alive, report with the file name
                results[n] = InputError(f"{name}: preprocessing failed ({type(exc).__name__}: {exc})")
        if not staged:
            continue
        t0 = time.perf_counter()
        pulls = _register_robust(staged, tpl, dev, levels)
        reg_seconds = (time.perf_counter() - t0) / len(staged)
        for (n, name, img, mask_img, mask, data, vol, secs, bias), pull_m in zip(staged, pulls):
            if isinstance(pull_m, BaseException):
                results[n] = pull_m
                continue
            try:
                secs["registration"] = reg_seconds
                t0 = time.perf_counter()
                unscaled, mask_grid = resample_to_grid(data, mask, img.affine, pull_m, grid, dev)
                image, norm_info = normalise(unscaled, mask_grid, normalisation)
                t1 = time.perf_counter()
                qc = alignment_qc(data, mask, img.affine, pull_m, tpl, dev)
                secs["resample_normalise"] = t1 - t0
                secs["qc"] = time.perf_counter() - t1
                faces = {
                    "i0": mask_grid[0], "i1": mask_grid[-1], "j0": mask_grid[:, 0],
                    "j1": mask_grid[:, -1], "k0": mask_grid[:, :, 0], "k1": mask_grid[:, :, -1],
                }
                qc["mask_voxels_on_grid_faces"] = {k: int(v.sum()) for k, v in faces.items()}
                qc["registration_ok"] = bool(
                    qc["ncc_to_template"] >= QC_MIN_NCC and qc["mask_dice_to_template"] >= QC_MIN_DICE
                )
                qc.update({"brain_volume_ml": vol, "seconds": secs, "device": str(dev)})
                out = nib.Nifti1Image(image, grid.affine)
                out.set_data_dtype(np.float32)
                mg = nib.Nifti1Image(mask_grid.astype(np.uint8), grid.affine)
                mg.set_data_dtype(np.uint8)
                results[n] = PreprocResult(
                    image=out,
                    mask_native=mask_img,
                    mask_grid=mg,
                    native_to_template=np.linalg.inv(pull_m),
                    qc=qc,
                    params=_params(grid, norm_info, tpl, levels, bias, precision),
                    grid=grid,
                    image_unscaled=nib.Nifti1Image(unscaled, grid.affine),
                    source=name,
                )
            except LdaeError as exc:
                results[n] = exc
            except Exception as exc:
                results[n] = InputError(f"{name}: preprocessing failed ({type(exc).__name__}: {exc})")
    return results


def preprocess_t1w(
    img, grid: Grid, *, device="cpu", normalisation: str = "percentile", bias_correction: str | None = "n4", **kwargs
) -> PreprocResult:
    """Preprocess one T1w image (path or nibabel image) onto ``grid``.

    Same steps and keyword arguments as :func:`preprocess_batch`; raises the item's
    exception (e.g. :class:`~ldae_bids.errors.InputError`) instead of returning it.
    """
    (res,) = preprocess_batch(
        [img], grid, device=device, normalisation=normalisation, bias_correction=bias_correction, batch_size=1, **kwargs
    )
    if isinstance(res, BaseException):
        raise res
    return res
