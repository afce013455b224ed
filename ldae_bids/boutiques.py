"""A Boutiques descriptor of ``ldae-bids``, generated from the CLI itself.

The inputs are read from the click parameters of :mod:`ldae_bids.cli.main`, so the
descriptor cannot drift from the command line: a new option appears here the moment
it is added there. ``ldae-bids-tools boutiques`` writes it.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "0.5"
#: Eager options that print something and exit: not part of a run's interface.
INFORMATIONAL = ("version", "list_stages")
#: Path arguments the app creates (a Boutiques "String"); other paths are inputs ("File").
CREATED_PATHS = ("output_dir", "work_dir", "bids_database_dir")


def _choices() -> dict[str, list[str]]:
    from ldae_bids.config import LEVELS, T1W_POLICIES
    from ldae_bids.device import PRECISIONS

    return {"analysis_level": list(LEVELS), "t1w_policy": list(T1W_POLICIES), "precision": list(PRECISIONS)}


def cli_command():
    """The click command behind ``ldae-bids``."""
    import typer

    from ldae_bids.cli.main import app

    return typer.main.get_command(app)


def param_kind(param) -> tuple[str, bool]:
    """``(base, is_list)`` of a click parameter, base one of bool, int, float, path, str.

    Works with click ``ParamType``\\ s (older typer, click itself) and with the type
    descriptors of typer's vendored click.
    """
    ptype = getattr(param, "type", None)
    is_list = bool(getattr(param, "multiple", False)) or (getattr(param, "nargs", 1) not in (1, None))
    if ptype is not None and hasattr(ptype, "convert"):
        names = {"boolean": "bool", "integer": "int", "float": "float", "path": "path"}
        return names.get(getattr(ptype, "name", ""), "str"), is_list
    desc = getattr(param, "type_descriptor", None)
    annotation = getattr(desc, "annotation", str)
    while typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple, set):
        is_list = True
        annotation = typing.get_args(annotation)[0]
    if inspect.isclass(annotation):
        for base, name in ((bool, "bool"), (int, "int"), (float, "float"), (Path, "path")):
            if issubclass(annotation, base):
                return name, is_list
    return "str", is_list


def is_flag(param) -> bool:
    """A switch that takes no value (``--force``; ``-v`` counts)."""
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def long_flag(param) -> str:
    """The option's long spelling (``--work-dir`` rather than ``-w``)."""
    opts = list(param.opts)
    return next((o for o in opts if o.startswith("--")), opts[0])


def value_key(param) -> str:
    return f"[{param.name.upper()}]"


def _input(param, choices: dict[str, list[str]], group: dict[str, list[str]]) -> dict[str, Any]:
    base, is_list = param_kind(param)
    name = param.name
    help_text = (getattr(param, "help", None) or "").strip()
    entry: dict[str, Any] = {"id": name, "name": name.replace("_", " ").capitalize(), "value-key": value_key(param)}
    if help_text:
        entry["description"] = help_text
    if is_flag(param):
        entry["type"] = "Flag"
        entry["command-line-flag"] = long_flag(param)
        if getattr(param, "count", False):
            entry["description"] = help_text + " (repeat -v for more; the descriptor gives one level)"
    else:
        if base in ("int", "float"):
            entry["type"] = "Number"
            if base == "int":
                entry["integer"] = True
        elif base == "path":
            entry["type"] = "String" if name in CREATED_PATHS else "File"
        else:
            entry["type"] = "String"
        if is_list:
            entry["list"] = True
        if name in choices:
            entry["value-choices"] = choices[name]
        if param.param_type_name == "option":
            entry["command-line-flag"] = long_flag(param)
    entry["optional"] = not param.required
    panel = getattr(param, "rich_help_panel", None)
    if panel:
        group.setdefault(panel, []).append(name)
    return entry


def build_descriptor(container_image: str | None = None, container_type: str = "singularity") -> dict[str, Any]:
    """The Boutiques descriptor (schema 0.5) of ``ldae-bids``.

    Parameters
    ----------
    container_image : str, optional
        Image name to record (e.g. ``ldae-bids.sif`` or ``docker.io/org/ldae-bids:0.1.0``).
    container_type : str
        ``singularity`` or ``docker``.

    Returns
    -------
    dict
        JSON-ready descriptor.
    """
    from ldae_bids import __version__
    from ldae_bids.bids.writer import CODE_URL
    from ldae_bids.errors import ExitCode

    cmd = cli_command()
    choices = _choices()
    groups: dict[str, list[str]] = {}
    params = [p for p in cmd.params if p.name not in INFORMATIONAL and not getattr(p, "hidden", False)]
    inputs = [_input(p, choices, groups) for p in params]
    description = inspect.cleandoc(cmd.help or "").split("\n\n")[0].replace("\n", " ")
    desc: dict[str, Any] = {
        "name": "ldae-bids",
        "tool-version": __version__,
        "schema-version": SCHEMA_VERSION,
        "author": "ldae-bids developers",
        "url": CODE_URL,
        "description": description,
        "command-line": " ".join(["ldae-bids"] + [value_key(p) for p in params]),
        "inputs": inputs,
        "groups": [{"id": _group_id(title), "name": title, "members": members} for title, members in groups.items()],
        "output-files": [
            {"id": "dataset_description", "name": "Derivatives description",
             "description": "BIDS-Derivatives dataset_description.json of the output folder",
             "path-template": "[OUTPUT_DIR]/dataset_description.json", "optional": False},
            {"id": "logs", "name": "Run logs",
             "description": "Run configuration (config-<run id>.toml), log, citation boilerplate, crash files, "
                            "resume stamps",
             "path-template": "[OUTPUT_DIR]/logs", "optional": True},
        ],
        "error-codes": [{"code": int(c), "description": _exit_text(c)} for c in ExitCode if c != ExitCode.OK],
        "suggested-resources": {"cpu-cores": 4, "ram": 16, "walltime-estimate": 3600},
        "tags": {"domain": ["neuroinformatics", "mri", "bids-app", "deep-learning"]},
        "custom": {
            "generated-by": f"ldae-bids-tools boutiques (ldae-bids {__version__})",
            "bids-app": True,
            "informational-options": [long_flag(p) for p in cmd.params if p.name in INFORMATIONAL],
        },
    }
    if container_image:
        if container_type not in ("singularity", "docker"):
            from ldae_bids.errors import UsageError

            raise UsageError("--container-type must be singularity or docker")
        desc["container-image"] = {"type": container_type, "image": container_image}
    return desc


def _group_id(title: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in title.lower()).strip("_")


def _exit_text(code) -> str:
    return {
        1: "one or more subjects (or group stages) failed; see the summary table and logs/crash-*.txt",
        16: "invalid BIDS input",
        17: "unknown analysis level",
        18: "the participant labels or filters matched nothing",
        64: "usage error (bad option or value)",
        65: "an input image is unusable",
        66: "missing input (BIDS folder, model bundle, template)",
        73: "the output folder cannot be created or written",
        75: "temporary failure; try again",
    }.get(int(code), code.name.replace("_", " ").lower())


def check_descriptor(desc: dict[str, Any]) -> list[str]:
    """Structural checks of a descriptor (what the Boutiques validator checks first).

    Used when the ``boutiques`` package is not installed. Returns the problems found.
    """
    problems: list[str] = []
    for key in ("name", "description", "command-line", "schema-version", "inputs", "tool-version"):
        if key not in desc:
            problems.append(f"missing required property {key!r}")
    if desc.get("schema-version") != SCHEMA_VERSION:
        problems.append(f"schema-version must be {SCHEMA_VERSION!r}")
    ids: set[str] = set()
    keys: set[str] = set()
    line = desc.get("command-line", "")
    for inp in desc.get("inputs", []):
        iid = inp.get("id", "")
        if not iid or not all(ch.isalnum() or ch == "_" for ch in iid):
            problems.append(f"input id {iid!r}: letters, digits and underscores only")
        if iid in ids:
            problems.append(f"duplicate input id {iid!r}")
        ids.add(iid)
        if inp.get("type") not in ("String", "File", "Flag", "Number"):
            problems.append(f"{iid}: type {inp.get('type')!r} is not String, File, Flag or Number")
        if not inp.get("name"):
            problems.append(f"{iid}: no name")
        vk = inp.get("value-key")
        if vk:
            if vk in keys:
                problems.append(f"{iid}: duplicate value-key {vk}")
            keys.add(vk)
            if vk not in line:
                problems.append(f"{iid}: value-key {vk} not in the command line")
        if inp.get("type") == "Flag":
            if not inp.get("command-line-flag"):
                problems.append(f"{iid}: a Flag needs a command-line-flag")
            if inp.get("list") or "value-choices" in inp:
                problems.append(f"{iid}: a Flag cannot be a list or have value-choices")
        if "integer" in inp and inp.get("type") != "Number":
            problems.append(f"{iid}: 'integer' only applies to Number inputs")
        if not isinstance(inp.get("optional", True), bool):
            problems.append(f"{iid}: optional must be a boolean")
    for group in desc.get("groups", []):
        for member in group.get("members", []):
            if member not in ids:
                problems.append(f"group {group.get('id')}: unknown member {member!r}")
    for out in desc.get("output-files", []):
        if not out.get("id") or not out.get("path-template"):
            problems.append(f"output {out!r}: id and path-template required")
    return problems
