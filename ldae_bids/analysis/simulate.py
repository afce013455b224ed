"""Simulated longitudinal subjects: one real T1w made into sessions with known, smooth atrophy.

Real longitudinal data is not at hand, so each session is the baseline scan resampled through a
smooth backward deformation ``out(x) = in(x + u_t(x))`` (:func:`scipy.ndimage.map_coordinates`) with

``u_t = a_v(t) * U_v + a_b(t) * U_b``  (millimetres)

* ``U_v = grad(G * V) / max|grad(G * V)|``: ``V`` the ventricle mask, ``G`` a Gaussian (sigma 4 mm).
  The gradient points into the ventricles, so sampling from there makes them **grow**; the field fades
  within a centimetre or so of the ventricle walls.
* ``U_b = -w * grad(G * B) / max|grad(G * B)|``: ``B`` the parenchyma plus ventricles (intracranial
  volume minus extra-ventricular CSF), ``w`` a taper that is 1 inside the intracranial mask and 0 just
  outside it, so the skull and scalp stay put. The field points out of the brain at its outer surface,
  sulcal banks included, so the **brain shrinks away from the skull** (sulci widen); it decays inwards,
  so the cortex moves more at its pial side than at its white side (**cortical thinning**).

The amplitudes ``a_v(t), a_b(t)`` are solved per session (a few Newton steps on the 2x2 system) so that
the ventricle volume follows ``V0 * (1 + ventricle_growth * years)`` and the parenchyma volume
``B0 * (1 - brain_shrink * years)`` (defaults 10 %/year and 1 %/year: Alzheimer-like rates, faster than
healthy ageing, so a 2 mm model can see the change). Volumes are measured on the warped label masks
with linear interpolation (partial volume): that is the ground truth written beside the data
(``derivatives/simulation/truth.tsv``, with the partial-volume ventricle map of each session), together
with the amplitudes and the smallest Jacobian determinant of the deformation (> 0: no folding). The
label map is also warped (nearest neighbour, ``derivatives/dlmuse``), but hard 2 mm labels only change
where the shift passes half a voxel, so their volumes lag the truth: use them for masks, not volumes.

Ventricle labels (DLMUSE uses the MUSE label set)
--------------------------------------------------
51 and 52 are the right and left lateral ventricles, 49 and 50 the inferior lateral ventricles,
4 the third and 11 the fourth ventricle; 1 is extra-ventricular CSF. Decided on the IXI data: 51/52
are the largest dark labels inside the brain (about 6-10 mL each, T1w intensity about 0.6 of the brain
mean, centroids about 15 mm either side of the midline above the thalami, 51 on the right in world
coordinates); 4 is small and on the midline, 11 inferior-posterior near the brainstem; their volumes
across the 130 subjects correlate with age (r 0.49-0.55 for 51, 52, 4), as ventricles do; and the sum
4 + 11 + 49 + 50 + 51 + 52 equals the MUSE composite 509 ("ventricles") in ``roi_volumes.tsv`` for every
subject. Label 1 is the darkest large label, half of it on the intracranial boundary, and
702 - 701 (intracranial minus total brain) matches its volume. The deformed ventricle set is all of
:data:`VENTRICLE_LABELS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ldae_bids.analysis.longitudinal import DAYS_PER_MONTH, format_session_label
from ldae_bids.errors import InputError, UsageError

LATERAL_VENTRICLE_LABELS = (51, 52)  # right, left
INFERIOR_LATERAL_VENTRICLE_LABELS = (49, 50)  # right, left
THIRD_VENTRICLE_LABEL = 4
FOURTH_VENTRICLE_LABEL = 11
VENTRICLE_LABELS = (4, 11, 49, 50, 51, 52)  # = MUSE composite ROI 509
CSF_LABELS = (1,)  # extra-ventricular CSF

DEFAULT_MONTHS = (0.0, 6.0, 12.0, 24.0, 36.0)


@dataclass(frozen=True)
class AtrophySettings:
    """Parameters of the simulated change (see the module docstring)."""

    ventricle_growth: float = 0.10  # fraction of baseline ventricle volume per year
    brain_shrink: float = 0.01  # fraction of baseline parenchyma volume per year
    sigma_mm: float = 4.0  # smoothness of the fields
    noise: float = 0.0  # Rician noise sd, as a fraction of the brain's 99th intensity percentile
    ventricle_labels: tuple[int, ...] = VENTRICLE_LABELS
    csf_labels: tuple[int, ...] = CSF_LABELS
    interpolation_order: int = 3  # image resampling (spline order); labels use nearest neighbour


@dataclass
class SimulatedSession:
    label: str
    months: float
    t1w: np.ndarray  # float32
    dseg: np.ndarray  # same dtype as the input labels (nearest neighbour: misses sub-voxel change)
    truth: dict[str, float]
    ventricles_probseg: np.ndarray | None = None  # partial-volume ventricle mask, float32


@dataclass
class SimulatedSubject:
    participant_id: str  # without "sub-"
    sessions: list[SimulatedSession]
    affine: np.ndarray
    baseline_age: float | None = None
    sex: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Label inspection (how the ventricle labels were identified)
# ----------------------------------------------------------------------------------------------
def label_stats(t1w: np.ndarray, dseg: np.ndarray, affine: np.ndarray):
    """Per label: volume (mL), mean intensity relative to the brain mean, world centroid (mm)."""
    import pandas as pd

    vox = float(abs(np.linalg.det(affine[:3, :3])))
    brain_mean = float(t1w[dseg > 0].mean())
    ijk = np.indices(dseg.shape).reshape(3, -1).T
    flat = dseg.ravel()
    rows = []
    for lab in np.unique(flat[flat > 0]):
        sel = flat == lab
        c = affine[:3, :3] @ ijk[sel].mean(axis=0) + affine[:3, 3]
        rows.append({"label": int(lab), "volume_ml": sel.sum() * vox / 1000.0,
                     "rel_intensity": float(t1w.ravel()[sel].mean()) / brain_mean,
                     "x": c[0], "y": c[1], "z": c[2]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Fields and warping
# ----------------------------------------------------------------------------------------------
@dataclass
class _Fields:
    unit_v: np.ndarray  # (3, *shape) voxel units per mm of amplitude
    unit_b: np.ndarray
    vent: np.ndarray  # float32 masks
    paren: np.ndarray
    vent_box: tuple[slice, ...]
    voxel_ml: float


def _unit_gradient(mask: np.ndarray, zooms: Sequence[float], sigma_mm: float) -> np.ndarray:
    from scipy import ndimage as ndi

    sm = ndi.gaussian_filter(mask.astype(np.float32), [sigma_mm / z for z in zooms])
    grad = np.stack(np.gradient(sm, *zooms))  # per mm
    peak = float(np.sqrt((grad**2).sum(axis=0)).max())
    if peak == 0:
        raise InputError("simulation: empty mask, no field")
    return (grad / peak).astype(np.float32)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _fields(dseg: np.ndarray, zooms: Sequence[float], s: AtrophySettings) -> _Fields:
    from scipy import ndimage as ndi

    icv = dseg > 0
    vent = np.isin(dseg, s.ventricle_labels)
    if not vent.any():
        raise InputError(f"simulation: no ventricle labels {s.ventricle_labels} in the label map")
    brain = icv & ~np.isin(dseg, s.csf_labels)  # parenchyma + ventricles
    paren = brain & ~vent
    zooms = [float(z) for z in zooms]
    unit_v = _unit_gradient(vent, zooms, s.sigma_mm)
    taper = ndi.gaussian_filter(ndi.binary_erosion(icv, iterations=1).astype(np.float32), 1.0)
    unit_b = -_unit_gradient(brain, zooms, s.sigma_mm) * taper
    zz = np.asarray(zooms, dtype=np.float32).reshape(3, 1, 1, 1)
    margin = int(math.ceil(4 * s.sigma_mm / min(zooms))) + 2
    return _Fields(unit_v / zz, unit_b / zz, vent.astype(np.float32), paren.astype(np.float32),
                   _box(vent, margin), float(np.prod(zooms)) / 1000.0)


def _coords(disp: np.ndarray, box: tuple[slice, ...] | None = None) -> np.ndarray:
    shape = disp.shape[1:]
    grid = np.indices(shape, dtype=np.float32)
    coords = grid + disp
    if box is not None:
        coords = coords[(slice(None), *box)]
    return coords


def _warp(volume: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.map_coordinates(volume, coords, order=order, mode="nearest", prefilter=order > 1)


def _volumes(f: _Fields, a_v: float, a_b: float) -> tuple[float, float]:
    disp = a_v * f.unit_v + a_b * f.unit_b
    vent = _warp(f.vent, _coords(disp, f.vent_box), 1).sum() * f.voxel_ml
    paren = _warp(f.paren, _coords(disp), 1).sum() * f.voxel_ml
    return float(vent), float(paren)


def min_jacobian(disp_vox: np.ndarray) -> float:
    """Smallest determinant of the Jacobian of ``x -> x + disp`` (voxel units)."""
    g = np.stack([np.stack(np.gradient(disp_vox[i]), axis=0) for i in range(3)])  # (3, 3, ...)
    jac = g + np.eye(3, dtype=g.dtype).reshape(3, 3, 1, 1, 1)
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return float(det.min())


def _solve(f: _Fields, target: tuple[float, float], start: tuple[float, float], jac: np.ndarray,
           tol: float = 1e-3, max_iter: int = 8) -> tuple[float, float, tuple[float, float]]:
    a = np.asarray(start, dtype=float)
    cur = np.asarray(_volumes(f, *a))
    tgt = np.asarray(target)
    for _ in range(max_iter):
        if np.all(np.abs(cur - tgt) <= tol * np.abs(tgt)):
            break
        a = a + np.linalg.solve(jac, tgt - cur)
        cur = np.asarray(_volumes(f, *a))
    return float(a[0]), float(a[1]), (float(cur[0]), float(cur[1]))


def simulate_sessions(
    t1w: np.ndarray,
    dseg: np.ndarray,
    zooms: Sequence[float],
    months: Sequence[float] = DEFAULT_MONTHS,
    settings: AtrophySettings = AtrophySettings(),
    seed: int = 0,
    label_template: str = "M{months:02d}",
) -> list[SimulatedSession]:
    """Sessions at ``months`` (after the baseline scan ``t1w``) with growing, smooth atrophy.

    Parameters
    ----------
    t1w : array (X, Y, Z)
        Baseline image; returned unchanged (as float32) at month 0 apart from noise.
    dseg : integer array, same shape
        Label map on the same grid (MUSE labels: see :data:`VENTRICLE_LABELS`).
    zooms : 3 floats
        Voxel size in mm.
    months : sequence of float >= 0
        Session times after baseline.
    settings : AtrophySettings
    seed : int
        Seeds the noise.

    Returns
    -------
    list of SimulatedSession
        In time order; ``truth`` holds volumes in mm3 (``ventricles``, ``lateral_ventricles``,
        ``parenchyma`` from partial-volume warped masks; ``*_dseg`` from the warped label map), the
        targets, the amplitudes in mm and ``min_jacobian``.
    """
    t1w = np.asarray(t1w, dtype=np.float32)
    dseg = np.asarray(dseg)
    if t1w.shape != dseg.shape or t1w.ndim != 3:
        raise InputError(f"simulation: image {t1w.shape} and labels {dseg.shape} must be the same 3-D grid")
    months = sorted(float(m) for m in months)
    if months[0] < 0:
        raise UsageError("simulation: session months must be >= 0 (after the baseline scan)")
    if settings.brain_shrink >= 1 or settings.ventricle_growth <= -1:
        raise UsageError("simulation: rates out of range")
    f = _fields(dseg, zooms, settings)
    v0, b0 = _volumes(f, 0.0, 0.0)
    # Jacobian of (ventricle, parenchyma) volume w.r.t. the amplitudes, by finite differences.
    h = 0.25
    jv = (np.asarray(_volumes(f, h, 0.0)) - (v0, b0)) / h
    jb = (np.asarray(_volumes(f, 0.0, h)) - (v0, b0)) / h
    jac = np.stack([jv, jb], axis=1)
    rng = np.random.default_rng(seed)
    brain_p99 = float(np.percentile(t1w[dseg > 0], 99))
    lo_val, hi_val = float(t1w.min()), float(t1w.max())
    lat = np.isin(dseg, LATERAL_VENTRICLE_LABELS + INFERIOR_LATERAL_VENTRICLE_LABELS).astype(np.float32)
    out, a = [], (0.0, 0.0)
    for m in months:
        years = m / 12.0
        target = (v0 * (1 + settings.ventricle_growth * years), b0 * (1 - settings.brain_shrink * years))
        if m == 0:
            a, achieved = (0.0, 0.0), (v0, b0)
        else:
            a_v, a_b, achieved = _solve(f, target, a, jac)
            a = (a_v, a_b)
        disp = a[0] * f.unit_v + a[1] * f.unit_b
        if m == 0:
            img, seg, vent_pv = t1w.copy(), dseg.copy(), f.vent.copy()
            mj = 1.0
            lat_ml = float(lat.sum()) * f.voxel_ml
        else:
            coords = _coords(disp)
            img = _warp(t1w, coords, settings.interpolation_order)
            np.clip(img, lo_val, hi_val, out=img)
            seg = _warp(dseg, coords, 0).astype(dseg.dtype)
            vent_pv = _warp(f.vent, coords, 1)
            mj = min_jacobian(disp)
            lat_ml = float(_warp(lat, coords, 1).sum()) * f.voxel_ml
            del coords
        if settings.noise > 0:
            sd = settings.noise * brain_p99
            img = np.sqrt((img + rng.normal(0, sd, img.shape)) ** 2 + rng.normal(0, sd, img.shape) ** 2)
        img = img.astype(np.float32)
        vox_ml = f.voxel_ml
        not_paren = settings.ventricle_labels + settings.csf_labels
        truth = {
            "months": m,
            "ventricles_mm3": achieved[0] * 1000,
            "lateral_ventricles_mm3": lat_ml * 1000,
            "parenchyma_mm3": achieved[1] * 1000,
            "ventricles_target_mm3": target[0] * 1000,
            "parenchyma_target_mm3": target[1] * 1000,
            "ventricles_dseg_mm3": float(np.isin(seg, settings.ventricle_labels).sum()) * vox_ml * 1000,
            "parenchyma_dseg_mm3": float(((seg > 0) & ~np.isin(seg, not_paren)).sum()) * vox_ml * 1000,
            "amplitude_ventricles_mm": a[0],
            "amplitude_brain_mm": a[1],
            "min_jacobian": mj,
        }
        if mj <= 0:
            raise UsageError(f"simulation: the deformation at {m:g} months folds (Jacobian {mj:.2f}); lower the rates")
        out.append(SimulatedSession(format_session_label(m, label_template), m, img, seg, truth,
                                    vent_pv.astype(np.float32)))
    return out


# ----------------------------------------------------------------------------------------------
# A synthetic head for tests
# ----------------------------------------------------------------------------------------------
def make_phantom(shape: tuple[int, int, int] = (48, 56, 48), voxel_mm: float = 2.0, seed: int = 0):
    """A crude head: scalp, skull, CSF (label 1), grey (label 100) and white (label 200) matter,
    lateral ventricles (51 right, 52 left) and a third ventricle (4). Returns ``(t1w, dseg, affine)``.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.asarray(shape) - 1) / 2.0
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (ijk * voxel_mm + affine[:3, 3]).T.reshape(3, *shape)
    x, y, z = xyz
    ext = np.asarray(shape) * voxel_mm / 2.0

    def ell(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    head = ell(0, 0, 0, *(0.92 * ext))
    skull_out = ell(0, 0, 0, *(0.85 * ext))
    icv = ell(0, 0, 0, *(0.78 * ext))
    brain = ell(0, 0, 0, *(0.72 * ext))
    wm = ell(0, 0, 0, *(0.58 * ext))
    dseg = np.zeros(shape, dtype=np.uint8)
    dseg[icv] = 1
    dseg[brain] = 100
    dseg[wm] = 200
    ry = 0.35 * ext[1]
    dseg[ell(0.2 * ext[0], 0, 0.1 * ext[2], 0.08 * ext[0], ry, 0.12 * ext[2])] = 51
    dseg[ell(-0.2 * ext[0], 0, 0.1 * ext[2], 0.08 * ext[0], ry, 0.12 * ext[2])] = 52
    dseg[ell(0, 0, -0.05 * ext[2], 0.04 * ext[0], 0.15 * ext[1], 0.08 * ext[2])] = 4
    t1 = np.zeros(shape, dtype=np.float32)
    t1[head] = 0.55
    t1[skull_out] = 0.05
    t1[icv] = 0.15
    t1[dseg == 100] = 0.6
    t1[dseg == 200] = 0.85
    t1[np.isin(dseg, (4, 51, 52))] = 0.15
    t1 = ndi.gaussian_filter(t1, 0.6) + rng.normal(0, 0.01, shape).astype(np.float32)
    return np.clip(t1, 0, None).astype(np.float32) * 1000.0, dseg, affine


# ----------------------------------------------------------------------------------------------
# Writing a BIDS dataset
# ----------------------------------------------------------------------------------------------
def _bids_name(sub: str, ses: str | None, suffix: str, ext: str, desc: str | None = None,
               label: str | None = None) -> str:
    parts = ([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"label-{label}"] if label else [])
             + ([f"desc-{desc}"] if desc else []) + [suffix])
    return "_".join(parts) + ext


def _write_tsv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    from ldae_bids.bids.io import atomic_write_text

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if isinstance(v, float):
            return f"{v:.6g}" if abs(v) < 1e6 else f"{v:.1f}"
        return str(v)

    lines = ["\t".join(columns)] + ["\t".join(fmt(r.get(c)) for c in columns) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_subject(out_dir: str | Path, subject: SimulatedSubject, baseline_date: datetime,
                  header=None) -> list[dict[str, Any]]:
    """Write one subject's sessions, sessions.tsv and warped label maps; returns truth rows."""
    import nibabel as nib

    from ldae_bids.bids.io import atomic_write, atomic_write_json

    out = Path(out_dir)
    sub = subject.participant_id
    ses_rows, truth_rows = [], []
    for s in subject.sessions:
        anat = out / f"sub-{sub}" / f"ses-{s.label}" / "anat"
        hdr = header.copy() if header is not None else None
        img = nib.Nifti1Image(s.t1w.astype(np.float32), subject.affine, hdr)
        img.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        img.header.set_xyzt_units("mm", "sec")
        t1_path = anat / _bids_name(sub, s.label, "T1w", ".nii.gz")
        atomic_write(t1_path, lambda p, img=img: nib.save(img, p))
        atomic_write_json(t1_path.with_name(t1_path.name.replace(".nii.gz", ".json")), {
            "SimulatedAtrophy": True,
            "MonthsFromBaseline": s.months,
            "Sources": [subject.source] if subject.source else [],
        })
        seg_img = nib.Nifti1Image(s.dseg, subject.affine)
        seg_img.set_data_dtype(s.dseg.dtype)
        seg_path = (out / "derivatives" / "dlmuse" / f"sub-{sub}" / f"ses-{s.label}" / "anat"
                    / _bids_name(sub, s.label, "dseg", ".nii.gz", desc="dlmuse"))
        atomic_write(seg_path, lambda p, im=seg_img: nib.save(im, p))
        if s.ventricles_probseg is not None:
            pv_img = nib.Nifti1Image(s.ventricles_probseg.astype(np.float32), subject.affine)
            pv_img.set_data_dtype(np.float32)
            pv_path = (out / "derivatives" / "simulation" / f"sub-{sub}" / f"ses-{s.label}" / "anat"
                       / _bids_name(sub, s.label, "probseg", ".nii.gz", label="ventricles"))
            atomic_write(pv_path, lambda p, im=pv_img: nib.save(im, p))
        when = baseline_date + timedelta(days=s.months * DAYS_PER_MONTH)
        age = None if subject.baseline_age is None else round(subject.baseline_age + s.months / 12.0, 3)
        ses_rows.append({"session_id": f"ses-{s.label}", "acq_time": when.strftime("%Y-%m-%dT%H:%M:%S"), "age": age})
        truth_rows.append({"participant_id": f"sub-{sub}", "session_id": f"ses-{s.label}", **s.truth})
    _write_tsv(out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", ses_rows, ["session_id", "acq_time", "age"])
    return truth_rows


TRUTH_COLUMNS = (
    "participant_id", "session_id", "months", "ventricles_mm3", "lateral_ventricles_mm3", "parenchyma_mm3",
    "ventricles_target_mm3", "parenchyma_target_mm3", "ventricles_dseg_mm3", "parenchyma_dseg_mm3",
    "amplitude_ventricles_mm", "amplitude_brain_mm", "min_jacobian",
)

TRUTH_DESCRIPTIONS = {
    "months": "session time after the baseline scan (months of 365.2425/12 days)",
    "ventricles_mm3": "volume of ventricle labels 4, 11, 49, 50, 51, 52 warped with linear interpolation "
                      "(partial volume)",
    "lateral_ventricles_mm3": "as ventricles_mm3, labels 49-52 only",
    "parenchyma_mm3": "intracranial labels minus ventricles and extra-ventricular CSF (label 1), partial volume",
    "ventricles_target_mm3": "baseline ventricle volume x (1 + ventricle_growth x years)",
    "parenchyma_target_mm3": "baseline parenchyma volume x (1 - brain_shrink x years)",
    "ventricles_dseg_mm3": "ventricle voxel count of the nearest-neighbour-warped label map x voxel volume "
                           "(hard labels change only where the shift exceeds half a voxel: prefer ventricles_mm3)",
    "parenchyma_dseg_mm3": "parenchyma voxel count of the nearest-neighbour-warped label map x voxel volume "
                           "(coarse, as ventricles_dseg_mm3)",
    "amplitude_ventricles_mm": "peak displacement of the ventricle field (mm)",
    "amplitude_brain_mm": "peak displacement of the brain-surface field (mm)",
    "min_jacobian": "smallest Jacobian determinant of the deformation (> 0: no folding)",
}


def write_dataset(out_dir: str | Path, subjects_rows: list[dict[str, Any]], truth_rows: list[dict[str, Any]],
                  settings: AtrophySettings, *, name: str, source: dict[str, Any] | None = None,
                  license: str | None = None, acknowledgements: str | None = None, seed: int = 0) -> None:
    """Top-level files: dataset_description.json, participants.tsv/json, README, truth table."""
    from ldae_bids import __version__
    from ldae_bids.bids.io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()}
    desc: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "Authors": ["ldae-bids developers (simulation)"],
        "GeneratedBy": [{
            "Name": "ldae-bids simulate_longitudinal",
            "Version": __version__,
            "Description": "baseline T1w resampled through smooth deformations: ventricle growth and brain "
                           f"shrinkage growing with time; parameters {json.dumps(params)}, seed {seed}",
        }],
    }
    if license:
        desc["License"] = license
    if acknowledgements:
        desc["Acknowledgements"] = acknowledgements
    if source:
        desc["SourceDatasets"] = [source]
    atomic_write_json(out / "dataset_description.json", desc)
    _write_tsv(out / "participants.tsv", subjects_rows, ["participant_id", "age", "sex", "source_participant"])
    atomic_write_json(out / "sessions.json", {  # inherited by every sub-<label>_sessions.tsv
        "acq_time": {"Description": "simulated acquisition time: baseline date + months x 365.2425/12 days"},
        "age": {"Description": "age at the session", "Units": "year"},
    })
    atomic_write_json(out / "participants.json", {
        "age": {"Description": "age at the baseline session", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "source_participant": {"Description": "participant whose scan is the baseline session"},
    })
    atomic_write_text(out / "README", (
        f"{name}\n\nSimulated longitudinal T1w data made by ldae-bids (benchmarks/simulate_longitudinal.py).\n"
        "Each subject's sessions are its one real scan deformed with known ventricle enlargement and brain\n"
        "shrinkage that grow with time. Ground truth per session: derivatives/simulation/truth.tsv.\n"
        "Warped label maps (nearest neighbour): derivatives/dlmuse/; partial-volume ventricle maps:\n"
        "derivatives/simulation/. Not real follow-up scans: use for method checks only.\n"
    ))
    for deriv, dname in (("simulation", "ground truth of the simulated change"), ("dlmuse", "DLMUSE labels, warped")):
        atomic_write_json(out / "derivatives" / deriv / "dataset_description.json", {
            "Name": dname, "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "ldae-bids simulate_longitudinal", "Version": __version__}],
        })
    truth_path = out / "derivatives" / "simulation" / "truth.tsv"
    _write_tsv(truth_path, truth_rows, TRUTH_COLUMNS)
    atomic_write_json(truth_path.with_suffix(".json"), {
        **{k: {"Description": v} for k, v in TRUTH_DESCRIPTIONS.items()},
        "SimulationParameters": params,
    })


def simulate_subject_from_arrays(participant_id: str, t1w: np.ndarray, dseg: np.ndarray, affine: np.ndarray,
                                 months: Sequence[float] = DEFAULT_MONTHS,
                                 settings: AtrophySettings = AtrophySettings(), seed: int = 0,
                                 baseline_age: float | None = None, sex: str | None = None,
                                 source: str = "") -> SimulatedSubject:
    """:func:`simulate_sessions` wrapped into a :class:`SimulatedSubject`."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    sessions = simulate_sessions(t1w, dseg, zooms, months, settings, seed)
    return SimulatedSubject(participant_id, sessions, np.asarray(affine), baseline_age, sex, source)


def simulate_phantom_dataset(out_dir: str | Path, n_subjects: int = 2, months: Sequence[float] = DEFAULT_MONTHS,
                             settings: AtrophySettings = AtrophySettings(), seed: int = 0,
                             shape: tuple[int, int, int] = (40, 48, 40)) -> Path:
    """A small simulated longitudinal BIDS dataset from synthetic heads (for tests and demos)."""
    out = Path(out_dir)
    rows, truth = [], []
    base = datetime(2020, 1, 6, 9, 0, 0)
    for i in range(n_subjects):
        t1, seg, aff = make_phantom(shape, seed=seed + i)
        sub = f"phantom{i + 1:02d}"
        subj = simulate_subject_from_arrays(sub, t1, seg, aff, months, settings, seed + i,
                                            baseline_age=60.0 + 5 * i, sex="F" if i % 2 else "M")
        truth += write_subject(out, subj, base + timedelta(days=7 * i))
        rows.append({"participant_id": f"sub-{sub}", "age": subj.baseline_age, "sex": subj.sex,
                     "source_participant": "n/a"})
    write_dataset(out, rows, truth, settings, name="ldae-bids phantom longitudinal", seed=seed, license="CC0-1.0")
    return out
