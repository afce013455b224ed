"""``ldae-bids BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

Parsing and validation only; the work happens in :mod:`ldae_bids.app`. Heavy
libraries are imported there, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ldae_bids import __version__
from ldae_bids.errors import ExitCode

app = typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

INPUT = "Input selection"
RUN = "Run control"
PERF = "Performance"
MODEL = "Model and analyses"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldae-bids {__version__}")
        raise typer.Exit(0)


def _list_stages(value: bool) -> None:
    if value:
        from ldae_bids.app import print_stages

        print_stages()
        raise typer.Exit(0)


@app.command()
def run(
    bids_dir: Annotated[Path, typer.Argument(help="The root of the BIDS dataset (may be read-only).")],
    output_dir: Annotated[Path, typer.Argument(help="Where the derivatives go (created if missing).")],
    analysis_level: Annotated[str, typer.Argument(help="participant or group.", metavar="{participant,group}")],
    participant_label: Annotated[Optional[list[str]], typer.Option(
        "--participant-label", help="Subjects to process, space separated, with or without 'sub-'.",
        rich_help_panel=INPUT)] = None,
    participant_label_file: Annotated[Optional[Path], typer.Option(
        help="A text file of participant labels (one per line, or a TSV with participant_id).",
        rich_help_panel=INPUT)] = None,
    session_label: Annotated[Optional[list[str]], typer.Option(
        "--session-label", help="Sessions to process, with or without 'ses-'.", rich_help_panel=INPUT)] = None,
    bids_filter_file: Annotated[Optional[Path], typer.Option(
        help="JSON of pybids filters for the T1w query, e.g. {\"t1w\": {\"acquisition\": \"mprage\"}}.",
        rich_help_panel=INPUT)] = None,
    t1w_policy: Annotated[Optional[str], typer.Option(
        help="Several T1w in a session: 'first' (no acq/rec, lowest run) or 'all'.", rich_help_panel=INPUT)] = None,
    derivatives: Annotated[Optional[list[Path]], typer.Option(
        "--derivatives", help="sMRIPrep/fMRIPrep outputs to use instead of preprocessing.",
        rich_help_panel=INPUT)] = None,
    skip_bids_validation: Annotated[bool, typer.Option(
        "--skip-bids-validation", help="Do not run the BIDS validator on the input.", rich_help_panel=INPUT)] = False,
    bids_database_dir: Annotated[Optional[Path], typer.Option(
        help="Where to cache the pybids index (default: inside the work dir).", rich_help_panel=INPUT)] = None,
    stages: Annotated[Optional[list[str]], typer.Option(
        "--stages", help="Stages to run (default: the level's default stages). See --list-stages.",
        rich_help_panel=RUN)] = None,
    skip_stages: Annotated[Optional[list[str]], typer.Option(
        "--skip-stages", help="Default stages to leave out.", rich_help_panel=RUN)] = None,
    work_dir: Annotated[Optional[Path], typer.Option(
        "-w", "--work-dir", help="Scratch folder (default: $TMPDIR/ldae-bids-work).", rich_help_panel=RUN)] = None,
    config_file: Annotated[Optional[Path], typer.Option(
        help="A TOML settings file, e.g. logs/config-<run id>.toml of an earlier run; options given "
             "on the command line win.", rich_help_panel=RUN)] = None,
    stop_on_first_crash: Annotated[bool, typer.Option(
        "--stop-on-first-crash", help="Stop at the first failing subject (default: go on).",
        rich_help_panel=RUN)] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo subjects whose outputs are up to date.",
                                        rich_help_panel=RUN)] = False,
    reports_only: Annotated[bool, typer.Option("--reports-only", help="Only rebuild the HTML reports.",
                                               rich_help_panel=RUN)] = False,
    stage_option: Annotated[Optional[list[str]], typer.Option(
        "--stage-option", help="A plugin stage's option as STAGE.KEY=VALUE.", rich_help_panel=RUN)] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output (-vv: debug).",
                                         rich_help_panel=RUN)] = 0,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=PERF)] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="Arithmetic of the model and of brain extraction: auto (bf16 on a GPU and on CPUs with native bf16, "
             "fp32 elsewhere), fp32 or bf16.",
        rich_help_panel=PERF)] = None,
    nprocs: Annotated[Optional[int], typer.Option(help="CPU threads to use.", rich_help_panel=PERF)] = None,
    omp_nthreads: Annotated[Optional[int], typer.Option(help="Threads per process (default: --nprocs).",
                                                        rich_help_panel=PERF)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Subjects per batch (default: 8 on a GPU, 1 on the CPU).", rich_help_panel=PERF)] = None,
    mem: Annotated[Optional[str], typer.Option(
        "--mem", "--mem-mb", "--mem_mb", help="Host memory the run may use, e.g. 16GB or 16000MB (a bare number is "
        "MB): caps the subjects per batch; a batch that goes over it lowers the batch size for the rest of the run.",
        rich_help_panel=PERF)] = None,
    random_seed: Annotated[Optional[int], typer.Option(help="Seed for everything random.",
                                                       rich_help_panel=PERF)] = None,
    model: Annotated[Optional[Path], typer.Option(
        help="A model bundle folder (default: the one shipped with the package).", rich_help_panel=MODEL)] = None,
    ddim_steps: Annotated[Optional[int], typer.Option(help="DDIM steps for inversion and decoding.",
                                                      rich_help_panel=MODEL)] = None,
    save_xt: Annotated[Optional[bool], typer.Option(
        "--save-xt/--no-save-xt", help="Also compute x_T by DDIM inversion in embed (default: yes; needed by "
        "reconstruct, manipulate and fill-missing-sessions).", rich_help_panel=MODEL)] = None,
    targets: Annotated[Optional[list[str]], typer.Option(
        "--targets", help="participants.tsv/sessions.tsv columns to probe (group level).",
        rich_help_panel=MODEL)] = None,
    baseline_features: Annotated[Optional[Path], typer.Option(
        help="A TSV of classical features (participant_id + columns) as a probe baseline.",
        rich_help_panel=MODEL)] = None,
    probe: Annotated[Optional[list[Path]], typer.Option(
        "--probe", help="Saved probe(s) to manipulate along (default: group/*_probe.json).",
        rich_help_panel=MODEL)] = None,
    strengths: Annotated[Optional[list[float]], typer.Option(
        "--strengths", help="Manipulation strengths, in --strength-unit, for every probe (default -1 -0.5 0.5 1 "
        "with alpha; required with target).",
        rich_help_panel=MODEL)] = None,
    strength_unit: Annotated[Optional[str], typer.Option(
        help="Units of --strengths: alpha (the method's: z-scored y_sem units x sqrt(d)) or target (the change of "
             "the probe's prediction: e.g. years for age, log-odds for a two-class probe).", rich_help_panel=MODEL)] = None,
    fill_months: Annotated[Optional[list[float]], typer.Option(
        "--fill-months", help="Times (months from the first session) of visits to synthesise.",
        rich_help_panel=MODEL)] = None,
    fill_schedule_months: Annotated[Optional[float], typer.Option(
        help="Synthesise every missing visit of this schedule (e.g. 6).", rich_help_panel=MODEL)] = None,
    session_time: Annotated[Optional[str], typer.Option(
        help="Session times from: auto, acq_time, age, label.", rich_help_panel=MODEL)] = None,
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    list_stages: Annotated[Optional[bool], typer.Option(
        "--list-stages", callback=_list_stages, is_eager=True,
        help="List the installed stages (level, version, package) and exit.")] = None,
) -> None:
    """Latent Diffusion Autoencoder codes, reconstructions, counterfactuals and probes for T1w MRI.

    Participant level: preprocess each T1w, encode it (y_sem, x_T), reconstruct, manipulate and fill
    missing sessions. Group level: train linear probes on the codes and write the group report.
    """
    from ldae_bids.app import main_run
    from ldae_bids.config import build_settings, parse_stage_options, read_config_file

    options = read_config_file(config_file) if config_file else {}
    labels = list(participant_label or [])
    if participant_label_file:
        from ldae_bids.app import read_label_file

        labels += read_label_file(participant_label_file)
    stage_opts = parse_stage_options(stage_option or [], options.pop("stage_options", {}))
    cli = dict(
        bids_dir=bids_dir, output_dir=output_dir, analysis_level=analysis_level,
        participant_label=labels or None, session_label=session_label, t1w_policy=t1w_policy,
        derivatives=derivatives, skip_bids_validation=skip_bids_validation or None,
        bids_database_dir=bids_database_dir, stages=stages, skip_stages=skip_stages, work_dir=work_dir,
        stop_on_first_crash=stop_on_first_crash or None, force=force or None, reports_only=reports_only or None,
        verbose=verbose or None, device=device, precision=precision, nprocs=nprocs, omp_nthreads=omp_nthreads,
        batch_size=batch_size,
        mem=mem, random_seed=random_seed, model=model, ddim_steps=ddim_steps, save_xt=save_xt, targets=targets,
        baseline_features=baseline_features, probe=probe, strengths=strengths, strength_unit=strength_unit,
        fill_months=fill_months,
        fill_schedule_months=fill_schedule_months, session_time=session_time,
        stage_options=stage_opts or None,
    )
    if bids_filter_file:
        from ldae_bids.app import read_filter_file

        cli["bids_filters"] = read_filter_file(bids_filter_file)
    merged = {**options, **{k: v for k, v in cli.items() if v is not None}}
    raise typer.Exit(main_run(build_settings(**merged)))


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and exit classes of click and of typer's vendored copy of it."""
    import importlib

    usage, exits = [], [typer.Exit]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.UsageError)
        if hasattr(mod, "Exit"):
            exits.append(mod.Exit)
    return tuple(usage), tuple(exits)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: BIDS exit codes, one-line errors."""
    from ldae_bids.cli.argv import expand_argv
    from ldae_bids.errors import LdaeError

    usage_errors, exits = _click_errors()
    args = expand_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=args, prog_name="ldae-bids", standalone_mode=False)
    except exits as exc:
        return int(exc.exit_code)
    except usage_errors as exc:  # click would exit 2: the BIDS spec says 64
        typer.echo(f"ldae-bids: error: {exc.format_message()}", err=True)
        typer.echo("Try 'ldae-bids --help' for help.", err=True)
        return ExitCode.USAGE
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("ldae-bids: interrupted", err=True)
        return 130
    except LdaeError as exc:
        typer.echo(f"ldae-bids: error: {exc.message}", err=True)
        return int(exc.exit_code)
    except Exception as exc:  # a bug: one line for the user, the traceback in a file
        import tempfile
        import traceback

        fd, path = tempfile.mkstemp(prefix="ldae-bids-crash-", suffix=".txt")
        with open(fd, "w") as fh:
            fh.write("".join(traceback.format_exception(exc)))
        typer.echo(f"ldae-bids: internal error: {type(exc).__name__}: {exc} (traceback in {path})", err=True)
        return ExitCode.SUBJECT_FAILED
    return int(code) if isinstance(code, int) else ExitCode.OK
