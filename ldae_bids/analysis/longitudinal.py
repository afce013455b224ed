"""Missing-session filling: session times, interpolation maths and fill planning.

The method fills a missing session of a subject by interpolating between the two real sessions that
bracket it in time: ``y_sem`` linearly (:func:`lerp`) and ``x_T`` spherically (:func:`slerp`), at the
time fraction ``(t - t_before) / (t_after - t_before)``. Nothing here touches a model; the stage that
decodes the interpolated codes lives elsewhere.

Time units
----------
All times are **months** (float) relative to the subject's first session. One month is
365.2425 / 12 days (a mean Gregorian month); an age column in years is multiplied by 12.

Session time sources, in the order tried by ``source="auto"``
--------------------------------------------------------------
1. ``acq_time`` in ``sub-<label>_sessions.tsv`` (ISO 8601, e.g. ``2020-01-31T09:00:00``; a date alone
   is accepted), when every session has one;
2. an age column (``age`` by default, in years) of the same table, when every session has one;
3. the session labels themselves, parsed with :data:`DEFAULT_LABEL_PATTERNS` (case-insensitive,
   whole label, an optional ``ses-`` prefix is ignored):

   =======================================  ====================  ===============
   label                                    examples              months
   =======================================  ====================  ===============
   baseline words                           ``bl``, ``baseline``  0
   months prefix                            ``M06``, ``m12``,     value
                                            ``month24``
   years prefix                             ``y2``, ``year1``     12 x value
   weeks prefix                             ``w26``, ``week4``    value x 12/52.1775
   days prefix                              ``d180``, ``day30``   value / 30.436875
   value then unit                          ``6m``, ``2y``,       as above
                                            ``12months``
   =======================================  ====================  ===============

   Bare numbers (``1``, ``2``, ``03``) are **not** parsed: they are usually visit indices, not times.
   Other schemes are given as ``(regex, months_per_unit)`` pairs: the regex must match the whole
   label and capture the number in a group named ``value`` (no group means time 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from ldae_bids.errors import InputError, UsageError

DAYS_PER_MONTH = 365.2425 / 12.0
WEEKS_PER_YEAR = 365.2425 / 7.0

_NUM = r"(?P<value>\d+(?:\.\d+)?)"
#: (regex, months per unit) tried in order; see the module docstring.
DEFAULT_LABEL_PATTERNS: tuple[tuple[str, float], ...] = (
    (r"(?:bl|baseline|base)", 0.0),
    (rf"(?:m|mo|mon|month|months)[-_]?{_NUM}", 1.0),
    (rf"(?:y|yr|year|years)[-_]?{_NUM}", 12.0),
    (rf"(?:w|wk|week|weeks)[-_]?{_NUM}", 12.0 / WEEKS_PER_YEAR),
    (rf"(?:d|day|days)[-_]?{_NUM}", 1.0 / DAYS_PER_MONTH),
    (rf"{_NUM}[-_]?(?:m|mo|mon|month|months)", 1.0),
    (rf"{_NUM}[-_]?(?:y|yr|year|years)", 12.0),
    (rf"{_NUM}[-_]?(?:w|wk|week|weeks)", 12.0 / WEEKS_PER_YEAR),
    (rf"{_NUM}[-_]?(?:d|day|days)", 1.0 / DAYS_PER_MONTH),
)


# ----------------------------------------------------------------------------------------------
# Session times
# ----------------------------------------------------------------------------------------------
def strip_prefix(label: str, prefix: str) -> str:
    """``"ses-M06" -> "M06"``; labels without the prefix are returned unchanged."""
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def parse_session_label(label: str, patterns: Sequence[tuple[str, float]] | None = None) -> float | None:
    """Months encoded in a session label, or ``None`` when no pattern matches.

    Parameters
    ----------
    label : str
        Session label, with or without ``ses-``.
    patterns : sequence of (regex, months_per_unit), optional
        Tried in order, case-insensitively, against the whole label. Defaults to
        :data:`DEFAULT_LABEL_PATTERNS`.
    """
    text = strip_prefix(label, "ses-")
    for regex, per_unit in patterns if patterns is not None else DEFAULT_LABEL_PATTERNS:
        m = re.fullmatch(regex, text, flags=re.IGNORECASE)
        if m is None:
            continue
        value = m.groupdict().get("value")
        return 0.0 if value is None else float(value) * float(per_unit)
    return None


def _parse_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    text = str(value).strip()
    if text in {"", "n/a", "nan", "NaN", "None"}:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    return None if math.isnan(f) else f


def _relative(times: Mapping[str, float]) -> dict[str, float]:
    t0 = min(times.values())
    return {k: float(v - t0) for k, v in sorted(times.items(), key=lambda kv: (kv[1], kv[0]))}


def times_from_acq_time(acq_times: Mapping[str, Any]) -> dict[str, float]:
    """Months since the first session from ISO 8601 ``acq_time`` strings (label -> months)."""
    parsed = {}
    for label, value in acq_times.items():
        dt = _parse_datetime(value)
        if dt is None:
            raise UsageError(f"session {label}: acq_time {value!r} is not an ISO 8601 date-time")
        parsed[label] = dt
    if not parsed:
        return {}
    aware = {dt.tzinfo is not None for dt in parsed.values()}
    if len(aware) > 1:
        parsed = {k: v.replace(tzinfo=None) for k, v in parsed.items()}
    t0 = min(parsed.values())
    return _relative({k: (v - t0).total_seconds() / 86400.0 / DAYS_PER_MONTH for k, v in parsed.items()})


def times_from_age(ages_years: Mapping[str, Any]) -> dict[str, float]:
    """Months since the first session from an age (years) per session."""
    out = {}
    for label, value in ages_years.items():
        f = _as_float(value)
        if f is None:
            raise UsageError(f"session {label}: age {value!r} is not a number")
        out[label] = 12.0 * f
    return _relative(out) if out else {}


def times_from_labels(labels: Iterable[str], patterns: Sequence[tuple[str, float]] | None = None) -> dict[str, float]:
    """Months since the first session parsed from session labels (see the module docstring)."""
    out = {}
    for label in labels:
        months = parse_session_label(label, patterns)
        if months is None:
            raise UsageError(
                f"session label {label!r} carries no time this app can read (e.g. M06, m12, month24, y2, bl); "
                "give acq_time or an age column in sessions.tsv, or a label pattern"
            )
        out[strip_prefix(label, "ses-")] = months
    return _relative(out) if out else {}


def session_times(
    sessions: Any,
    *,
    source: str = "auto",
    age_column: str = "age",
    label_patterns: Sequence[tuple[str, float]] | None = None,
) -> dict[str, float]:
    """Months since the first session for each session of one subject.

    Parameters
    ----------
    sessions : path to ``sub-<label>_sessions.tsv``, a pandas DataFrame with a ``session_id`` column,
        or an iterable of session labels (then only ``source="label"``/``"auto"`` applies).
    source : {"auto", "acq_time", "age", "label"}
        Where times come from; ``"auto"`` tries acq_time, then the age column, then the labels, and
        uses the first source complete for every session.
    age_column : str
        Column holding the age at the session, in years.
    label_patterns : sequence of (regex, months_per_unit), optional
        See :func:`parse_session_label`.

    Returns
    -------
    dict
        Session label (without ``ses-``) -> months, sorted by time, the first session at 0.
    """
    if source not in {"auto", "acq_time", "age", "label"}:
        raise UsageError(f"unknown session time source {source!r} (auto, acq_time, age, label)")
    import pandas as pd

    table = None
    if isinstance(sessions, (str, Path)):
        table = _read_sessions_tsv(Path(sessions))
    elif isinstance(sessions, pd.DataFrame):
        table = sessions
    if table is None:
        labels = [strip_prefix(s, "ses-") for s in sessions]
        if source in {"acq_time", "age"}:
            raise UsageError(f"session time source {source!r} needs a sessions.tsv table")
        return times_from_labels(labels, label_patterns)
    if "session_id" not in table.columns:
        raise UsageError("sessions table has no session_id column")
    labels = [strip_prefix(s, "ses-") for s in table["session_id"].astype(str)]

    def complete(column: str) -> bool:
        return column in table.columns and all(
            (_parse_datetime(v) if column == "acq_time" else _as_float(v)) is not None for v in table[column]
        )

    if source == "acq_time" or (source == "auto" and complete("acq_time")):
        if "acq_time" not in table.columns:
            raise UsageError("sessions table has no acq_time column")
        return times_from_acq_time(dict(zip(labels, table["acq_time"])))
    if source == "age" or (source == "auto" and complete(age_column)):
        if age_column not in table.columns:
            raise UsageError(f"sessions table has no {age_column!r} column")
        return times_from_age(dict(zip(labels, table[age_column])))
    return times_from_labels(labels, label_patterns)


def _read_sessions_tsv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such sessions file") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise InputError(f"{path}: not a readable TSV ({exc})") from None


def format_session_label(months: float, template: str = "M{months:02d}") -> str:
    """A session label for a time in months: ``M18``; non-integer months give ``M07p5``."""
    if abs(months - round(months)) < 1e-6:
        return template.format(months=int(round(months)))
    whole = int(math.floor(months))
    frac = f"{months - whole:.2f}".split(".")[1].rstrip("0")
    return template.format(months=whole) + f"p{frac}"


# ----------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def lerp(a, b, t: float):
    """Linear interpolation ``(1 - t) a + t b`` for numpy arrays or torch tensors of equal shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"lerp: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return a + (b - a) * t


def slerp(a, b, t: float, *, eps: float = 1e-6):
    """Spherical interpolation of two arrays/tensors, treated as flat vectors.

    The direction moves along the great circle between ``a/|a|`` and ``b/|b|`` (Shoemake) and the norm
    is interpolated linearly, so unit vectors stay unit vectors and equal-norm noise maps (``x_T``) keep
    their norm. Where the angle is tiny (``sin(omega) < eps``: nearly parallel) the result falls back to
    :func:`lerp`, which is then the same to first order; exactly opposite vectors have no unique great
    circle and also fall back to :func:`lerp`. Zero vectors fall back to :func:`lerp`.

    Parameters
    ----------
    a, b : numpy.ndarray or torch.Tensor
        Same shape; any number of dimensions (flattened internally).
    t : float
        0 gives ``a``, 1 gives ``b``; values outside [0, 1] extrapolate along the circle.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"slerp: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if _is_torch(a):
        import torch

        fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
        na, nb = torch.linalg.vector_norm(fa).item(), torch.linalg.vector_norm(fb).item()
    else:
        fa, fb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        na, nb = float(np.linalg.norm(fa)), float(np.linalg.norm(fb))
    if na == 0.0 or nb == 0.0:
        return lerp(a, b, t)
    cos = float((fa @ fb).item() if _is_torch(a) else fa @ fb) / (na * nb)
    cos = min(1.0, max(-1.0, cos))
    omega = math.acos(cos)
    so = math.sin(omega)
    if so < eps:
        return lerp(a, b, t)
    ca = math.sin((1.0 - t) * omega) / so
    cb = math.sin(t * omega) / so
    norm = (1.0 - t) * na + t * nb
    out = (ca * fa / na + cb * fb / nb) * norm
    if _is_torch(a):
        return out.reshape(a.shape).to(dtype=a.dtype)
    return out.reshape(np.shape(a)).astype(np.result_type(a, b, np.float32), copy=False)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fill:
    """One session to synthesise between two real ones.

    ``fraction = (target_time - before_time) / (after_time - before_time)``, in (0, 1).
    ``held_out`` names the real session being rebuilt in a leave-one-out evaluation, else ``None``.
    """

    target_time: float
    before_label: str
    after_label: str
    fraction: float
    before_time: float
    after_time: float
    label: str
    held_out: str | None = None

    @property
    def gap(self) -> float:
        """Months between the two real sessions used."""
        return self.after_time - self.before_time


@dataclass(frozen=True)
class Skipped:
    """A requested time that will not be filled, and why."""

    target_time: float
    reason: str


@dataclass
class FillPlan:
    """Fills to make and requested times skipped; iterates over (and has the length of) the fills."""

    fills: list[Fill] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __iter__(self):
        return iter(self.fills)

    def __len__(self) -> int:
        return len(self.fills)

    def __getitem__(self, i: int) -> Fill:
        return self.fills[i]


def _ordered(times: Mapping[str, float]) -> list[tuple[str, float]]:
    items = sorted(((str(k), float(v)) for k, v in times.items()), key=lambda kv: (kv[1], kv[0]))
    for (l1, t1), (l2, t2) in zip(items, items[1:]):
        if t2 == t1:
            raise UsageError(f"sessions {l1} and {l2} have the same time ({t1:g} months)")
    return items


def _bracket(items: list[tuple[str, float]], target: float) -> tuple[int, int] | None:
    for i in range(len(items) - 1):
        if items[i][1] < target < items[i + 1][1]:
            return i, i + 1
    return None


def plan_fills(
    times: Mapping[str, float],
    targets: Sequence[float] | None = None,
    *,
    step: float | None = None,
    tolerance: float = 0.5,
    label_template: str = "M{months:02d}",
) -> FillPlan:
    """Which sessions to synthesise, each between the two real sessions that bracket it.

    Parameters
    ----------
    times : mapping
        Real session label -> months (e.g. from :func:`session_times`).
    targets : sequence of float, optional
        Months (same origin as ``times``) at which a session is wanted.
    step : float, optional
        Instead of ``targets``: every ``step`` months from the first to the last real session.
    tolerance : float
        A target within this many months of a real session is skipped (that session exists).
    label_template : str
        Session label of a fill, formatted by :func:`format_session_label`.

    Returns
    -------
    FillPlan
        ``fills`` sorted by time; ``skipped`` says why each other target is left out (a real session is
        there already; before the first or after the last session: never extrapolated; a duplicate).
    """
    if (targets is None) == (step is None):
        raise UsageError("give either target times or a schedule step, not both or neither")
    items = _ordered(times)
    if len(items) < 2:
        reason = "fewer than two real sessions: nothing brackets any target"
        wanted = list(targets) if targets is not None else []
        return FillPlan([], [Skipped(float(t), reason) for t in wanted])
    first, last = items[0][1], items[-1][1]
    if step is not None:
        if not step > 0:
            raise UsageError(f"schedule step must be > 0 months, got {step}")
        n = int(math.floor((last - first) / step + 1e-9))
        targets = [first + k * step for k in range(n + 1)]
    plan = FillPlan()
    seen: set[float] = set()
    for raw in targets:
        t = float(raw)
        key = round(t, 6)
        if key in seen:
            plan.skipped.append(Skipped(t, "duplicate target"))
            continue
        seen.add(key)
        near = min(items, key=lambda kv: abs(kv[1] - t))
        if abs(near[1] - t) <= tolerance:
            plan.skipped.append(Skipped(t, f"real session {near[0]} is at {near[1]:g} months"))
            continue
        if t < first or t > last:
            side = "before the first" if t < first else "after the last"
            plan.skipped.append(
                Skipped(t, f"{t:g} months is {side} real session ({first:g}..{last:g}); no extrapolation")
            )
            continue
        i, j = _bracket(items, t)
        (lb, tb), (la, ta) = items[i], items[j]
        plan.fills.append(Fill(t, lb, la, (t - tb) / (ta - tb), tb, ta, format_session_label(t, label_template)))
    plan.fills.sort(key=lambda f: f.target_time)
    return plan


def leave_one_out_plan(times: Mapping[str, float]) -> list[Fill]:
    """For evaluation: each inner real session rebuilt from its two neighbours.

    The first and last sessions have no bracketing pair and are not included.
    """
    items = _ordered(times)
    fills = []
    for i in range(1, len(items) - 1):
        (lb, tb), (lt, tt), (la, ta) = items[i - 1], items[i], items[i + 1]
        fills.append(Fill(tt, lb, la, (tt - tb) / (ta - tb), tb, ta, lt, held_out=lt))
    return fills


# ----------------------------------------------------------------------------------------------
# Evaluation baselines
# ----------------------------------------------------------------------------------------------
def nearest_session(fill: Fill) -> str:
    """Baseline 1: the real neighbour closest in time (the earlier one on a tie)."""
    return fill.before_label if fill.fraction <= 0.5 else fill.after_label


def linear_blend(before, after, fraction: float):
    """Baseline 2: voxel-wise linear blend of the two neighbouring images (arrays or tensors)."""
    return lerp(before, after, fraction)


def interpolate_codes(y_before, y_after, x_before, x_after, fraction: float):
    """The method's fill: ``y_sem`` by :func:`lerp`, ``x_T`` by :func:`slerp` at ``fraction``."""
    return lerp(y_before, y_after, fraction), slerp(x_before, x_after, fraction)
