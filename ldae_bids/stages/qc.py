"""``collect-qc``: every session's quality figures in one group table, outliers flagged.

The participant stages write their checks into each session's sidecar (preprocess: ``QC``, with the
registration check and the native brain volume; reconstruct: ``Metrics``, SSIM/MSE to the input). On a
large dataset nobody opens every subject's report, so the group level gathers them, as MRIQC's group
tables do, and flags the sessions to look at first:

- the preprocess stage's own registration check failed (``registration_ok`` false: NCC to the template
  or mask Dice under its thresholds);
- a value far from the rest of the dataset: the modified z-score ``0.6745 (x - median) / MAD`` (Iglewicz
  and Hoaglin) beyond ``qc.outlier_z`` (default 3.5), on the side that means trouble (a low NCC, Dice or
  SSIM, a high MSE, a brain volume either way). Only with at least :data:`MIN_FOR_OUTLIERS` values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.plugins.api import GroupInput, Level, Stage, StageContext, StageOption

MIN_FOR_OUTLIERS = 20  # with fewer values the median absolute deviation is too unstable to flag on


@dataclass(frozen=True)
class Metric:
    column: str
    source: str  # "preprocess" (sidecar QC) or "reconstruct" (sidecar Metrics)
    key: str
    side: str  # which deviation is a problem: "low", "high" or "both"
    description: str
    units: str | None = None


METRICS = (
    Metric("brain_volume_ml", "preprocess", "brain_volume_ml", "both",
           "native-space brain-mask volume (deepbet)", "ml"),
    Metric("ncc_to_template", "preprocess", "ncc_to_template", "low",
           "normalised cross-correlation of the registered brain with the template brain, inside the template "
           "brain mask"),
    Metric("mask_dice_to_template", "preprocess", "mask_dice_to_template", "low",
           "Dice of the registered brain mask with the template brain mask"),
    Metric("reconstruction_ssim", "reconstruct", "ssim", "low", "SSIM of the reconstruction to the input "
           "(whole volume)"),
    Metric("reconstruction_ssim_brain", "reconstruct", "ssim_mask", "low",
           "SSIM of the reconstruction to the input inside the brain mask"),
    Metric("reconstruction_mse", "reconstruct", "mse", "high", "MSE of the reconstruction to the input "
           "(whole volume, [0, 1] intensities)"),
)


class CollectQcStage(Stage):
    name = "collect-qc"
    level = Level.GROUP
    version = "1"
    description = ("one group table of every session's QC figures (registration, brain volume, reconstruction), "
                   "with failed checks and outliers flagged")
    options = {"outlier_z": StageOption(
        "modified z-score (median and MAD over the sessions) beyond which a value is flagged", "3.5",
        kind=float, minimum=0)}

    def parameters(self, settings) -> dict[str, Any]:
        return {"outlier_z": self.option_value(settings, "outlier_z")}

    def run(self, ctx: StageContext, unit: GroupInput) -> None:
        table, missing = collect_qc(ctx, unit)
        if table is None:
            ctx.log.warning("collect-qc: no preprocess sidecar with QC found in %s; no QC table written (run the "
                            "participant level first)", unit.output_dir)
            return
        threshold = ctx.option("outlier_z")
        flagged_by = flag_sessions(table, threshold)
        ids = [c for c in ("participant_id", "session_id") if c in table.columns]
        first = ids + ["qc_flagged", "qc_flags"]
        table = table[first + [c for c in table.columns if c not in first]]
        flagged = table[table["qc_flagged"]]
        if len(flagged):
            ctx.log.warning("collect-qc: %d of %d session(s) flagged for a look: %s", len(flagged), len(table),
                            "; ".join(f"{k} ({f})" for k, f in zip(_keys(flagged), flagged["qc_flags"]))[:2000])
        sidecar: dict[str, Any] = {
            "Description": "Quality figures of every session, gathered from the participant sidecars, with the "
                           "sessions to look at first flagged.",
            "registration_ok": {"Description": "the preprocess stage's registration check (NCC and mask Dice to "
                                               "the template over its thresholds); n/a when not recorded"},
            "qc_flagged": {"Description": "whether the session is flagged for a look (see qc_flags)"},
            "qc_flags": {"Description": "why the session is flagged (n/a when it is not): a failed registration "
                                     "check, or a metric whose modified z-score 0.6745 (x - median) / MAD is "
                                     f"beyond {threshold:g} on its bad side (low NCC, Dice or SSIM; high MSE; "
                                     "brain volume either way)"},
            "OutlierZ": threshold,
            "OutliersNeedAtLeast": MIN_FOR_OUTLIERS,
            "MissingSessions": missing,
        }
        for m in METRICS:
            sidecar[m.column] = {"Description": f"{m.description} (from the {m.source} sidecar)",
                                 **({"Units": m.units} if m.units else {})}
            sidecar[f"z_{m.column}"] = {"Description": f"modified z-score of {m.column} over the sessions (n/a with "
                                                       f"fewer than {MIN_FOR_OUTLIERS} values or no spread)"}
        ctx.writer.write_tsv(table, {"desc": "qc", "suffix": "metrics"}, sidecar)
        from ldae_bids.reports.figures import qc_distributions

        ctx.writer.write_figure(qc_distributions(table, [m.column for m in METRICS], _keys(table), flagged_by),
                                {"desc": "groupqc", "suffix": "figure"})


def _keys(table) -> list[str]:
    if "session_id" in table.columns:
        return [f"{p}_{s}" if isinstance(s, str) and s else p
                for p, s in zip(table["participant_id"], table["session_id"])]
    return list(table["participant_id"])


def _sidecar(path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def collect_qc(ctx: StageContext, unit: GroupInput):
    """One row per session with a preprocess QC record (None when there is none), and the keys of the others."""
    import pandas as pd

    res = ctx.grid.res_label
    rows, missing = [], []
    sessions = any(ses.session for s in unit.subjects for ses in s.sessions)
    for subject in unit.subjects:
        for ses in subject.sessions:
            pre = _sidecar(ctx.writer.path(**outputs.preproc_t1w(ses, res), extension=".json")).get("QC")
            if not isinstance(pre, dict):
                missing.append(ses.key)
                continue
            rec = _sidecar(ctx.writer.path(**outputs.reconstruction(ses, res), extension=".json")).get("Metrics")
            found = {"preprocess": pre, "reconstruct": rec if isinstance(rec, dict) else {}}
            row: dict[str, Any] = {"participant_id": f"sub-{ses.subject}"}
            if sessions:
                row["session_id"] = f"ses-{ses.session}" if ses.session else None
            for m in METRICS:
                value = found[m.source].get(m.key)
                row[m.column] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
                    else float("nan")
            ok = pre.get("registration_ok")
            row["registration_ok"] = ok if isinstance(ok, bool) else None
            rows.append(row)
    if not rows:
        return None, missing
    return pd.DataFrame(rows), missing


def modified_z(values: np.ndarray) -> np.ndarray:
    """``0.6745 (x - median) / MAD`` over the finite values (NaN elsewhere, and everywhere when MAD is 0 or
    there are fewer than :data:`MIN_FOR_OUTLIERS` values)."""
    values = np.asarray(values, dtype=float)
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.sum() < MIN_FOR_OUTLIERS:
        return out
    med = np.median(values[finite])
    mad = np.median(np.abs(values[finite] - med))
    if mad <= 0:
        return out
    out[finite] = 0.6745 * (values[finite] - med) / mad
    return out


def flag_sessions(table, threshold: float) -> dict[str, np.ndarray]:
    """Add a ``z_<metric>`` column per metric, ``qc_flagged`` (bool) and ``qc_flags`` (the reasons joined by '; ',
    None when there are none); return, per metric column, which sessions it flagged."""
    reasons: list[list[str]] = [[] for _ in range(len(table))]
    flagged_by: dict[str, np.ndarray] = {}
    for i, ok in enumerate(table["registration_ok"]):
        if isinstance(ok, bool | np.bool_) and not ok:  # None (not recorded) is no failure
            reasons[i].append("registration check failed")
    for m in METRICS:
        z = modified_z(table[m.column].to_numpy())
        table[f"z_{m.column}"] = np.round(z, 2)
        bad = {"low": z < -threshold, "high": z > threshold, "both": np.abs(z) > threshold}[m.side]
        flagged_by[m.column] = bad
        for i in np.flatnonzero(bad):
            direction = "low" if z[i] < 0 else "high"
            reasons[i].append(f"{m.column} {direction} (z {z[i]:+.1f})")
    table["qc_flagged"] = [bool(r) for r in reasons]
    table["qc_flags"] = ["; ".join(r) if r else None for r in reasons]
    return flagged_by
