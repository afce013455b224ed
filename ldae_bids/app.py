"""The BIDS App's run: checks, discovery, stages, reports, summary.

Called by the CLI with a finished :class:`~ldae_bids.config.Settings`; returns the
process exit code.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ldae_bids import __version__
from ldae_bids.config import LEVELS, Settings
from ldae_bids.errors import (ExitCode, MissingInputError, OutputError, UnknownLevelError,
                              UsageError)

log = logging.getLogger("ldae_bids")

CITATION = """\
# Methods boilerplate

Results were produced with ldae-bids {version} (run {run_id}), a BIDS App implementing the Latent
Diffusion Autoencoder (LDAE; Lozupone et al., Medical Image Analysis 2026, arXiv 2504.08635).
T1-weighted images were skull-stripped with deepbet (Fisch et al., 2024), affinely aligned to the
MNI152NLin2009cAsym template (Fonov et al., 2009; from TemplateFlow, Ciric et al., 2022) and resampled
to the model grid; a KL autoencoder and a latent diffusion autoencoder built with MONAI (Cardoso et al.,
2022) gave a semantic code (y_sem) and a stochastic code (x_T, by deterministic DDIM inversion) per image.
Model bundle: {model}. Stages run: {stages}.

The shipped default model was trained on the IXI dataset (brain-development.org/ixi-dataset, CC BY-SA 3.0).
"""


def read_label_file(path: Path) -> list[str]:
    """Participant labels from a text file: one per line, or a TSV with participant_id."""
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the labels file ({exc.strerror})") from None
    if lines and "\t" in lines[0]:
        header = lines[0].split("\t")
        if "participant_id" not in header:
            raise UsageError(f"{path}: TSV labels file without a participant_id column")
        col = header.index("participant_id")
        return [ln.split("\t")[col] for ln in lines[1:]]
    return lines


def read_filter_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: BIDS filter file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: BIDS filter file is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: BIDS filter file must hold a JSON object")
    return data


def print_stages() -> None:
    from rich.console import Console
    from rich.table import Table

    from ldae_bids.plugins.registry import Registry

    table = Table(title="Installed ldae-bids stages")
    for col in ("stage", "level", "version", "default", "requires", "package", "description"):
        table.add_column(col)
    options = []
    for info in Registry().info():
        if info.error:
            table.add_row(info.name, "?", "?", "", "", f"{info.distribution} {info.dist_version}",
                          f"[red]BROKEN: {info.error}[/red]")
        else:
            table.add_row(info.name, info.level, info.version, "yes" if info.default else "no",
                          ", ".join(info.requires), f"{info.distribution} {info.dist_version}", info.description)
            options += [(f"{info.name}.{key}", text) for key, text in info.options]
    console = Console()
    console.print(table)
    if options:
        opts = Table(title="Stage options (--stage-option STAGE.KEY=VALUE)")
        opts.add_column("option")
        opts.add_column("values, default: meaning")
        for row in options:
            opts.add_row(*row)
        console.print(opts)


def _check_output(settings: Settings) -> None:
    out = settings.output_dir
    if out.resolve() == settings.bids_dir.resolve():
        raise UsageError("the output folder must not be the BIDS input folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # unique across hosts and containers
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output ({exc.strerror or exc})") from None
    if settings.work_dir is not None:
        try:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{settings.work_dir}: cannot create the work folder ({exc.strerror})") from None


def main_run(settings: Settings) -> int:
    """Run one analysis level; return the exit code."""
    from ldae_bids.logging import setup_logging

    if settings.analysis_level not in LEVELS:
        raise UnknownLevelError(f"unknown analysis level {settings.analysis_level!r}: use participant or group")
    if not settings.bids_dir.exists():
        raise MissingInputError(f"{settings.bids_dir}: BIDS folder does not exist")
    _check_output(settings)
    setup_logging(settings.verbose, settings.output_dir / "logs" / f"ldae-bids-{settings.run_id}.log")
    log.info("ldae-bids %s, run %s, %s level", __version__, settings.run_id, settings.analysis_level)

    from ldae_bids.bids.discover import check_bids_root, discover, load_layout, run_bids_validator

    check_bids_root(settings.bids_dir)
    if not settings.skip_bids_validation and settings.analysis_level == "participant":
        run_bids_validator(settings.bids_dir)

    from ldae_bids.device import set_threads
    from ldae_bids.plugins.registry import Registry
    from ldae_bids.runtime import Resources

    set_threads(settings.nprocs, settings.omp_nthreads)
    registry = Registry()
    registry.check_options(settings.stage_options)
    plan = [] if settings.reports_only else registry.plan(settings.analysis_level, settings.stages,
                                                           settings.skip_stages)
    log.info("stages: %s", ", ".join(s.name for s in plan) or "none")
    layout = load_layout(settings)
    subjects = discover(settings, layout)
    log.info("%d subject(s), %d image(s)", len(subjects), sum(len(s.sessions) for s in subjects))

    resources = Resources(settings)
    if any(s.needs_model for s in plan):
        _ = resources.model_hash  # fail early, before any subject, if the bundle is missing
    settings.save(settings.output_dir / "logs" / f"config-{settings.run_id}.toml")
    _record_dataset(settings, plan, registry, resources)

    from ldae_bids.runner import Runner

    dist_of = {s.name: registry.distribution(s.name) for s in plan}
    runner = Runner(settings, plan, resources, dist_of)
    if settings.analysis_level == "participant":
        results = _run_participants(runner, subjects)
    else:
        from ldae_bids.bids.discover import read_tsv_rows
        from ldae_bids.plugins.api import GroupInput

        participants = read_tsv_rows(settings.bids_dir / "participants.tsv", "participant_id")
        results = runner.run_group(GroupInput(tuple(subjects), settings.output_dir, participants))
    usage = runner.usage.write()
    if usage is not None:
        log.info("seconds and peak memory per stage: %s", usage)
    _reports(settings, subjects)
    _summary(results)
    failed = [r for r in results if r.status == "failed"]
    if not failed:
        return ExitCode.OK
    if settings.analysis_level == "group":  # e.g. 66 when the participant outputs are missing
        return failed[0].exit_code
    return ExitCode.SUBJECT_FAILED


def _run_participants(runner, subjects):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as progress:
        return runner.run_participant(subjects, progress)


def _record_dataset(settings: Settings, plan, registry, resources) -> None:
    from ldae_bids.bids.io import atomic_write_text
    from ldae_bids.bids.writer import update_dataset_description

    extra = []
    model_desc = "none"
    if any(s.needs_model for s in plan):
        extra.append({"Name": f"model bundle {resources.model_name}", "Version": resources.model_hash,
                      "Description": f"LDAE model bundle, sha256 content hash {resources.model_hash}"})
        model_desc = f"{resources.model_name} (sha256 {resources.model_hash})"
    for stage in plan:
        dist, version = registry.distribution(stage.name)
        if dist != "ldae-bids":
            extra.append({"Name": dist, "Version": version, "Description": f"ldae-bids stage plugin '{stage.name}'"})
    update_dataset_description(settings.output_dir, settings.bids_dir, extra)
    atomic_write_text(settings.output_dir / "logs" / f"CITATION-{settings.run_id}.md",
                      CITATION.format(version=__version__, run_id=settings.run_id, model=model_desc,
                                      stages=", ".join(s.name for s in plan) or "none"))


def _reports(settings: Settings, subjects) -> None:
    from ldae_bids.reports import write_group_report, write_subject_report

    if settings.analysis_level == "participant":
        for s in subjects:
            try:
                write_subject_report(settings, s)
            except OSError as exc:
                log.error("%s: report not written (%s)", s.key, exc)
    else:
        write_group_report(settings)


def _summary(results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ldae-bids summary")
    for col in ("unit", "status", "stages run", "skipped (up to date)", "s", "error / crash file"):
        table.add_column(col)
    colour = {"done": "green", "skipped": "cyan", "failed": "red"}
    for r in results:
        err = f"{r.failed_stage}: {r.error} ({r.crash_file})" if r.failed_stage else ""
        table.add_row(r.unit, f"[{colour[r.status]}]{r.status}[/]", ", ".join(r.done), ", ".join(r.skipped),
                      f"{r.seconds:.1f}", err)
    Console(stderr=True).print(table)
    n = {k: sum(r.status == k for r in results) for k in colour}
    log.info("%d done, %d skipped, %d failed", n["done"], n["skipped"], n["failed"])
