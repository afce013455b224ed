"""The participant runner: batches, out-of-memory back-off, per-subject isolation."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldae_bids.bids.discover import SessionInput, SubjectInput
from ldae_bids.config import build_settings
from ldae_bids.plugins.api import Level, Stage
from ldae_bids.runner import Runner
from ldae_bids.runtime import Resources


def subjects(tmp_path: Path, n: int) -> list[SubjectInput]:
    out = []
    for i in range(1, n + 1):
        label = f"{i:02d}"
        t1w = tmp_path / "bids" / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        t1w.parent.mkdir(parents=True)
        t1w.write_bytes(b"x" * i)
        out.append(SubjectInput(label, (SessionInput(label, None, t1w, {"subject": label}),)))
    return out


class Recorder(Stage):
    """Batchable; writes one file per subject; fails as the class attributes say."""

    name = "rec"
    level = Level.PARTICIPANT
    batchable = True
    calls: list[tuple[str, ...]] = []
    fits = 99          # larger batches raise ``error``
    error: type[BaseException] = MemoryError
    broken: set[str] = set()  # these subjects fail in every call

    def run_batch(self, ctx, units):
        type(self).calls.append(tuple(u.label for u in units))
        if len(units) > self.fits:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        for u in units:
            if u.label in self.broken:
                raise ValueError(f"sub-{u.label}: broken")
        for u in units:
            ctx.writer.write_text(u.label, {"subject": u.label, "datatype": "anat", "desc": "rec",
                                            "suffix": "T1w"}, ".txt")

    def run(self, ctx, unit):
        self.run_batch(ctx, [unit])


def make_runner(tmp_path: Path, stage: type[Stage], batch_size: int) -> Runner:
    (tmp_path / "out").mkdir(exist_ok=True)
    settings = build_settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                              analysis_level="participant", batch_size=batch_size, device="cpu")
    return Runner(settings, [stage], Resources(settings))


def recorder(**attrs) -> type[Recorder]:
    return type("Rec", (Recorder,), {"calls": [], **attrs})


@pytest.mark.parametrize("error", [MemoryError, RuntimeError])
def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(tmp_path, caplog, error):
    stage = recorder(fits=2, error=error)
    runner = make_runner(tmp_path, stage, batch_size=4)
    results = runner.run_participant(subjects(tmp_path, 7))
    assert [r.status for r in results] == ["done"] * 7
    # 4 did not fit -> 2 + 2; the limit stays at 2 for the rest of the run (3 + 1 never tried as 3)
    assert stage.calls == [("01", "02", "03", "04"), ("01", "02"), ("03", "04"), ("05", "06"), ("07",)]
    assert runner.batch_limit == 2
    assert "ran out of memory on a batch of 4" in caplog.text and "batches of 2 from now on" in caplog.text
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("sub-*/anat/*.txt")) == [
        f"sub-{i:02d}_desc-rec_T1w.txt" for i in range(1, 8)]
    # the out-of-memory call shows in the resource log as failed, the retries as done
    statuses = [r["status"] for r in runner.usage.rows]
    assert statuses == ["failed", "done", "done", "done", "done"]


def test_other_errors_isolate_the_subject_without_shrinking_batches(tmp_path):
    stage = recorder(broken={"02"})
    runner = make_runner(tmp_path, stage, batch_size=3)
    results = runner.run_participant(subjects(tmp_path, 5))
    assert [r.status for r in results] == ["done", "failed", "done", "done", "done"]
    assert results[1].error == "ValueError: sub-02: broken" and results[1].crash_file.is_file()
    assert stage.calls == [("01", "02", "03"), ("01",), ("02",), ("03",), ("04", "05")]
    assert runner.batch_limit == 3
    # the failed batch's files were rolled back, then rewritten by the single runs; none for sub-02
    assert not list((tmp_path / "out").glob("sub-02/anat/*"))
    assert len(list((tmp_path / "out").glob("sub-0[1345]/anat/*.txt"))) == 4


def test_out_of_memory_at_batch_one_fails_only_that_subject(tmp_path):
    stage = recorder(fits=0)
    runner = make_runner(tmp_path, stage, batch_size=2)
    results = runner.run_participant(subjects(tmp_path, 2))
    assert [r.status for r in results] == ["failed", "failed"]
    assert stage.calls == [("01", "02"), ("01",), ("02",)]
    assert "MemoryError" in results[0].error


class Writer(Stage):
    """Writes one file per (session, name in ``names``); its version is part of the resume key."""

    name = "writer"
    level = Level.PARTICIPANT
    names: tuple[str, ...] = ("a", "b")

    def run(self, ctx, unit):
        for ses in unit.sessions:
            for n in self.names:
                ctx.writer.write_text(n, {**ses.entities, "datatype": "anat", "desc": n, "suffix": "T1w"}, ".txt")


def test_a_rerun_with_other_settings_removes_what_it_no_longer_writes(tmp_path):
    t1w = {}
    for ses in ("1", "2"):
        t1w[ses] = tmp_path / "bids" / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_T1w.nii.gz"
        t1w[ses].parent.mkdir(parents=True)
        t1w[ses].write_bytes(b"x")
    sessions = {k: SessionInput("01", k, p, {"subject": "01", "session": k}) for k, p in t1w.items()}
    both = SubjectInput("01", (sessions["1"], sessions["2"]))
    out = tmp_path / "out" / "sub-01"

    def files():
        return sorted(p.name for p in out.rglob("*.txt"))

    stage = type("W", (Writer,), {"version": "1", "names": ("a", "b")})
    assert make_runner(tmp_path, stage, 1).run_participant([both])[0].status == "done"
    assert files() == ["sub-01_ses-1_desc-a_T1w.txt", "sub-01_ses-1_desc-b_T1w.txt",
                       "sub-01_ses-2_desc-a_T1w.txt", "sub-01_ses-2_desc-b_T1w.txt"]
    # other settings (here: version), same sessions: 'b' is no longer written, so its old files go
    stage = type("W", (Writer,), {"version": "2", "names": ("a",)})
    assert make_runner(tmp_path, stage, 1).run_participant([both])[0].status == "done"
    assert files() == ["sub-01_ses-1_desc-a_T1w.txt", "sub-01_ses-2_desc-a_T1w.txt"]
    # a run on one session only keeps the other session's files
    stage = type("W", (Writer,), {"version": "3", "names": ("c",)})
    only = SubjectInput("01", (sessions["1"],))
    assert make_runner(tmp_path, stage, 1).run_participant([only])[0].status == "done"
    assert files() == ["sub-01_ses-1_desc-a_T1w.txt", "sub-01_ses-1_desc-c_T1w.txt", "sub-01_ses-2_desc-a_T1w.txt"]


class Synthesiser(Stage):
    """Writes one file into a session folder of its own (like fill-missing-sessions' synthetic visits)."""

    name = "synth"
    level = Level.PARTICIPANT
    session = "M03"

    def run(self, ctx, unit):
        ctx.writer.write_text("x", {"subject": unit.label, "session": self.session, "datatype": "anat",
                                    "desc": "synthetic", "suffix": "T1w"}, ".txt")


def test_a_folder_left_empty_by_the_cleanup_is_removed(tmp_path):
    (subject,) = subjects(tmp_path, 1)
    stage = type("S", (Synthesiser,), {"version": "1", "session": "M03"})
    make_runner(tmp_path, stage, 1).run_participant([subject])
    out = tmp_path / "out" / "sub-01"
    assert (out / "ses-M03" / "anat").is_dir()
    stage = type("S", (Synthesiser,), {"version": "2", "session": "M06"})
    make_runner(tmp_path, stage, 1).run_participant([subject])
    assert sorted(p.name for p in out.iterdir()) == ["ses-M06"]


# ------------------------------------------------------------------------------------------ --mem
def test_mem_parses_sizes_like_fmriprep_and_round_trips_in_the_config(tmp_path):
    from ldae_bids.config import read_config_file
    from ldae_bids.errors import UsageError
    from ldae_bids.memory import parse_memory

    assert [parse_memory(v) for v in ("16GB", "16G", "16gib", "16000MB", "16000", "1.5T", 512)] == [
        16384, 16384, 16384, 16000, 16000, 1572864, 512]
    for bad in ("lots", "16 GBs", "-4GB", "0", "0.5"):
        with pytest.raises(UsageError, match="--mem"):
            parse_memory(bad)
    settings = build_settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                              mem="8GB")
    assert settings.mem_mb == 8192
    path = settings.save(tmp_path / "config.toml")
    again = build_settings(**read_config_file(path))
    assert again.mem_mb == 8192
    # the command line wins over the config file
    assert build_settings(**{**read_config_file(path), "mem": "4000"}).mem_mb == 4000


def mem_runner(tmp_path, stage, batch_size, mem_mb, per_subject_mb):
    tmp_path.mkdir(exist_ok=True)
    runner = make_runner(tmp_path, stage, batch_size)
    runner.settings = runner.settings.replace(mem_mb=mem_mb)
    runner.resources.__dict__["memory_per_subject_mb"] = per_subject_mb  # the estimate, without a bundle
    return runner


def test_mem_caps_the_batch_size_from_the_estimate(tmp_path, caplog, monkeypatch):
    import ldae_bids.runner as runner_mod
    from ldae_bids.memory import BASE_MB

    caplog.set_level("INFO", logger="ldae_bids")
    monkeypatch.setattr(runner_mod, "_peak_rss_mb", lambda: 0.0)
    stage = recorder()
    runner = mem_runner(tmp_path, stage, 8, int(BASE_MB + 250), 100.0)
    results = runner.run_participant(subjects(tmp_path, 5))
    assert [r.status for r in results] == ["done"] * 5
    assert stage.calls == [("01", "02"), ("03", "04"), ("05",)]
    assert "at most 2 subject(s) per batch" in caplog.text
    # a limit the estimate fits in leaves the batch size alone
    stage = recorder()
    runner = mem_runner(tmp_path / "b", stage, 3, int(BASE_MB + 1000), 100.0)
    runner.run_participant(subjects(tmp_path / "b", 3))
    assert stage.calls == [("01", "02", "03")]


def test_mem_estimate_follows_the_precision_the_run_resolves(tmp_path):
    from ldae_bids.memory import estimate_for_bundle, subject_mb
    from ldae_bids.model.bundle import default_bundle_path
    from ldae_bids.runtime import Resources

    fp32, bf16 = subject_mb((80, 96, 80), 16, "fp32"), subject_mb((80, 96, 80), 16, "bf16")
    assert 280 < fp32 < 282 and 168 < bf16 < 170  # benchmarks/results/memory.md: 291 and 145-162 measured
    assert estimate_for_bundle(default_bundle_path(), "bf16")["per_subject_mb"] == bf16
    for precision, expected in (("fp32", fp32), ("bf16", bf16)):
        settings = build_settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                                  device="cpu", precision=precision)
        assert Resources(settings).memory_per_subject_mb == expected
    # latent refinement keeps the decoder's activations for its backward pass: embed then holds the most
    # (benchmarks/results/memory-refine/: 527-561 MiB per subject under bf16)
    refined = subject_mb((80, 96, 80), 16, "bf16", refine=True)
    assert 561 < refined < 600
    settings = build_settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                              device="cpu", precision="bf16", stage_options={"embed": {"refine_latent": "30"}})
    assert Resources(settings).memory_per_subject_mb == refined


def test_a_batch_over_mem_lowers_the_batch_size_and_one_subject_over_it_warns_once(tmp_path, caplog, monkeypatch):
    import ldae_bids.runner as runner_mod
    from ldae_bids.memory import BASE_MB

    stage = recorder()
    # the "measured" peak: 300 MB per subject of the largest call so far (the estimate said 100); like
    # ru_maxrss it never decreases, so the later, smaller batches must not be judged by the first one's peak
    monkeypatch.setattr(runner_mod, "_peak_rss_mb", lambda: BASE_MB + 300.0 * max(len(c) for c in stage.calls))
    runner = mem_runner(tmp_path, stage, 4, int(BASE_MB + 700), 100.0)
    results = runner.run_participant(subjects(tmp_path, 8))
    assert [r.status for r in results] == ["done"] * 8
    # 4 peaked at 1200 MB over the base (limit 700): 300 per subject -> 2 from then on; 2 fit (600)
    assert stage.calls == [("01", "02", "03", "04"), ("05", "06"), ("07", "08")]
    assert "went over --mem" in caplog.text and "batches of 2 from now on" in caplog.text
    caplog.clear()
    stage = recorder()
    runner = mem_runner(tmp_path / "c", stage, 1, int(BASE_MB + 100), 100.0)
    runner.run_participant(subjects(tmp_path / "c", 3))
    assert stage.calls == [("01",), ("02",), ("03",)]
    assert caplog.text.count("with one subject per batch") == 1


def test_target_unit_strengths_take_large_values_and_name_files_without_exponents(tmp_path):
    from ldae_bids.stages.manipulate import strength_label

    s = build_settings(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                       strength_unit="target", strengths=[-150, 0.25, 1e6])
    assert s.strengths == (-150.0, 0.25, 1e6)
    assert [strength_label(a) for a in s.strengths] == ["Minus150", "Plus0p25", "Plus1000000"]
    assert strength_label(-0.5) == "Minus0p5" and strength_label(2.0) == "Plus2"


def test_preflight_runs_once_before_the_first_unit_and_not_when_all_are_done(tmp_path):
    from ldae_bids.errors import MissingInputError

    checks = []

    class Checked(Recorder):
        def preflight(self, ctx):
            checks.append(ctx.stage.name)
            if self.missing:
                raise MissingInputError("template file T.nii.gz not found")

    stage = type("Rec", (Checked,), {"calls": [], "missing": False})
    runner = make_runner(tmp_path, stage, batch_size=2)
    assert [r.status for r in runner.run_participant(subjects(tmp_path, 5))] == ["done"] * 5
    assert checks == ["rec"]  # once, not per batch (three batches ran)
    # a second run with everything done checks nothing, so a run-wide problem cannot block a finished run
    stage.missing = True
    again = make_runner(tmp_path, stage, batch_size=2)
    assert [r.skipped for r in again.run_participant(subjects_again(tmp_path, 5))] == [["rec"]] * 5
    assert checks == ["rec"]
    # with work to do, the failure stops the run before any subject (no per-subject crash files)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    runner = make_runner(fresh, stage, batch_size=2)
    with pytest.raises(MissingInputError, match="T.nii.gz"):
        runner.run_participant(subjects(fresh, 3))
    assert stage.calls == [("01", "02"), ("03", "04"), ("05",)]
    assert not list((fresh / "out").glob("logs/crash-*"))


def subjects_again(tmp_path: Path, n: int) -> list[SubjectInput]:
    """The subjects made by :func:`subjects`, without recreating their files."""
    return [SubjectInput(f"{i:02d}", (SessionInput(f"{i:02d}", None, tmp_path / "bids" / f"sub-{i:02d}" / "anat"
                                                   / f"sub-{i:02d}_T1w.nii.gz", {"subject": f"{i:02d}"}),))
            for i in range(1, n + 1)]


def test_group_preflight_stops_the_run_before_the_stage_loses_its_stamp(tmp_path):
    from ldae_bids.errors import MissingInputError
    from ldae_bids.plugins.api import GroupInput

    class GroupStage(Stage):
        name = "grp"
        level = Level.GROUP
        missing = False
        runs = 0

        def preflight(self, ctx):
            if self.missing:
                raise MissingInputError("needs X")

        def run(self, ctx, unit):
            type(self).runs += 1

    (tmp_path / "out").mkdir()
    settings = build_settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="group",
                              device="cpu")
    group = GroupInput((), tmp_path / "out", {})
    assert [r.status for r in Runner(settings, [GroupStage], Resources(settings)).run_group(group)] == ["done"]
    stamp = Runner(settings, [GroupStage], Resources(settings)).stamps.read("group", "grp")
    GroupStage.missing = True
    forced = build_settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="group",
                            device="cpu", force=True)
    runner = Runner(forced, [GroupStage], Resources(forced))
    with pytest.raises(MissingInputError, match="needs X"):
        runner.run_group(group)
    assert GroupStage.runs == 1 and runner.stamps.read("group", "grp") == stamp  # not run, stamp kept
    assert not list((tmp_path / "out").glob("logs/crash-*"))
