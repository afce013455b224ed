"""Find the T1w inputs of a BIDS dataset with pybids.

The index is built once with validation off and the usual ignore patterns, and cached
in the work directory (or ``--bids-database-dir``), never inside the BIDS folder,
which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldae_bids.config import Settings
from ldae_bids.errors import InvalidBidsError, MissingInputError, NoMatchError, UsageError

log = logging.getLogger("ldae_bids")

IGNORE = ("code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^\."), re.compile(r"/\."))
_ENTITY_KEYS = {"subject", "session", "acquisition", "run", "reconstruction", "ceagent"}


@dataclass(frozen=True)
class SessionInput:
    """One T1w image to process, with what is known about it.

    ``entities`` are the BIDS entities that identify the outputs made from it:
    subject, and session, acquisition, run where they apply.
    """

    subject: str
    session: str | None
    t1w: Path
    entities: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A readable identifier, e.g. ``sub-01_ses-M06`` or ``sub-01_ses-M06_run-2``."""
        order = ("subject", "session", "acquisition", "reconstruction", "run")
        short = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
        return "_".join(f"{short[k]}-{self.entities[k]}" for k in order if k in self.entities)

    def relative_t1w(self, bids_dir: Path) -> str:
        return self.t1w.relative_to(bids_dir).as_posix()


@dataclass(frozen=True)
class SubjectInput:
    """All the inputs of one participant (the unit of work at participant level)."""

    label: str
    sessions: tuple[SessionInput, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"sub-{self.label}"


# ---------------------------------------------------------------------------- validation
def check_bids_root(bids_dir: Path) -> None:
    """Minimal structural checks; the full validator runs separately when installed."""
    if not bids_dir.exists():
        raise MissingInputError(f"{bids_dir}: BIDS folder does not exist")
    if not bids_dir.is_dir():
        raise InvalidBidsError(f"{bids_dir}: not a folder")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise InvalidBidsError(f"{desc}: missing (every BIDS dataset needs a dataset_description.json)")
    try:
        data = json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidBidsError(f"{desc}: not valid JSON ({exc})") from None
    missing = [k for k in ("Name", "BIDSVersion") if k not in data]
    if missing:
        raise InvalidBidsError(f"{desc}: required field(s) missing: {', '.join(missing)}")
    if not any(p.is_dir() and p.name.startswith("sub-") for p in bids_dir.iterdir()):
        raise InvalidBidsError(f"{bids_dir}: no sub-<label> folders, this is not a BIDS dataset")


def run_bids_validator(bids_dir: Path) -> None:
    """Run the official validator (``bids-validator``, from bids-validator-deno) when installed.

    Errors raise :class:`InvalidBidsError`; a missing validator is logged and skipped
    (the structural checks of :func:`check_bids_root` still apply).
    """
    import subprocess

    exe = shutil.which("bids-validator-deno") or shutil.which("bids-validator")
    if exe is None:
        log.warning("bids-validator not found (pip install bids-validator-deno): only basic BIDS checks were run")
        return
    try:
        proc = subprocess.run(
            [exe, "--format", "json", "--ignoreWarnings", str(bids_dir)],
            capture_output=True, text=True, timeout=600, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("bids-validator could not run (%s): only basic BIDS checks were run", exc)
        return
    try:
        report = json.loads(proc.stdout)
        issues = report.get("issues", {}).get("issues", [])
        errors = [i for i in issues if i.get("severity") == "error"]
    except (json.JSONDecodeError, AttributeError):
        if proc.returncode == 0:
            return
        log.warning("bids-validator output not understood: only basic BIDS checks were run")
        return
    if errors:
        first = errors[0]
        where = first.get("location", "")
        raise InvalidBidsError(
            f"{bids_dir}: bids-validator found {len(errors)} error(s), first: {first.get('code')} {where} "
            "(use --skip-bids-validation to go on anyway)"
        )


# ----------------------------------------------------------------------------- indexing
def _database_dir(settings: Settings) -> Path:
    if settings.bids_database_dir is not None:
        db = settings.bids_database_dir
    else:
        digest = hashlib.sha1(str(settings.bids_dir).encode()).hexdigest()[:12]
        db = settings.work_dir / f"bids-db-{digest}"
    if db.resolve().is_relative_to(settings.bids_dir.resolve()):
        raise UsageError(f"{db}: the pybids database must not be inside the BIDS folder (it may be read-only)")
    return db


def _fingerprint(bids_dir: Path) -> str:
    """Cheap identity of a dataset's layout: its root and the sorted subject folders."""
    subs = sorted(p.name for p in bids_dir.iterdir() if p.name.startswith("sub-"))
    return hashlib.sha1("\n".join([str(bids_dir.resolve()), *subs]).encode()).hexdigest()


def load_layout(settings: Settings):
    """A pybids layout of the input dataset, index cached under the work dir.

    A cached index is reused only when it was built for this folder with the same subjects
    (a fingerprint file beside it); otherwise a new one is built in a temporary folder and
    renamed into place. A shared index (Slurm arrays) is never deleted while others read it.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    db = _database_dir(settings)
    indexer = BIDSLayoutIndexer(validate=False, ignore=list(IGNORE), index_metadata=False)
    fingerprint = _fingerprint(settings.bids_dir)
    stamp = db / "ldae-bids-fingerprint.txt"
    if (db / "layout_index.sqlite").exists():
        if stamp.is_file() and stamp.read_text().strip() == fingerprint:
            try:
                layout = BIDSLayout(settings.bids_dir, database_path=db, validate=False, indexer=indexer)
                if Path(layout.root).resolve() == settings.bids_dir.resolve():
                    return layout
            except Exception as exc:  # a broken cache is never trusted
                log.warning("cached BIDS index at %s unusable (%s): re-indexing", db, exc)
        log.info("BIDS index at %s was built for another dataset or subject list: not used", db)
        db = db.with_name(f"{db.name}-{fingerprint[:12]}")
        stamp = db / "ldae-bids-fingerprint.txt"
        if stamp.is_file() and stamp.read_text().strip() == fingerprint:
            return BIDSLayout(settings.bids_dir, database_path=db, validate=False, indexer=indexer)
    layout = BIDSLayout(settings.bids_dir, validate=False, indexer=indexer)
    tmp = None
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{db.name}.", dir=db.parent))
        layout.save(tmp)
        (tmp / stamp.name).write_text(fingerprint + "\n")
        os.rename(tmp, db)  # fails if another process got there first: theirs is as good
        tmp = None
    except OSError as exc:
        if not (db / "layout_index.sqlite").exists():
            log.warning("could not cache the BIDS index at %s (%s)", db, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # layout.save() rebinds the in-memory layout to the saved copy: reopen from the final place
    if (db / "layout_index.sqlite").exists():
        return BIDSLayout(settings.bids_dir, database_path=db, validate=False, indexer=indexer)
    return BIDSLayout(settings.bids_dir, validate=False, indexer=indexer)


# ---------------------------------------------------------------------------- discovery
def read_tsv_rows(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Rows of a BIDS TSV keyed by ``key`` (``n/a`` becomes None)."""
    import pandas as pd

    if not path.is_file():
        return {}
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InvalidBidsError(f"{path}: cannot be read as a TSV ({exc})") from None
    if key not in df.columns:
        raise InvalidBidsError(f"{path}: no '{key}' column")
    rows: dict[str, dict[str, Any]] = {}
    for rec in df.to_dict(orient="records"):
        rows[rec[key]] = {k: (None if v in ("n/a", "") else _number(v)) for k, v in rec.items() if k != key}
    return rows


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _filters(settings: Settings) -> dict[str, Any]:
    filters = dict(settings.bids_filters.get("t1w", settings.bids_filters))
    filters.setdefault("datatype", "anat")
    filters.setdefault("suffix", "T1w")
    filters.setdefault("extension", [".nii", ".nii.gz"])
    if settings.participant_label:
        filters["subject"] = list(settings.participant_label)
    if settings.session_label:
        filters["session"] = list(settings.session_label)
    return filters


def discover(settings: Settings, layout=None) -> list[SubjectInput]:
    """The subjects to process, each with its sessions' T1w images.

    Raises :class:`NoMatchError` when the filters select nothing, and names
    the participant labels that do not exist.
    """
    layout = layout if layout is not None else load_layout(settings)
    all_subjects = set(layout.get_subjects())
    if settings.participant_label:
        unknown = sorted(set(settings.participant_label) - all_subjects)
        if unknown:
            raise NoMatchError(
                f"{settings.bids_dir}: participant label(s) not found: {', '.join(unknown)}"
            )
    try:
        files = layout.get(return_type="object", **_filters(settings))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--bids-filter-file: invalid filter ({exc})") from None
    if not files:
        raise NoMatchError(f"{settings.bids_dir}: no T1w image matches the selection (labels and filters)")

    participants = read_tsv_rows(settings.bids_dir / "participants.tsv", "participant_id")
    by_subject: dict[str, list] = {}
    for f in files:
        by_subject.setdefault(f.entities["subject"], []).append(f)

    subjects = []
    for label in sorted(by_subject):
        sub_meta = participants.get(f"sub-{label}", {})
        sessions_tsv: dict[str, dict[str, Any]] = {}
        sessions = []
        for f in _choose_runs(by_subject[label], settings.t1w_policy):
            ents = {k: str(v) for k, v in f.entities.items() if k in _ENTITY_KEYS}
            if settings.t1w_policy == "first":  # one image per session: outputs need no acq/run
                ents = {k: v for k, v in ents.items() if k in ("subject", "session")}
            ses = ents.get("session")
            if ses is not None and not sessions_tsv:
                sessions_tsv = read_tsv_rows(
                    settings.bids_dir / f"sub-{label}" / f"sub-{label}_sessions.tsv", "session_id"
                )
            meta = {**sub_meta, **(sessions_tsv.get(f"ses-{ses}", {}) if ses else {})}
            sessions.append(SessionInput(label, ses, Path(f.path), ents, meta))
        subjects.append(SubjectInput(label, tuple(sessions), sub_meta))
    return subjects


def _choose_runs(files: list, policy: str) -> list:
    """Several T1w per session: ``all`` keeps each; ``first`` keeps one per session.

    ``first`` prefers images without ``acq``/``rec`` entities, then the lowest run
    number, then the file name: a deterministic, documented choice.
    """
    if policy == "all":
        return sorted(files, key=lambda f: f.path)
    chosen: dict[Any, Any] = {}
    for f in files:
        ses = f.entities.get("session")
        rank = (
            "acquisition" in f.entities,
            "reconstruction" in f.entities,
            int(f.entities.get("run", 0) or 0),
            f.path,
        )
        if ses not in chosen or rank < chosen[ses][0]:
            chosen[ses] = (rank, f)
    return [chosen[k][1] for k in sorted(chosen, key=lambda s: (s is not None, s or ""))]
