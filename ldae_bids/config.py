"""One settings object per run: built once by the CLI, frozen, passed explicitly.

It is saved to ``<output>/logs/config-<run id>.toml`` so that the run can be repeated
with ``ldae-bids --config-file logs/config-<run id>.toml`` (style.md #1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldae_bids.device import PRECISIONS
from ldae_bids.errors import UsageError

LEVELS = ("participant", "group")
T1W_POLICIES = ("first", "all")


def new_run_id() -> str:
    """A sortable, unique run id: ``20261125-103000_ab12cd34``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on. Paths are absolute."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] = ()
    skip_stages: tuple[str, ...] = ()
    work_dir: Path | None = None
    bids_database_dir: Path | None = None
    derivatives: tuple[Path, ...] = ()
    skip_bids_validation: bool = False
    t1w_policy: str = "first"
    device: str = "auto"
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 (reconstruction 1.7x faster on this project's
    # CPU, SSIM within 0.002 and the same probe metrics: benchmarks/results/precision.md), fp32 elsewhere
    precision: str = "auto"
    nprocs: int | None = None
    omp_nthreads: int | None = None
    batch_size: int | None = None
    mem_mb: int | None = None
    random_seed: int = 0
    stop_on_first_crash: bool = False
    force: bool = False
    reports_only: bool = False
    model: Path | None = None
    ddim_steps: int = 50
    save_xt: bool = True
    targets: tuple[str, ...] = ()
    baseline_features: Path | None = None
    probe: tuple[Path, ...] = ()
    # the shipped model moves the re-encoded age monotonically for 8/8 subjects over -1..1 (6/8 over -2..2, where
    # it saturates at the ends of the training ages), about 14 years per unit strength
    # (benchmarks/results/analyses.md): +-1 already spans most of the adult age range
    strengths: tuple[float, ...] = (-1.0, -0.5, 0.5, 1.0)
    # "alpha": the method's z-scored units x sqrt(d); "target": the change of the probe's prediction, in the
    # target's own units (years for age; log-odds of the class for a classification probe)
    strength_unit: str = "alpha"
    fill_months: tuple[float, ...] = ()
    fill_schedule_months: float | None = None
    session_time: str = "auto"
    stage_options: dict[str, dict[str, str]] = field(default_factory=dict)
    verbose: int = 0
    run_id: str = field(default_factory=new_run_id)

    # ------------------------------------------------------------------ helpers
    @property
    def scratch_dir(self) -> Path:
        """Per-run scratch folder inside the work directory."""
        assert self.work_dir is not None
        return self.work_dir / f"run-{self.run_id}"

    def stage_option(self, stage: str, key: str, default: str | None = None) -> str | None:
        """Read a ``--stage-option STAGE.KEY=VALUE`` given on the command line."""
        return self.stage_options.get(stage, {}).get(key, default)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A TOML-able dict (no None values, paths as strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = _plain(value)
        return out

    def save(self, path: Path) -> Path:
        """Write the settings as TOML (atomically)."""
        import tomli_w

        from ldae_bids.bids.io import atomic_write_bytes

        header = (
            "# ldae-bids run configuration. Repeat this run with:\n"
            f"#   ldae-bids --config-file {path.name} (plus the three positional arguments)\n"
        )
        data = header.encode() + tomli_w.dumps(self.to_dict()).encode()
        atomic_write_bytes(path, data)
        return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


_FIELD_TYPES = {f.name: f for f in fields(Settings)}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into keyword arguments for :func:`build_settings`."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise UsageError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    # a saved config names its own run; a repeat is a new run
    data.pop("run_id", None)
    return data


STRENGTH_UNITS = ("alpha", "target")


def parse_stage_options(items, into: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """``--stage-option STAGE.KEY=VALUE`` items as ``{stage: {key: value}}`` (added to ``into``, a copy)."""
    out = {stage: dict(opts) for stage, opts in (into or {}).items()}
    for item in items:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not (eq and dot and stage and name):
            raise UsageError(f"--stage-option {item!r}: expected STAGE.KEY=VALUE")
        out.setdefault(stage, {})[name] = value
    return out


def build_settings(**kwargs: Any) -> Settings:
    """Normalise and validate raw values (from the CLI and/or a config file)."""
    kw = {k: v for k, v in kwargs.items() if v is not None}
    for name in ("bids_dir", "output_dir", "work_dir", "bids_database_dir", "model", "baseline_features"):
        if name in kw:
            kw[name] = Path(kw[name]).expanduser().absolute()
    for name in ("derivatives", "probe"):
        if name in kw:
            kw[name] = tuple(Path(p).expanduser().absolute() for p in kw[name])
    for name in ("participant_label", "session_label", "stages", "skip_stages", "targets"):
        if name in kw:
            kw[name] = tuple(str(v) for v in kw[name])
    for name in ("strengths", "fill_months"):
        if name in kw:
            kw[name] = tuple(float(v) for v in kw[name])
    if kw.get("strength_unit", "alpha") not in STRENGTH_UNITS:
        raise UsageError(f"--strength-unit {kw['strength_unit']!r}: expected one of {', '.join(STRENGTH_UNITS)}")
    target_unit = kw.get("strength_unit") == "target"
    if target_unit and "strengths" not in kw:
        # the default strengths are alpha values (+-1 spans most of the adult age range): as years they would be
        # +-1 year, an invisible change
        raise UsageError("--strength-unit target needs --strengths in the probe's own units (e.g. --strengths "
                         "-10 10 for ten years younger / older with an age probe)")
    bound = 1e6 if target_unit else 100  # target units can be large (e.g. millilitres)
    for alpha in kw.get("strengths", ()):
        if not math.isfinite(alpha) or abs(alpha) > bound or round(alpha, 2) != alpha:
            raise UsageError(f"--strengths {alpha:g}: expected a number between {-bound:g} and {bound:g} with at "
                             "most two decimals (it names the output files)")
    if "participant_label" in kw:
        kw["participant_label"] = tuple(_strip_prefix(v, "sub-") for v in kw["participant_label"])
    if "session_label" in kw:
        kw["session_label"] = tuple(_strip_prefix(v, "ses-") for v in kw["session_label"])
    for label in kw.get("participant_label", ()) + kw.get("session_label", ()):
        if not label.isalnum():
            raise UsageError(f"invalid label {label!r}: BIDS labels are letters and digits only")
    if kw.get("t1w_policy", "first") not in T1W_POLICIES:
        raise UsageError(f"--t1w-policy must be one of {', '.join(T1W_POLICIES)}")
    if kw.get("device", "auto") not in ("auto", "cpu", "cuda") and not str(kw["device"]).startswith("cuda:"):
        raise UsageError("--device must be auto, cpu, cuda or cuda:N")
    if kw.get("precision", "auto") not in PRECISIONS:
        raise UsageError(f"--precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    if "mem" in kw:  # --mem text (16GB, 16000MB); a config file stores mem_mb
        from ldae_bids.memory import parse_memory

        kw["mem_mb"] = parse_memory(kw.pop("mem"))
    for name in ("nprocs", "omp_nthreads", "batch_size", "mem_mb"):
        if name in kw and int(kw[name]) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if "ddim_steps" in kw and not 1 <= int(kw["ddim_steps"]) <= 1000:
        raise UsageError("--ddim-steps must be between 1 and 1000")
    if kw.get("work_dir") is None:
        kw["work_dir"] = Path(os.environ.get("TMPDIR", "/tmp")).absolute() / "ldae-bids-work"
    return Settings(**kw)


def _strip_prefix(value: str, prefix: str) -> str:
    value = value.strip()
    return value[len(prefix):] if value.startswith(prefix) else value
