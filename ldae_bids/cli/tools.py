"""``ldae-bids-tools``: helpers around the BIDS App for clusters and containers.

Subcommands:

- ``list-participants BIDS_DIR [ldae-bids options]``: one label per line, for Slurm arrays;
- ``self-check``: what an offline compute node needs is present (the container ``%test``);
- ``boutiques``: the Boutiques descriptor, generated from the ``ldae-bids`` command line;
- ``train``: model training (:mod:`ldae_bids.cli.train`), loaded only when asked for.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from ldae_bids.errors import ExitCode

TRAIN_MODULE = "ldae_bids.cli.train"


class ToolsGroup(TyperGroup):
    """The tools group; ``train`` is imported only when it is listed or invoked."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        if "train" not in names:
            names.append("train")
        return names

    def get_command(self, ctx, cmd_name: str):
        if cmd_name == "train" and "train" not in self.commands:
            self.add_command(load_train_command(), "train")
        return super().get_command(ctx, cmd_name)


def load_train_command():
    """The ``train`` command from :mod:`ldae_bids.cli.train`, or a stub that says why it is absent."""
    try:
        if importlib.util.find_spec(TRAIN_MODULE) is None:
            raise ImportError(f"{TRAIN_MODULE} is not part of this installation")
        from ldae_bids.cli.train import app as train_app

        cmd = typer.main.get_command(train_app)
        cmd.name = "train"
        return cmd
    except Exception as exc:  # a missing module or one that fails to import: say so, do not crash the tools
        reason = f"{type(exc).__name__}: {exc}"
        stub = typer.Typer(add_completion=False)

        @stub.command("train", help=f"Train a model (unavailable: {reason}).", add_help_option=False,
                      context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        def unavailable(ctx: typer.Context) -> None:
            from ldae_bids.errors import UsageError

            raise UsageError(f"'train' is not available ({reason})")

        cmd = typer.main.get_command(stub)
        cmd.name = "train"
        return cmd


app = typer.Typer(cls=ToolsGroup, add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Helpers for ldae-bids: Slurm arrays, container checks, the Boutiques descriptor, training.")


# --------------------------------------------------------------------------- list-participants
@app.command("list-participants", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def list_participants(
    ctx: typer.Context,
    bids_dir: Annotated[Path, typer.Argument(help="The root of the BIDS dataset (first, before any option).")],
    validate: Annotated[bool, typer.Option(
        "--validate", help="Run the BIDS validator first (exit 16 on errors).")] = False,
) -> None:
    """Print the participant labels that have a T1w image, one per line (no 'sub-').

    Takes the options of [bold]ldae-bids[/bold] after BIDS_DIR: the input selection ones
    (--participant-label, --participant-label-file, --session-label, --bids-filter-file,
    --t1w-policy, --config-file) filter the list, --bids-database-dir and -w/--work-dir say where the
    pybids index is cached (built here once, reused by every array task), the others are checked
    and ignored. For a Slurm array::

        ldae-bids-tools list-participants /data --bids-database-dir /db > labels.txt
        sbatch --array=1-$(wc -l < labels.txt) ...   # task: sed -n "${SLURM_ARRAY_TASK_ID}p" labels.txt
    """
    from ldae_bids.bids.discover import check_bids_root, discover, load_layout, run_bids_validator
    from ldae_bids.logging import setup_logging

    settings = _selection_settings(bids_dir, list(ctx.args))
    setup_logging(settings.verbose - 1)  # warnings only by default: stdout carries the labels
    check_bids_root(settings.bids_dir)
    if validate:
        run_bids_validator(settings.bids_dir)
    layout = load_layout(settings)  # never trusts an index built for another folder or subject list
    subjects = discover(settings, layout)
    typer.echo("\n".join(s.label for s in subjects))


SELECTION = ("participant_label", "session_label", "bids_filters", "t1w_policy", "bids_database_dir", "work_dir",
             "verbose")


def _selection_settings(bids_dir: Path, extra: list[str]):
    """Parse ``extra`` with the real ``ldae-bids`` parser and keep the input selection settings."""
    import tempfile

    from ldae_bids.app import read_filter_file, read_label_file
    from ldae_bids.cli.argv import expand_argv
    from ldae_bids.cli.main import app as main_app
    from ldae_bids.config import build_settings, read_config_file

    command = typer.main.get_command(main_app)
    args = expand_argv([str(bids_dir), tempfile.gettempdir(), "participant", *extra])
    with command.make_context("ldae-bids", args) as sub:
        p = sub.params
    options = read_config_file(p["config_file"]) if p.get("config_file") else {}
    labels = list(p.get("participant_label") or options.get("participant_label") or [])
    if p.get("participant_label_file"):
        labels += read_label_file(p["participant_label_file"])
    given = dict(
        participant_label=labels or None, session_label=p.get("session_label") or None,
        t1w_policy=p.get("t1w_policy"), bids_database_dir=p.get("bids_database_dir"),
        work_dir=p.get("work_dir"), verbose=p.get("verbose") or None,
    )
    if p.get("bids_filter_file"):
        given["bids_filters"] = read_filter_file(p["bids_filter_file"])
    merged = {k: v for k, v in options.items() if k in SELECTION}
    merged.update({k: v for k, v in given.items() if v is not None})
    return build_settings(bids_dir=bids_dir, output_dir=Path(tempfile.gettempdir()), analysis_level="participant",
                          **merged)


# ---------------------------------------------------------------------------------- self-check
@app.command("self-check")
def self_check(
    model: Annotated[Optional[Path], typer.Option(
        help="A model bundle folder to check (default: the one shipped with the package).")] = None,
    no_model: Annotated[bool, typer.Option(
        "--no-model", help="Skip the model bundle (an image built before the weights exist).")] = False,
) -> None:
    """Check, offline, what a compute node needs: model bundle, templates, deepbet weights, stages, device.

    Exit 0 when all is there, 66 when something is missing (the table says what and how to fix it).
    """
    from rich.console import Console
    from rich.table import Table

    from ldae_bids.selfcheck import MISSING, OK, SKIPPED, WARN, exit_code, run_checks

    checks = run_checks(model=model, check_model=not no_model)
    colour = {OK: "green", WARN: "yellow", MISSING: "bold red", SKIPPED: "dim"}
    table = Table(title="ldae-bids self-check")
    for col in ("check", "status", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    code = exit_code(checks)
    missing = [c.name for c in checks if c.status == MISSING]
    console.print("self-check: all good" if not missing else f"self-check: missing: {', '.join(missing)}",
                  markup=False)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------- boutiques
@app.command("boutiques")
def boutiques(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the JSON ('-': standard output).")]
    = Path("-"),
    container_image: Annotated[Optional[str], typer.Option(
        help="Container image to record, e.g. ldae-bids_0.1.0.sif or docker.io/ORG/ldae-bids:0.1.0.")] = None,
    container_type: Annotated[str, typer.Option(help="singularity or docker.")] = "singularity",
) -> None:
    """Write the Boutiques descriptor of ldae-bids, generated from its command line."""
    import json

    from ldae_bids.boutiques import build_descriptor, check_descriptor
    from ldae_bids.errors import LdaeError

    desc = build_descriptor(container_image, container_type)
    problems = check_descriptor(desc)
    if problems:  # a CLI change the generator does not handle: a bug, say what
        raise LdaeError("generated descriptor is not valid: " + "; ".join(problems))
    text = json.dumps(desc, indent=2) + "\n"
    if str(output) == "-":
        typer.echo(text, nl=False)
    else:
        from ldae_bids.bids.io import atomic_write_text

        atomic_write_text(output, text)
        typer.echo(f"wrote {output}", err=True)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``ldae-bids-tools``: BIDS exit codes, one-line errors."""
    from ldae_bids.cli.main import _click_errors
    from ldae_bids.errors import LdaeError

    usage_errors, exits = _click_errors()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        app(args=["--help"], prog_name="ldae-bids-tools", standalone_mode=False)
        return ExitCode.USAGE
    try:
        code = app(args=args, prog_name="ldae-bids-tools", standalone_mode=False)
    except exits as exc:
        return int(exc.exit_code)
    except usage_errors as exc:  # click would exit 2: the BIDS spec says 64
        typer.echo(f"ldae-bids-tools: error: {exc.format_message()}", err=True)
        typer.echo("Try 'ldae-bids-tools --help' for help.", err=True)
        return ExitCode.USAGE
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("ldae-bids-tools: interrupted", err=True)
        return 130
    except LdaeError as exc:
        typer.echo(f"ldae-bids-tools: error: {exc.message}", err=True)
        return int(exc.exit_code)
    return int(code) if isinstance(code, int) else ExitCode.OK


if __name__ == "__main__":  # python -m ldae_bids.cli.tools (torchrun -m, containers)
    raise SystemExit(main())
