"""Runs the planned stages over the selected subjects (participant) or the group.

Failures are contained: a subject whose stage raises is rolled back (the files that
stage wrote are removed), gets a crash file with the traceback under ``logs/``, and
the run goes on with the other subjects unless ``--stop-on-first-crash``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldae_bids import __version__
from ldae_bids.bids.discover import SubjectInput
from ldae_bids.bids.io import atomic_write_text
from ldae_bids.bids.writer import DerivativesWriter
from ldae_bids.config import Settings
from ldae_bids.errors import LdaeError
from ldae_bids.memory import peak_rss_mb as _peak_rss_mb
from ldae_bids.plugins.api import GroupInput, Stage, StageContext
from ldae_bids.runtime import Resources
from ldae_bids.state import StampStore, digest, make_key

log = logging.getLogger("ldae_bids")


@dataclass
class UnitResult:
    unit: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed_stage: str | None = None
    error: str | None = None
    crash_file: Path | None = None
    seconds: float = 0.0
    exit_code: int = 1

    @property
    def status(self) -> str:
        if self.failed_stage:
            return "failed"
        return "done" if self.done else "skipped"


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means a batch did not fit (CUDA or host memory)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_device_cache() -> None:
    cuda = UsageLog._cuda()  # the same "torch loaded and CUDA in use" test as the memory log
    if cuda is not None:
        cuda.empty_cache()


class UsageLog:
    """Seconds and peak memory of every stage call of a run, written to ``logs/resources-<run id>.tsv``.

    ``peak_rss_mb`` is the process's peak so far (it never decreases: the stage that raises it is the
    one that needed it); ``peak_gpu_mb`` is the CUDA allocator's peak during the call (reset before it).
    """

    COLUMNS = ("unit", "stage", "n_subjects", "seconds", "seconds_per_subject", "peak_rss_mb", "peak_gpu_mb",
               "status")

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    @contextlib.contextmanager
    def measure(self, stage: str, units: Sequence[str]):
        cuda = self._cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        row = {"unit": ",".join(units), "stage": stage, "n_subjects": len(units), "status": "done"}
        t0 = time.perf_counter()
        try:
            yield row
        except BaseException:
            row["status"] = "failed"
            raise
        finally:
            secs = time.perf_counter() - t0
            row.update(seconds=round(secs, 3), seconds_per_subject=round(secs / max(1, len(units)), 3),
                       peak_rss_mb=round(_peak_rss_mb(), 1),
                       peak_gpu_mb=round(cuda.max_memory_allocated() / 2**20, 1) if cuda is not None else "n/a")
            self.rows.append(row)

    @staticmethod
    def _cuda():
        torch = sys.modules.get("torch")  # never import torch only to measure
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
        return None

    def write(self) -> Path | None:
        if not self.rows:
            return None
        lines = ["\t".join(self.COLUMNS)]
        lines += ["\t".join(str(r.get(c, "n/a")) for c in self.COLUMNS) for r in self.rows]
        try:
            atomic_write_text(self.path, "\n".join(lines) + "\n")
        except OSError as exc:
            log.error("could not write %s (%s)", self.path, exc)
            return None
        return self.path


class Runner:
    """Executes stage classes for one run."""

    def __init__(self, settings: Settings, stages: Sequence[type[Stage]], resources: Resources,
                 dist_of: dict[str, tuple[str, str]] | None = None):
        self.settings = settings
        self.stages = [cls() for cls in stages]
        self.resources = resources
        self.writer = DerivativesWriter(settings.output_dir, settings.bids_dir)
        self.stamps = StampStore(settings.output_dir)
        self.dist_of = dist_of or {}
        self._checked: set[str] = set()  # stages whose preflight passed
        self.usage = UsageLog(settings.output_dir / "logs" / f"resources-{settings.run_id}.tsv")

    # ------------------------------------------------------------------- keys
    def _key(self, stage: Stage, unit: str, inputs: list[Path]) -> str:
        payload: dict[str, Any] = {
            "stage": stage.name, "version": stage.version, "params": stage.parameters(self.settings),
            "inputs": sorted(digest(p) for p in inputs),
            "requires": {r: self.stamps.key_of(unit, r) for r in stage.requires},
        }
        if stage.needs_model:
            payload["model"] = self.resources.model_hash
        if stage.precision_matters(self.settings):
            payload["precision"] = self.resources.precision
        if stage.uses_grid:
            payload["grid"] = self.resources.grid.to_dict()
            payload["intensity"] = self.resources.intensity
        return make_key(payload)

    def _context(self, stage: Stage) -> StageContext:
        provenance = {"StageVersion": stage.version, **self.resources.provenance(stage.needs_model)}
        if stage.precision_matters(self.settings) and not stage.needs_model:
            provenance["Precision"] = self.resources.precision
        dist = self.dist_of.get(stage.name)
        if dist and dist[0] != "ldae-bids":
            provenance["Plugin"] = {"Distribution": dist[0], "Version": dist[1]}
        params = stage.parameters(self.settings)
        if params:
            provenance["Parameters"] = params
        return StageContext(self.settings, self.writer.for_stage(stage.name, provenance), self.resources, stage)

    def _crash(self, unit: str, stage: Stage, exc: BaseException) -> Path:
        path = self.settings.output_dir / "logs" / f"crash-{self.settings.run_id}-{unit}-{stage.name}.txt"
        text = (f"ldae-bids {__version__}, run {self.settings.run_id}\nunit: {unit}\nstage: {stage.name} "
                f"{stage.version}\n\n" + "".join(traceback.format_exception(exc)))
        try:
            atomic_write_text(path, text)
        except OSError:
            log.error("could not write crash file %s", path)
        return path

    @staticmethod
    def _message(exc: BaseException) -> str:
        if isinstance(exc, LdaeError):
            return exc.message
        return f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------ participant
    def run_participant(self, subjects: Sequence[SubjectInput], progress=None) -> list[UnitResult]:
        results = {s.label: UnitResult(s.key) for s in subjects}
        batch_size = self.settings.batch_size or 1
        if any(st.batchable for st in self.stages) and self.settings.batch_size is None:
            from ldae_bids.device import default_batch_size

            batch_size = default_batch_size(self.resources.device)
        if self.settings.mem_mb and batch_size > 1:
            batch_size = self._batch_for_memory(batch_size)
        self.batch_limit = batch_size  # lowered for the rest of the run when a batch runs out of memory
        self._mem_peak = 0.0  # the peak at the last --mem check (ru_maxrss never decreases)
        self._mem_warned = False
        for stage in self.stages:  # run-wide checks before any work, for every stage with something to do
            if type(stage).preflight is Stage.preflight:
                continue  # nothing to check: no resume keys computed twice for it
            if any(self.settings.force or not self.stamps.is_done(
                    s.key, stage.name, self._key(stage, s.key, [ses.t1w for ses in s.sessions])) for s in subjects):
                self._preflight(stage)
        task = progress.add_task("subjects", total=len(subjects)) if progress else None
        start = 0
        while start < len(subjects):
            batch = list(subjects[start:start + self.batch_limit])
            start += len(batch)
            t0 = time.perf_counter()
            alive = list(batch)
            for stage in self.stages:
                alive = self._participant_stage(stage, alive, results)
                if not alive:
                    break
            for s in batch:
                results[s.label].seconds = (time.perf_counter() - t0) / len(batch)
            if self.settings.mem_mb:
                self._keep_to_memory(len(batch))
            if progress is not None:
                progress.advance(task, len(batch))
        return [results[s.label] for s in subjects]

    def _batch_for_memory(self, batch_size: int) -> int:
        """The batch size capped by ``--mem`` from the estimated memory per subject."""
        from ldae_bids.memory import BASE_MB, max_batch

        per_subject = self.resources.memory_per_subject_mb
        cap = max_batch(self.settings.mem_mb, per_subject, BASE_MB)
        if cap < batch_size:
            log.info("--mem %d MB: at most %d subject(s) per batch (estimated %.0f MB per subject on top of %.0f MB; "
                     "benchmarks/bench_memory.py)", self.settings.mem_mb, cap, per_subject, BASE_MB)
            return cap
        return batch_size

    def _keep_to_memory(self, batch: int) -> None:
        """After a batch: when it raised the process's peak over ``--mem``, lower the batch size for the rest of
        the run (as for an out-of-memory batch), or say once that even one subject per batch does not fit. The
        peak never decreases, so a batch that did not raise it is not judged by an earlier batch's peak."""
        from ldae_bids.memory import BASE_MB, lowered_batch

        peak, limit = _peak_rss_mb(), self.settings.mem_mb
        raised = peak > self._mem_peak
        self._mem_peak = max(self._mem_peak, peak)
        if peak <= limit or not raised:
            return
        if batch > 1 and self.batch_limit > 1:
            self.batch_limit = min(self.batch_limit, lowered_batch(batch, limit, peak, BASE_MB))
            log.warning("peak memory %.0f MB went over --mem %d MB with %d subjects per batch: batches of %d from "
                        "now on", peak, limit, batch, self.batch_limit)
        elif not self._mem_warned:
            self._mem_warned = True
            log.warning("peak memory %.0f MB went over --mem %d MB with one subject per batch: the run needs more "
                        "memory than --mem allows (see logs/resources-%s.tsv)", peak, limit, self.settings.run_id)

    def _participant_stage(self, stage: Stage, subjects: list[SubjectInput],
                           results: dict[str, UnitResult]) -> list[SubjectInput]:
        todo: list[tuple[SubjectInput, str]] = []
        for s in subjects:
            key = self._key(stage, s.key, [ses.t1w for ses in s.sessions])
            if not self.settings.force and self.stamps.is_done(s.key, stage.name, key):
                results[s.label].skipped.append(stage.name)
            else:
                todo.append((s, key))
        if todo:
            self._preflight(stage)
        failed: set[str] = set()
        while todo:
            if stage.batchable and len(todo) > 1 and self.batch_limit > 1:
                chunk = todo[:self.batch_limit]
                outcome = self._run_batch(stage, chunk, results)
                if outcome == "out of memory":
                    continue  # the same subjects again, in smaller batches
                todo = todo[len(chunk):]
                if outcome == "done":
                    continue
                singles = chunk  # isolate the culprit by running one by one
            else:
                singles, todo = todo[:1], todo[1:]
            for s, key in singles:
                if not self._run_single(stage, s, key, results):
                    failed.add(s.label)
        return [s for s in subjects if s.label not in failed]

    def _preflight(self, stage: Stage) -> None:
        """The stage's run-wide check, once per run; its LdaeError stops the run (one message, its exit code)."""
        if stage.name in self._checked:
            return
        stage.preflight(self._context(stage))
        self._checked.add(stage.name)

    def _run_batch(self, stage: Stage, chunk: list[tuple[SubjectInput, str]],
                   results: dict[str, UnitResult]) -> str:
        """One batched call: ``done``, ``out of memory`` (batch limit halved) or ``failed``."""
        ctx = self._context(stage)
        try:
            with self.usage.measure(stage.name, [s.key for s, _ in chunk]):
                stage.run_batch(ctx, [s for s, _ in chunk])
        except Exception as exc:
            ctx.writer.remove_written()
            if _out_of_memory(exc):
                self.batch_limit = max(1, len(chunk) // 2)
                _free_device_cache()
                log.warning("stage %s ran out of memory on a batch of %d (%s): batches of %d from now on "
                            "(set --batch-size to choose)", stage.name, len(chunk), self._message(exc),
                            self.batch_limit)
                return "out of memory"
            log.warning("stage %s failed on a batch of %d (%s): retrying subject by subject",
                        stage.name, len(chunk), self._message(exc))
            return "failed"
        for s, key in chunk:
            prefix = (self.settings.output_dir / s.key).resolve()
            files = [f for f in ctx.writer.written if Path(f).resolve().is_relative_to(prefix)]
            self._stamp(s, stage.name, key, files, self.stamps.read(s.key, stage.name))
            results[s.label].done.append(stage.name)
        return "done"

    def _run_single(self, stage: Stage, s: SubjectInput, key: str, results: dict[str, UnitResult]) -> bool:
        ctx = self._context(stage)
        previous = self.stamps.read(s.key, stage.name)
        self.stamps.remove(s.key, stage.name)
        try:
            with self.usage.measure(stage.name, [s.key]):
                stage.run(ctx, s)
        except Exception as exc:
            ctx.writer.remove_written()
            res = results[s.label]
            res.failed_stage, res.error = stage.name, self._message(exc)
            res.crash_file = self._crash(s.key, stage, exc)
            log.error("%s: stage %s failed: %s", s.key, stage.name, res.error)
            if self.settings.stop_on_first_crash:
                raise
            return False
        self._stamp(s, stage.name, key, ctx.writer.written, previous)
        results[s.label].done.append(stage.name)
        return True

    def _stamp(self, s: SubjectInput, stage: str, key: str, files: list[Path], previous: dict | None) -> None:
        """Record a finished (subject, stage); then remove the files its previous run wrote and this one did not
        (e.g. the counterfactuals of strengths no longer asked for), so the outputs match the current settings.
        Only when both runs saw the same sessions: a run on fewer (``--session-label``) keeps the others' files."""
        unit, sessions = s.key, sorted(ses.key for ses in s.sessions)
        self.stamps.write(unit, stage, key, files, self.settings.run_id, sessions)
        if previous and previous.get("sessions") == sessions:
            self._remove_stale(unit, stage, previous, files)

    def _remove_stale(self, unit: str, stage: str, previous: dict | None, files: list[Path]) -> None:
        """Remove the files the previous run of (unit, stage) recorded and this run did not write, and the
        folders that leaves empty below the file's top folder (``sub-<label>``, ``group``)."""
        root = self.settings.output_dir.resolve()
        kept = {Path(f).resolve() for f in files}
        for rel in (previous or {}).get("files", []):
            path = (root / rel).resolve()
            if path in kept or not path.is_relative_to(root) or not path.is_file():
                continue
            path.unlink()
            log.info("%s: removed %s (written by an earlier run of %s, not by this one)", unit, rel, stage)
            top = root / path.relative_to(root).parts[0]
            for parent in path.parents:  # folders left empty (e.g. a synthetic session no longer asked for)
                if parent == top or not parent.is_relative_to(top) or any(parent.iterdir()):
                    break
                parent.rmdir()

    # ------------------------------------------------------------------ group
    def run_group(self, group: GroupInput) -> list[UnitResult]:
        out = []
        for stage in self.stages:
            res = UnitResult("group")
            t0 = time.perf_counter()
            unit_keys = {s.key: self.stamps.all_keys(s.key) for s in group.subjects}
            key = make_key({"stage": stage.name, "version": stage.version,
                            "params": stage.parameters(self.settings), "subjects": unit_keys,
                            "requires": {r: self.stamps.key_of("group", r) for r in stage.requires},
                            "model": self.resources.model_hash if stage.needs_model else None,
                            "precision": self.resources.precision
                            if stage.precision_matters(self.settings) else None})
            if not self.settings.force and self.stamps.is_done("group", stage.name, key):
                res.skipped.append(stage.name)
                out.append(res)
                continue
            ctx = self._context(stage)
            self._preflight(stage)  # a run-wide problem stops the run here, before the stage's stamp goes
            previous = self.stamps.read("group", stage.name)
            self.stamps.remove("group", stage.name)
            try:
                with self.usage.measure(stage.name, ["group"]):
                    stage.run(ctx, group)
            except Exception as exc:
                ctx.writer.remove_written()
                res.failed_stage, res.error = stage.name, self._message(exc)
                res.exit_code = int(getattr(exc, "exit_code", 1))
                res.crash_file = self._crash("group", stage, exc)
                log.error("group: stage %s failed: %s", stage.name, res.error)
                if self.settings.stop_on_first_crash:
                    raise
            else:
                self.stamps.write("group", stage.name, key, ctx.writer.written, self.settings.run_id)
                self._remove_stale("group", stage.name, previous, ctx.writer.written)
                res.done.append(stage.name)
            res.seconds = time.perf_counter() - t0
            res.unit = f"group: {stage.name}"
            out.append(res)
        return out
