"""Probe targets from BIDS tables, aligned to embedding rows keyed by (participant, session).

``participants.tsv`` holds subject-level values (sex, diagnosis at entry...); ``sub-<l>_sessions.tsv``
holds session-level values (age at the session, diagnosis at the visit...). A column found in a
sessions table wins over the same column in ``participants.tsv`` for that subject's sessions; a
subject-level value is used for every session of the subject. ``n/a`` (and empty cells) are missing.
Identifiers are compared without their ``sub-`` / ``ses-`` prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldae_bids.errors import InputError, UsageError

MISSING = {"", "n/a", "na", "nan", "none", "null"}


def clean_target(y: Iterable) -> tuple[np.ndarray, bool]:
    """Normalise target values; returns (values, numeric).

    Numeric when every present value parses as a number: then a float array with NaN for missing.
    Otherwise an object array of stripped strings with ``None`` for missing.
    """
    raw = list(y.tolist() if hasattr(y, "tolist") else y)
    present: list[Any] = []
    for v in raw:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            present.append(None)
        elif isinstance(v, str) and v.strip().lower() in MISSING:
            present.append(None)
        else:
            present.append(v.strip() if isinstance(v, str) else v)
    numbers = []
    numeric = True
    for v in present:
        if v is None:
            numbers.append(np.nan)
            continue
        try:
            numbers.append(float(v))
        except (TypeError, ValueError):
            numeric = False
            break
    if numeric:
        return np.asarray(numbers, dtype=np.float64), True
    return np.asarray([None if v is None else str(v) for v in present], dtype=object), False


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip().lower() in MISSING


def _strip(value: Any, prefix: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in MISSING:
        return None
    return text[len(prefix):] if text.startswith(prefix) else text


def _read_tsv(path: Path, key: str):
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise InputError(f"{path}: not a readable TSV ({type(exc).__name__}: {exc})") from None
    if key not in df.columns:
        raise InputError(f"{path}: no {key} column (columns: {', '.join(df.columns)})")
    ids = df[key].map(lambda v: _strip(v, "sub-" if key == "participant_id" else "ses-"))
    if ids.isna().any():
        raise InputError(f"{path}: empty {key} in row(s) {', '.join(str(i + 2) for i in np.flatnonzero(ids.isna()))}")
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise InputError(f"{path}: duplicate {key} {', '.join(dup[:5])}")
    df[key] = ids
    return df


def find_sessions_tsvs(bids_dir: str | Path) -> dict[str, Path]:
    """``{participant label: sub-<label>_sessions.tsv}`` for every subject folder of a BIDS dataset."""
    out = {}
    for p in sorted(Path(bids_dir).glob("sub-*/sub-*_sessions.tsv")):
        out[p.parent.name[4:]] = p
    return out


def _sessions_mapping(sessions_tsvs) -> dict[str, Path]:
    if sessions_tsvs is None:
        return {}
    if isinstance(sessions_tsvs, (str, Path)) and Path(sessions_tsvs).is_dir():
        return find_sessions_tsvs(sessions_tsvs)
    if isinstance(sessions_tsvs, (str, Path)):
        sessions_tsvs = [sessions_tsvs]
    if isinstance(sessions_tsvs, Mapping):
        return {_strip(k, "sub-"): Path(v) for k, v in sessions_tsvs.items()}
    out = {}
    for p in sessions_tsvs:
        p = Path(p)
        name = p.name
        if not (name.startswith("sub-") and name.endswith("_sessions.tsv")):
            raise UsageError(f"{p}: a sessions table must be named sub-<label>_sessions.tsv")
        out[name[4:-len("_sessions.tsv")]] = p
    return out


def read_target_table(participants_tsv: str | Path | None, sessions_tsvs=None, column: str | None = None):
    """Targets keyed by (participant_id, session_id), labels without prefixes.

    Parameters
    ----------
    participants_tsv : path or None
        ``participants.tsv``; subject-level columns.
    sessions_tsvs : None, a BIDS root folder, a path or paths named ``sub-<l>_sessions.tsv``, or a
        mapping participant -> path
        Session-level columns.
    column : str, optional
        Keep only this column (raises :class:`UsageError` naming the available columns when no table
        has it).

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id``, ``session_id`` and the target column(s), values as strings as read
        (``n/a`` untouched; see :func:`clean_target`). One row per session of a sessions table (its
        subject's participants.tsv values filled in), plus one subject-level row (``session_id`` None)
        per participants.tsv subject.
    """
    import pandas as pd

    parts = None
    if participants_tsv is not None:
        parts = _read_tsv(Path(participants_tsv), "participant_id")
    sessions = _sessions_mapping(sessions_tsvs)
    frames = []
    for sub, path in sessions.items():
        df = _read_tsv(path, "session_id")
        if "participant_id" in df.columns:
            df = df.drop(columns="participant_id")
        df.insert(0, "participant_id", sub)
        frames.append(df)
    ses = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["participant_id", "session_id"])
    if parts is None and not frames:
        raise UsageError("no participants.tsv and no sessions.tsv: no targets to read")

    available = sorted((set(parts.columns) if parts is not None else set()) | set(ses.columns))
    available = [c for c in available if c not in {"participant_id", "session_id"}]
    if column is not None and column not in available:
        raise UsageError(
            f"unknown target column {column!r}; available: {', '.join(available) if available else '(none)'}"
        )

    rows = []
    part_records = {} if parts is None else {r["participant_id"]: r for r in parts.to_dict("records")}
    for rec in ses.to_dict("records"):
        merged = dict(part_records.get(rec["participant_id"], {}))
        for k, v in rec.items():
            # session value wins, unless it is n/a and the subject-level one is not
            if not (_is_missing(v) and not _is_missing(merged.get(k))):
                merged[k] = v
        rows.append(merged)
    for sub, rec in part_records.items():  # subject-level rows for every subject, sessions or not
        rows.append({**rec, "session_id": None})
    table = pd.DataFrame(rows)
    if "session_id" not in table.columns:
        table["session_id"] = None
    table["session_id"] = table["session_id"].astype(object).where(table["session_id"].notna(), None)
    cols = ["participant_id", "session_id"] + ([column] if column else [c for c in available if c in table.columns])
    for c in cols:
        if c not in table.columns:
            table[c] = "n/a"
    table[cols[2:]] = table[cols[2:]].fillna("n/a")
    return table[cols].reset_index(drop=True)


def align_targets(table, keys: Sequence[tuple[str, str | None]], column: str) -> np.ndarray:
    """Target value for each embedding row ``(participant_id, session_id or None)``.

    A row with a session takes the matching session row, else the subject-level row. A row without
    a session takes the subject-level value when present, else the value of the subject's only
    session row. Anything else is missing (``None``).
    """
    if column not in table.columns:
        raise UsageError(f"unknown target column {column!r}")
    exact: dict[tuple[str, str | None], Any] = {}
    sessions_of: dict[str, list[Any]] = {}
    for sub, ses, val in zip(table["participant_id"], table["session_id"], table[column]):
        sub, ses = _strip(sub, "sub-"), _strip(ses, "ses-")
        exact[(sub, ses)] = val
        if ses is not None:
            sessions_of.setdefault(sub, []).append(val)
    out = []
    for sub, ses in keys:
        sub, ses = _strip(sub, "sub-"), _strip(ses, "ses-")
        if ses is not None and (sub, ses) in exact:
            out.append(exact[(sub, ses)])
            continue
        value = exact.get((sub, None))
        if ses is None and _is_missing(value) and len(sessions_of.get(sub, [])) == 1:
            value = sessions_of[sub][0]
        out.append(value)
    return np.asarray(out, dtype=object)


def read_feature_table(path: str | Path, keys: Sequence[tuple[str, str | None]], columns: Sequence[str] | None = None,
                       exclude: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """Numeric features (e.g. ROI volumes) aligned to embedding rows; missing rows are NaN.

    The table needs ``participant_id`` and may have ``session_id``; all other numeric columns are
    features unless ``columns`` picks some. Returns ``(array (n_rows, n_features), names)``.
    """
    path = Path(path)
    df = _read_tsv(path, "participant_id") if "session_id" not in _header(path) else _read_multi(path)
    names = list(columns) if columns else [c for c in df.columns if c not in {"participant_id", "session_id", *exclude}]
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: no column(s) {', '.join(missing)}")
    table = df[["participant_id"] + (["session_id"] if "session_id" in df.columns else []) + names].copy()
    if "session_id" not in table.columns:
        table["session_id"] = None
    feats = np.full((len(keys), len(names)), np.nan)
    for j, name in enumerate(names):
        vals, numeric = clean_target(align_targets(table, keys, name))
        if not numeric:
            raise InputError(f"{path}: column {name} is not numeric")
        feats[:, j] = vals
    return feats, names


def _header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n").split("\t")
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc.strerror or exc})") from None


def _read_multi(path: Path):
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable TSV ({exc})") from None
    df["participant_id"] = df["participant_id"].map(lambda v: _strip(v, "sub-"))
    df["session_id"] = df["session_id"].map(lambda v: _strip(v, "ses-"))
    if df.duplicated(["participant_id", "session_id"]).any():
        raise InputError(f"{path}: duplicate (participant_id, session_id) rows")
    return df
