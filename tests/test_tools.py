"""``ldae-bids-tools``: list-participants, self-check, boutiques, the lazily mounted train command."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldae_bids.cli.tools import main


def tools(*args) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- list-participants
@pytest.fixture
def dataset(bids_factory):
    return bids_factory({"01": None, "02": ["A"], "03": ["A", "B"], "04": ["B"]})


def test_list_participants_prints_one_label_per_line(dataset, tmp_path, capsys):
    assert tools("list-participants", dataset, "-w", tmp_path / "w") == 0
    assert capsys.readouterr().out == "01\n02\n03\n04\n"


def test_list_participants_through_the_real_entry_point(dataset, tmp_path):
    exe = Path(sys.executable).with_name("ldae-bids-tools")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ldae_bids.cli.tools"]
    proc = subprocess.run(cmd + ["list-participants", str(dataset), "--bids-database-dir", str(tmp_path / "db")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["01", "02", "03", "04"]
    assert (tmp_path / "db" / "layout_index.sqlite").is_file(), "the shared index is built once here"
    line2 = subprocess.run(["sed", "-n", "2p"], input=proc.stdout, capture_output=True, text=True).stdout
    assert line2 == "02\n"


@pytest.mark.parametrize("args, expected", [
    (["--participant-label", "sub-03", "01"], ["01", "03"]),
    (["--participant_label", "02", "04"], ["02", "04"]),
    (["--session-label", "B"], ["03", "04"]),
    (["--session-label", "ses-A", "--participant-label", "02", "03", "04"], ["02", "03"]),
])
def test_list_participants_applies_the_app_selection(dataset, tmp_path, capsys, args, expected):
    assert tools("list-participants", dataset, "-w", tmp_path / "w", *args) == 0
    assert capsys.readouterr().out.split() == expected


def test_list_participants_takes_label_and_filter_files(dataset, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("sub-04\n02\n")
    (tmp_path / "filter.json").write_text(json.dumps({"t1w": {"session": "A"}}))
    assert tools("list-participants", dataset, "-w", tmp_path / "w", "--participant-label-file",
                 tmp_path / "labels.txt") == 0
    assert capsys.readouterr().out.split() == ["02", "04"]
    assert tools("list-participants", dataset, "-w", tmp_path / "w", "--bids-filter-file",
                 tmp_path / "filter.json") == 0
    assert capsys.readouterr().out.split() == ["02", "03"]


def test_list_participants_accepts_and_ignores_the_other_app_options(dataset, tmp_path, capsys):
    """Submit scripts pass the same options to list-participants and to ldae-bids."""
    assert tools("list-participants", dataset, "-w", tmp_path / "w", "--stages", "example-qc", "preprocess",
                 "--nprocs", "4", "--strengths", "-2", "1", "--skip-bids-validation", "-v") == 0
    assert capsys.readouterr().out.split() == ["01", "02", "03", "04"]


@pytest.mark.parametrize("args, code, words", [
    (["--participant-labels", "01"], 64, "No such option"),  # a typo must not silently list everyone
    (["--nprocs", "many"], 64, "--nprocs"),
    (["--participant-label", "99"], 18, "99"),
    (["--session-label", "Z"], 18, "no T1w"),
])
def test_list_participants_errors(dataset, tmp_path, capsys, args, code, words):
    assert tools("list-participants", dataset, "-w", tmp_path / "w", *args) == code
    captured = capsys.readouterr()
    assert captured.out == "" and words in captured.err


def test_list_participants_missing_or_invalid_dataset(tmp_path, capsys):
    assert tools("list-participants", tmp_path / "nope") == 66
    (tmp_path / "empty").mkdir()
    assert tools("list-participants", tmp_path / "empty") == 16


def test_list_participants_never_uses_an_index_of_another_dataset(bids_factory, tmp_path, capsys):
    a = bids_factory({"01": None}, name="a")
    b = bids_factory({"77": None}, name="b")
    db = tmp_path / "db"
    assert tools("list-participants", a, "--bids-database-dir", db) == 0
    assert capsys.readouterr().out.split() == ["01"]
    assert tools("list-participants", b, "--bids-database-dir", db) == 0
    assert capsys.readouterr().out.split() == ["77"]
    # a subject added since the index was built is seen
    (a / "sub-02" / "anat").mkdir(parents=True)
    shutil.copy(next(a.rglob("*_T1w.nii.gz")), a / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    assert tools("list-participants", a, "--bids-database-dir", db) == 0
    assert capsys.readouterr().out.split() == ["01", "02"]


def test_list_participants_validate_flag(dataset, tmp_path, capsys):
    if not (shutil.which("bids-validator-deno") or shutil.which("bids-validator")):
        pytest.skip("bids-validator-deno not installed")
    code = tools("list-participants", dataset, "-w", tmp_path / "w", "--validate")
    # the synthetic images are valid BIDS; the validator may only warn
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------------- self-check
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("self-check tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_self_check_without_model_passes_offline(no_network, capsys):
    pytest.importorskip("deepbet")
    assert tools("self-check", "--no-model") == 0
    out = capsys.readouterr().out
    assert "self-check: all good" in out and "skipped" in out
    assert "template T1w res-02" in out and "deepbet weights" in out and "torch" in out


def test_self_check_names_missing_templates_and_exits_66(tmp_path, monkeypatch, no_network, capsys):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty-tf"))
    assert tools("self-check", "--no-model") == 66
    out = " ".join(capsys.readouterr().out.split())
    assert "missing: template T1w res-02, template mask desc-brain res-02" in out
    assert "TEMPLATEFLOW_HOME" in out


def test_self_check_missing_model_bundle_exits_66(tmp_path, no_network, capsys):
    assert tools("self-check", "--model", tmp_path / "no-bundle") == 66
    assert "missing: model bundle" in " ".join(capsys.readouterr().out.split())


def test_self_check_verifies_a_bundle_and_catches_corruption(tmp_path, no_network):
    torch = pytest.importorskip("torch")
    bundle_mod = pytest.importorskip("ldae_bids.model.bundle")
    from ldae_bids.model.config import preset
    from ldae_bids.model.pipeline import LdaePipeline
    from ldae_bids.selfcheck import MISSING, OK, check_bundle

    torch.manual_seed(0)
    path = tmp_path / "bundle"
    bundle_mod.save_bundle(path, LdaePipeline(preset("tiny")[0]), {"licence": "CC-BY-SA-3.0", "grid": {}},
                           name="tiny-test")
    (check,) = check_bundle(path)
    assert check.status == OK and "tiny-test" in check.detail and "verified" in check.detail
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (check,) = check_bundle(path)
    assert check.status == MISSING and "model.safetensors" in check.detail


def test_self_check_device_hint_in_apptainer_without_nv(monkeypatch):
    torch = pytest.importorskip("torch")
    from ldae_bids.selfcheck import WARN, check_torch

    monkeypatch.setenv("LDAE_BIDS_CONTAINER", "apptainer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    device = [c for c in check_torch() if c.name == "device"][0]
    assert device.status == WARN and "--nv" in device.detail


def test_self_check_names_the_precision_and_weight_layout_auto_picks(monkeypatch):
    torch = pytest.importorskip("torch")
    from ldae_bids import device as dev
    from ldae_bids.selfcheck import check_torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "uses bf16, channels-last weights"), (False, "uses fp32, contiguous weights")):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda native=native: native)
        row = [c for c in check_torch() if c.name == "precision"][0]
        assert expected in row.detail, row.detail


# ------------------------------------------------------------------------------------ boutiques
INFORMATIONAL = {"version", "list_stages"}


@pytest.fixture(scope="module")
def descriptor():
    from ldae_bids.boutiques import build_descriptor

    return build_descriptor()


@pytest.fixture(scope="module")
def cli_params():
    from ldae_bids.boutiques import cli_command

    return {p.name: p for p in cli_command().params}


def test_descriptor_has_every_cli_option(descriptor, cli_params):
    ids = [i["id"] for i in descriptor["inputs"]]
    assert set(ids) == set(cli_params) - INFORMATIONAL
    assert len(ids) == len(set(ids))
    assert set(descriptor["custom"]["informational-options"]) == {"--version", "--list-stages"}
    # positional order of the command line is the CLI's
    assert descriptor["command-line"].split()[:4] == ["ldae-bids", "[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]"]


def test_descriptor_types_flags_and_lists_follow_the_cli(descriptor, cli_params):
    from ldae_bids.config import LEVELS

    by_id = {i["id"]: i for i in descriptor["inputs"]}
    for name, inp in by_id.items():
        param = cli_params[name]
        if param.param_type_name == "argument":
            assert "command-line-flag" not in inp and inp["optional"] is False
        else:
            assert inp["command-line-flag"] in param.opts and inp["command-line-flag"].startswith("--")
            assert inp["optional"] is True
        flag = bool(getattr(param, "is_flag", False) or getattr(param, "count", False))
        assert (inp["type"] == "Flag") == flag, name
        assert inp.get("list", False) == bool(param.multiple), name
    assert by_id["analysis_level"]["value-choices"] == list(LEVELS)
    assert by_id["nprocs"]["type"] == "Number" and by_id["nprocs"]["integer"] is True
    assert by_id["strengths"]["type"] == "Number" and "integer" not in by_id["strengths"] and by_id["strengths"]["list"]
    assert by_id["bids_dir"]["type"] == "File" and by_id["output_dir"]["type"] == "String"
    assert by_id["work_dir"]["command-line-flag"] == "--work-dir"
    assert by_id["skip_bids_validation"]["type"] == "Flag"
    assert by_id["participant_label"]["list"] is True


def test_descriptor_passes_the_schema_checks(descriptor):
    from ldae_bids.boutiques import check_descriptor

    assert check_descriptor(descriptor) == []
    broken = json.loads(json.dumps(descriptor))
    broken["inputs"][0]["id"] = "bad-id"
    broken["inputs"][1]["value-key"] = "[NOT_IN_LINE]"
    broken["inputs"].append(dict(broken["inputs"][2]))
    flag = next(i for i in broken["inputs"] if i["type"] == "Flag")
    flag["list"] = True
    problems = " | ".join(check_descriptor(broken))
    for words in ("bad-id", "not in the command line", "duplicate input id", "cannot be a list"):
        assert words in problems


def test_descriptor_with_the_boutiques_validator(descriptor, tmp_path):
    validator = pytest.importorskip("boutiques.validator", reason="boutiques not installed (pip install boutiques)")
    validator.validate_descriptor(json.loads(json.dumps(descriptor)))
    with_image = json.loads(json.dumps(descriptor))
    with_image["container-image"] = {"type": "singularity", "image": "ldae-bids_0.1.0.sif"}
    validator.validate_descriptor(with_image)


def test_boutiques_command_line_parses_with_the_real_cli(descriptor, tmp_path):
    """A command rendered by bosh (or by the same rules) is accepted by ldae-bids' own parser."""
    from ldae_bids.boutiques import cli_command
    from ldae_bids.cli.argv import expand_argv

    invocation = {"bids_dir": "/data", "output_dir": "/out", "analysis_level": "participant",
                  "participant_label": ["01", "02"], "skip_bids_validation": True, "nprocs": 4,
                  "strengths": [-2, 1.5], "verbose": True, "work_dir": "/work"}
    bosh = shutil.which("bosh")
    if bosh:
        (tmp_path / "d.json").write_text(json.dumps(descriptor))
        (tmp_path / "i.json").write_text(json.dumps(invocation))
        proc = subprocess.run([bosh, "exec", "simulate", str(tmp_path / "d.json"), "-i", str(tmp_path / "i.json")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ldae-bids ")][-1]
    else:  # Boutiques' rules: flag, then the value(s) separated by spaces
        parts = ["ldae-bids"]
        by_id = {i["id"]: i for i in descriptor["inputs"]}
        for inp in descriptor["inputs"]:
            if inp["id"] not in invocation:
                continue
            value = invocation[inp["id"]]
            flag = [inp["command-line-flag"]] if "command-line-flag" in inp else []
            if by_id[inp["id"]]["type"] == "Flag":
                parts += flag
            else:
                parts += flag + [str(v) for v in (value if isinstance(value, list) else [value])]
        line = " ".join(parts)
    argv = expand_argv(shlex.split(line)[1:])
    ctx = cli_command().make_context("ldae-bids", argv)
    assert ctx.params["participant_label"] == ["01", "02"]
    assert ctx.params["strengths"] == [-2.0, 1.5]
    assert ctx.params["nprocs"] == 4 and ctx.params["skip_bids_validation"] is True
    assert str(ctx.params["work_dir"]) == "/work"


def test_boutiques_command_writes_the_descriptor(tmp_path, capsys):
    out = tmp_path / "ldae-bids.json"
    assert tools("boutiques", "-o", out, "--container-image", "ldae-bids_0.1.0.sif") == 0
    desc = json.loads(out.read_text())
    assert desc["container-image"] == {"type": "singularity", "image": "ldae-bids_0.1.0.sif"}
    assert tools("boutiques") == 0
    assert json.loads(capsys.readouterr().out)["name"] == "ldae-bids"
    assert tools("boutiques", "--container-image", "x", "--container-type", "podman") == 64


# ---------------------------------------------------------------------------------- train, misc
def test_train_is_mounted_lazily(capsys):
    import importlib.util

    assert tools("--help") == 0
    out = capsys.readouterr().out
    assert "train" in out and "list-participants" in out and "self-check" in out
    if importlib.util.find_spec("ldae_bids.cli.train") is None:
        pytest.skip("ldae_bids.cli.train not written yet")
    assert tools("train", "--help") == 0
    assert "--preset" in capsys.readouterr().out


def test_train_unavailable_is_a_clear_usage_error(monkeypatch):
    from ldae_bids.cli.tools import load_train_command
    from ldae_bids.errors import UsageError

    monkeypatch.setitem(sys.modules, "ldae_bids.cli.train", None)  # the import fails, as if broken
    cmd = load_train_command()
    assert cmd.name == "train" and "unavailable" in cmd.help
    with pytest.raises(UsageError, match="not available"):
        cmd.main(["/data", "-o", "/x"], standalone_mode=False)


def test_no_arguments_is_a_usage_error(capsys):
    assert tools() == 64
    assert "list-participants" in capsys.readouterr().out


def test_unknown_subcommand_exits_64(capsys):
    assert tools("frobnicate") == 64
