"""What a stage is, and what it is given.

A stage is a class registered in the ``ldae_bids.stages`` entry-point group. Built-in
stages register exactly like third-party ones (see ``plugins/`` for a worked example)::

    [project.entry-points."ldae_bids.stages"]
    my-qc = "my_package.stage:MyQC"

A participant-level stage's :meth:`Stage.run` receives one subject (all its
sessions); a group-level stage receives a :class:`GroupInput`. Stages write
through ``ctx.writer`` and read what earlier stages wrote from the output folder
(``ctx.writer.path(...)``, or the helpers in :mod:`ldae_bids.bids.outputs`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ldae_bids.errors import PluginError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ldae_bids.bids.discover import SubjectInput
    from ldae_bids.bids.writer import DerivativesWriter
    from ldae_bids.config import Settings
    from ldae_bids.runtime import Resources


class Level(str, Enum):
    PARTICIPANT = "participant"
    GROUP = "group"


@dataclass(frozen=True)
class GroupInput:
    """What a group-level stage works on: the selected subjects and the output folder."""

    subjects: tuple["SubjectInput", ...]
    output_dir: Path
    participants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOption:
    """A ``--stage-option STAGE.KEY=VALUE`` that a stage accepts (declared in :attr:`Stage.options`).

    Values stay strings on the command line and in the run's config file; :meth:`parse` checks one and returns
    it as ``kind`` (``str``, ``int`` or ``float``). ``choices`` limits a string to a set (``("yes", "no")`` for a
    switch), ``minimum`` bounds a number. The run checks every given option before the first subject, so a typo or a
    bad value stops it with one line and exit code 64 instead of being ignored.
    """

    help: str
    default: str | None = None
    choices: tuple[str, ...] = ()
    kind: type = str
    minimum: float | None = None

    def parse(self, name: str, value: str | None) -> Any:
        """``value`` (the default when None) as ``kind``; :class:`UsageError` naming ``name`` (STAGE.KEY)."""
        if value is None:
            value = self.default
            if value is None:
                return None
        if self.choices and value not in self.choices:
            raise UsageError(f"--stage-option {name}={value}: give one of {', '.join(self.choices)}")
        if self.kind in (int, float):
            try:
                number = self.kind(value)
            except ValueError:
                what = "a whole number" if self.kind is int else "a number"
                raise UsageError(f"--stage-option {name}={value}: not {what}") from None
            if self.kind is float and not math.isfinite(number):
                raise UsageError(f"--stage-option {name}={value}: not a finite number")
            if self.minimum is not None and number < self.minimum:
                raise UsageError(f"--stage-option {name}={value}: must be at least {self.minimum:g}")
            return number
        return value

    def describe(self) -> str:
        """One line for listings: the help, the values and the default."""
        values = "|".join(self.choices) if self.choices else {int: "N", float: "X"}.get(self.kind, "TEXT")
        default = f", default {self.default}" if self.default not in (None, "") else ""
        return f"{values}{default}: {self.help}"


@dataclass
class StageContext:
    """Everything a stage may use. Heavy resources (device, model) load on first use."""

    settings: "Settings"
    writer: "DerivativesWriter"
    resources: "Resources"
    stage: "Stage"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("ldae_bids"))

    @property
    def device(self):
        """The torch device of this run (auto-selected unless ``--device`` says)."""
        return self.resources.device

    @property
    def model(self):
        """The loaded model bundle (:class:`ldae_bids.model.bundle.ModelBundle`)."""
        return self.resources.model

    @property
    def grid(self):
        """The model's grid (:class:`ldae_bids.preprocessing.Grid`)."""
        return self.resources.grid

    def option(self, key: str, default: str | None = None) -> Any:
        """A ``--stage-option <stage>.<key>=<value>`` for this stage.

        For an option the stage declares (:attr:`Stage.options`) the checked value, as its ``kind``, or its
        declared default; for an undeclared one the raw string, or ``default``."""
        return self.stage.option_value(self.settings, key, default)

    def for_each(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, on up to ``--nprocs`` host threads (at most 8, one per item).

        For the host side of a batch: reading its inputs, writing its outputs and figures. nibabel's gzip,
        the PNG encoder of the SVG figures and numpy release the GIL, so a GPU batch of 8 subjects writes side
        by side instead of one subject after the other (``benchmarks/results/host_io.md``). Raises the first
        error in item order, on threads once every item has finished (the runner rolls back what the stage wrote).
        Figures must use matplotlib's object API (``matplotlib.figure.Figure``), not pyplot.
        """
        items = list(items)
        workers = min(len(items), 8, self.settings.nprocs or os.cpu_count() or 1)
        if workers <= 1:
            return [fn(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix=f"ldae-{self.stage.name}") as pool:
            futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]  # all done (the pool waited); result() raises the first error in order


class Stage:
    """Base class of every analysis stage.

    Class attributes declare the stage; ``run`` does the work.

    Attributes
    ----------
    name : str
        Unique name used on the command line (``--stages NAME``).
    level : Level
        ``participant`` or ``group``.
    version : str
        Bump it when outputs change: a new version re-runs the stage on resume.
    requires : tuple of str
        Stages whose outputs this one reads. At the same level they run first (and are
        added to the run when missing); at participant level for a group stage, their
        outputs must already be in the output folder.
    needs_model : bool
        Whether the stage uses the model bundle (its hash then enters the resume key).
    default : bool
        Whether the stage runs when ``--stages`` is not given.
    batchable : bool
        Whether :meth:`run_batch` handles several subjects at once (GPU batching).
        A batch that raises an out-of-memory error is retried in halves (the smaller size is kept
        for the rest of the run); any other error reruns its subjects one by one with :meth:`run`.
    uses_grid : bool
        Whether outputs depend on the model grid (its definition then enters the resume key).
    uses_precision : bool
        Whether outputs depend on ``--precision`` without the model (it enters the resume key, as it
        does for every stage that ``needs_model``); read it from ``ctx.resources.precision``.
    options : dict of str to StageOption, or None
        The ``--stage-option`` keys the stage reads. When declared, the run refuses unknown keys and bad
        values before it starts (exit 64), ``ldae-bids --list-stages`` lists them, and
        :meth:`StageContext.option` returns checked values. None (the default, for older plugins) accepts
        any key as a string.
    """

    name: ClassVar[str] = ""
    level: ClassVar[Level] = Level.PARTICIPANT
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    needs_model: ClassVar[bool] = False
    default: ClassVar[bool] = True
    batchable: ClassVar[bool] = False
    uses_grid: ClassVar[bool] = False
    uses_precision: ClassVar[bool] = False
    options: ClassVar[dict[str, StageOption] | None] = None

    @classmethod
    def option_value(cls, settings: "Settings", key: str, default: str | None = None) -> Any:
        """The ``--stage-option`` ``key`` of this stage in ``settings``: checked against :attr:`options` when
        the stage declares them (``default`` is then ignored for a declared key), else the raw string."""
        raw = settings.stage_option(cls.name, key)
        declared = (cls.options or {}).get(key)
        if declared is None:
            if cls.options is not None:
                raise PluginError(f"stage {cls.name!r} reads option {key!r}, which its options do not declare")
            return default if raw is None else raw
        return declared.parse(f"{cls.name}.{key}", raw)

    @classmethod
    def check_options(cls, given: dict[str, str]) -> None:
        """Refuse unknown keys and bad values among the options given for this stage (when it declares them)."""
        if cls.options is None:
            return
        for key, value in given.items():
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                raise UsageError(f"--stage-option {cls.name}.{key}={value}: stage {cls.name!r} has no option "
                                 f"{key!r} (its options: {known})")
            cls.options[key].parse(f"{cls.name}.{key}", value)

    def parameters(self, settings: "Settings") -> dict[str, Any]:
        """Settings that change this stage's outputs (enter the resume key and sidecars)."""
        return {}

    def precision_matters(self, settings: "Settings") -> bool:
        """Whether this run's outputs depend on ``--precision``: it then enters the resume key and the sidecars
        (``GeneratedBy.Precision``). Stages that need the model, or declare ``uses_precision``; a stage may narrow
        it by its settings (``preprocess`` with ``--derivatives`` runs no network)."""
        return self.needs_model or self.uses_precision

    def preflight(self, ctx: StageContext) -> None:
        """Check what the whole run needs (a template, a probe file), once, before the first unit to do.

        Raise an :class:`~ldae_bids.errors.LdaeError` to stop the run with its exit code and one
        message, instead of one crash file per subject. Not called when every unit is already done.
        """

    def run(self, ctx: StageContext, unit: "SubjectInput | GroupInput") -> None:
        """Process one subject (participant level) or the group (group level)."""
        raise NotImplementedError

    def run_batch(self, ctx: StageContext, units: Sequence["SubjectInput"]) -> None:
        """Process several subjects at once; the default loops over :meth:`run`."""
        for unit in units:
            self.run(ctx, unit)
