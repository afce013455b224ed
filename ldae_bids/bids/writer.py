"""BIDS-Derivatives writer: names from entities, sidecars, atomic writes.

File names are never hand-built: :meth:`DerivativesWriter.path` builds them from
entities with pybids' ``build_path`` and the patterns below (style.md #3), and every
path is checked to stay inside the output folder.
"""

from __future__ import annotations

import fcntl
import logging
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldae_bids import __version__
from ldae_bids.bids.io import atomic_write, atomic_write_json, atomic_write_text
from ldae_bids.errors import OutputError

CODE_URL = "https://github.com/ldae-bids/ldae-bids"

_ENT = (
    "[_ses-{session}][_acq-{acquisition}][_rec-{reconstruction}][_run-{run}]"
    "[_from-{from}][_to-{to}][_mode-{mode}][_space-{space}][_res-{res}][_desc-{desc}]"
)
PARTICIPANT_PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}" + _ENT + "_{suffix}{extension}",
    "sub-{subject}/{datatype<figures>}/sub-{subject}" + _ENT + "_{suffix}{extension}",
]
GROUP_PATTERNS = [
    "group/[target-{target}_][desc-{desc}_]{suffix}{extension}",
]
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_FREE_ENTITIES = {"suffix", "extension", "datatype"}

BIDSIGNORE = ["logs", "group", "*_xfm.txt", "*_xfm.json", "*_features.tsv", "*_features.json", "*_xt.safetensors",
              "*_xt.json", "*_probe.json", "*_predictions.tsv", "*_predictions.json", "*_metrics.tsv",
              "*_metrics.json", "*.html", "figures"]  # no trailing '/': bids-validator 3 ignores such folders


@dataclass
class DerivativesWriter:
    """Writes into one BIDS-Derivatives folder.

    A writer bound to a stage (:meth:`for_stage`) adds the stage's provenance to
    every sidecar and records the files it writes (for resumption and roll-back).
    """

    output_dir: Path
    bids_dir: Path
    stage: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    def for_stage(self, stage: str, provenance: dict[str, Any]) -> "DerivativesWriter":
        return DerivativesWriter(self.output_dir, self.bids_dir, stage, dict(provenance), [])

    # ------------------------------------------------------------------------ names
    def path(self, **entities: Any) -> Path:
        """The absolute path for a derivative described by BIDS entities.

        Examples
        --------
        >>> w.path(subject="01", space="MNI152NLin2009cAsym", res="2", desc="preproc",
        ...        suffix="T1w", extension=".nii.gz")  # doctest: +SKIP
        PosixPath('/out/sub-01/anat/sub-01_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz')
        """
        from bids.layout.writing import build_path

        ents = {k: str(v) for k, v in entities.items() if v is not None}
        for key, value in ents.items():
            if key not in _FREE_ENTITIES and not _LABEL.match(value):
                raise OutputError(f"invalid BIDS label {key}={value!r}: letters and digits only")
        if not _LABEL.match(ents.get("suffix", "")):
            raise OutputError(f"invalid suffix {ents.get('suffix')!r}")
        patterns = PARTICIPANT_PATTERNS if "subject" in ents else GROUP_PATTERNS
        rel = build_path(ents, patterns, strict=False)
        if rel is None:
            raise OutputError(f"no output pattern fits entities {ents}")
        return self.inside(rel)

    def inside(self, relative: str | Path) -> Path:
        """``output_dir / relative``, refusing anything that would land outside it."""
        root = self.output_dir.resolve()
        target = (root / relative).resolve()
        if not target.is_relative_to(root):
            raise OutputError(f"{relative}: refusing to write outside the output folder {root}")
        return target

    def bids_uri(self, path: Path) -> str:
        """``bids:raw:<relpath>`` for inputs, ``bids::<relpath>`` for this dataset's files."""
        path = Path(path).resolve()
        for prefix, root in (("bids::", self.output_dir.resolve()), ("bids:raw:", self.bids_dir.resolve())):
            if path.is_relative_to(root):
                return prefix + path.relative_to(root).as_posix()
        return path.as_uri()

    # ----------------------------------------------------------------------- writes
    def _record(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def _sidecar(self, sources: Iterable[Path], sidecar: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        srcs = [self.bids_uri(p) for p in sources]
        if srcs:
            out["Sources"] = srcs
        out.update(sidecar or {})
        if self.stage:
            out["GeneratedBy"] = {"Name": "ldae-bids", "Version": __version__, "Stage": self.stage,
                                  **self.provenance}
        return out

    def write_sidecar(self, data_path: Path, sidecar: dict[str, Any] | None = None,
                      sources: Iterable[Path] = ()) -> Path:
        """The JSON sidecar beside ``data_path`` (same name, ``.json``)."""
        name = data_path.name
        for ext in (".nii.gz", ".tsv", ".txt", ".safetensors", ".nii", ".svg", ".png", ".h5"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        side = data_path.with_name(name + ".json")
        return self._record(atomic_write_json(side, self._sidecar(sources, sidecar)))

    def write_nifti(self, img, entities: dict[str, Any], sidecar: dict[str, Any] | None = None,
                    sources: Iterable[Path] = ()) -> Path:
        import nibabel as nib

        path = self.path(**entities, extension=".nii.gz")
        if "res" in entities and "Resolution" not in (sidecar or {}):  # required with res-
            zooms = img.header.get_zooms()[:3]
            sidecar = {**(sidecar or {}), "Resolution": {
                str(entities["res"]): "x".join(f"{z:g}" for z in zooms) + " mm voxels"}}
        self._record(atomic_write(path, lambda tmp: nib.save(img, str(tmp))))
        self.write_sidecar(path, sidecar, sources)
        return path

    def write_tsv(self, table, entities: dict[str, Any], sidecar: dict[str, Any] | None = None,
                  sources: Iterable[Path] = ()) -> Path:
        """Write a pandas DataFrame as a BIDS TSV (``n/a`` for missing values) plus sidecar."""
        path = self.path(**entities, extension=".tsv")
        text = table.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
        self._record(atomic_write_text(path, text))
        self.write_sidecar(path, sidecar, sources)
        return path

    def write_json(self, obj: Any, entities: dict[str, Any]) -> Path:
        return self._record(atomic_write_json(self.path(**entities, extension=".json"), obj))

    def write_text(self, text: str, entities: dict[str, Any], extension: str,
                   sidecar: dict[str, Any] | None = None, sources: Iterable[Path] = ()) -> Path:
        path = self._record(atomic_write_text(self.path(**entities, extension=extension), text))
        if sidecar is not None or sources:
            self.write_sidecar(path, sidecar, sources)
        return path

    def write_file(self, entities: dict[str, Any], extension: str, write) -> Path:
        """Write with any library: ``write(tmp_path)`` then atomic rename."""
        return self._record(atomic_write(self.path(**entities, extension=extension), write))

    def write_figure(self, fig, entities: dict[str, Any], extension: str = ".svg") -> Path:
        """Save a matplotlib figure under ``sub-<label>/figures/`` (or ``group/``) and close it (a pyplot one)."""
        ents = dict(entities)
        if "subject" in ents:
            ents["datatype"] = "figures"
        try:
            return self.write_file(ents, extension, lambda tmp: fig.savefig(tmp, format=extension[1:],
                                                                          bbox_inches="tight"))
        finally:
            if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: drop it from its registry
                import matplotlib.pyplot as plt

                plt.close(fig)

    def remove_written(self) -> None:
        """Roll back: delete what this writer wrote (after a failure)."""
        for p in self.written:
            Path(p).unlink(missing_ok=True)
        self.written.clear()


# --------------------------------------------------------------------- dataset level
@contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """An exclusive lock for read-modify-write of shared top-level files.

    Participant runs of different subjects may write into one output folder at the
    same time (Slurm arrays); they serialise here.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".ldae-bids.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. Lustre mounted without flock: writes stay atomic
            logging.getLogger("ldae_bids").warning("no file locking on %s (%s): going on without it",
                                                   output_dir, exc)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dataset_description(bids_dir: Path, generated_by: list[dict[str, Any]]) -> dict[str, Any]:
    """The derivative ``dataset_description.json`` content."""
    raw_name = "input dataset"
    try:
        raw_name = json.loads((bids_dir / "dataset_description.json").read_text()).get("Name", raw_name)
    except (OSError, json.JSONDecodeError):
        pass
    container = _container()
    main: dict[str, Any] = {"Name": "ldae-bids", "Version": __version__, "CodeURL": CODE_URL}
    if container:
        main["Container"] = container
    return {
        "Name": f"ldae-bids derivatives of {raw_name}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [main, *generated_by],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
        "HowToAcknowledge": "Cite ldae-bids and Lozupone et al., Medical Image Analysis 2026 (arXiv 2504.08635); "
                            "see logs/CITATION-<run id>.md.",
    }


def _container() -> dict[str, str] | None:
    kind = os.environ.get("LDAE_BIDS_CONTAINER")  # set in our container recipes
    if not kind:
        return None
    out = {"Type": kind}
    if os.environ.get("LDAE_BIDS_CONTAINER_TAG"):
        out["Tag"] = os.environ["LDAE_BIDS_CONTAINER_TAG"]
    return out


def update_dataset_description(output_dir: Path, bids_dir: Path, extra: list[dict[str, Any]]) -> Path:
    """Create or update ``dataset_description.json`` under the lock.

    ``extra`` holds GeneratedBy entries for the model bundle and third-party stages;
    entries already present (same Name and Version) are kept once.
    """
    path = output_dir / "dataset_description.json"
    with output_lock(output_dir):
        entries: list[dict[str, Any]] = []
        if path.is_file():
            try:
                entries = json.loads(path.read_text()).get("GeneratedBy", [])[1:]
            except (OSError, json.JSONDecodeError):
                entries = []
        for e in extra:
            if not any(x.get("Name") == e.get("Name") and x.get("Version") == e.get("Version") for x in entries):
                entries.append(e)
        desc = dataset_description(bids_dir, entries)
        if not path.is_file() or json.loads(path.read_text()) != desc:
            atomic_write_json(path, desc)
        ignore = output_dir / ".bidsignore"
        text = "\n".join(BIDSIGNORE) + "\n"
        if not ignore.is_file() or ignore.read_text() != text:
            atomic_write_text(ignore, text)
    return path
