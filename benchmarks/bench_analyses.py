#!/usr/bin/env python
"""Benchmark of the ldae-bids analyses, run through the app's own command line (issue 5).

Four measurements, each by running ``ldae-bids`` (``python -m ldae_bids``) as a user would:

1. **Participant level** on every subject: ``preprocess`` (or, with ``--preprocessed DIR``, the model-ready
   images that ``benchmarks/bench_preprocess.py --save-dir`` wrote with the same ``preprocess_batch`` code,
   imported under the names and sidecars the preprocess stage writes), then ``--stages embed --no-save-xt``
   (y_sem only), timed per subject.
2. **Group level**: ``--stages probe --targets age sex --baseline-features ROI.tsv``; age MAE and sex AUROC
   with 95% subject-bootstrap intervals next to the trivial and ROI-volume (classical) baselines and the
   paired differences. The model bundle's training/validation split is read from its ``metadata.json``; the
   probe is also evaluated on the bundle's validation subjects only (subjects the model never saw): by
   cross-validation within them, and by fitting on the training subjects and scoring the validation ones.
3. **Manipulation** (``--manip-subjects`` subjects, the bundle's validation subjects first): ``embed`` with
   x_T, then ``manipulate --probe group/target-age_desc-probe_probe.json --strengths -2 -1 -0.5 0.5 1 2``; the
   fraction of subjects whose re-encoded predicted age rises monotonically with the strength (over all of
   them, and over those within [-1, 1]), and the mean predicted
   age per strength; then ``--strength-unit target --strengths -20 -10 -5 5 10 20`` (years asked for): the
   change of the re-encoded predicted age against the change asked.
4. **Missing sessions**: ``benchmarks/simulate_longitudinal.py`` makes ``--long-subjects`` longitudinal
   subjects (validation subjects first) at months 0 3 6 15 30, so that leaving out each inner session gives
   gaps of 6, 12 and 24 months between the bracketing sessions (fractions 0.5, 0.25, 0.375); the
   participant level runs ``preprocess``, ``embed`` and ``fill-missing-sessions`` with
   ``evaluate=yes``; SSIM/MSE per gap for LDAE vs the nearest session and a linear blend, against the real
   (simulated) scan and against its autoencoder reconstruction.

Writes ``analyses.json`` (all numbers) and ``analyses.md`` to ``--out`` after every part, so a run cut
short still leaves what it measured. Work (outputs, simulated data, logs of every app call) goes to
``--work`` and is reused by a re-run (the app skips what is up to date).

Usage::

    python benchmarks/bench_analyses.py --bids ../shared/data/ixi --work /tmp/bench-analyses \\
        --out benchmarks/results [--model BUNDLE] [--preprocessed /work/cache/ixi-preproc] [--limit N] \\
        [--ddim-steps 20] [--manip-subjects 8] [--long-subjects 4] [--skip manipulate fill] \\
        [--stage-option embed.refine_latent=30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("participant", "group", "manipulate", "fill")
LONG_MONTHS = (0, 3, 6, 15, 30)
STRENGTHS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
CHANGES = (-20.0, -10.0, -5.0, 5.0, 10.0, 20.0)  # years, for --strength-unit target
N_BOOT = 1000


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Running the app
# ----------------------------------------------------------------------------------------------
class App:
    """Runs ``python -m ldae_bids`` in a subprocess (or, for tests, ``ldae_bids.cli.main.main`` in this
    process); keeps each call's output in WORK/logs."""

    def __init__(self, work: Path, model: Path, nprocs: int | None, validate: bool, in_process: bool = False,
                 stage_options: list[str] | None = None):
        self.work, self.model, self.nprocs, self.validate = work, model, nprocs, validate
        self.stage_options = list(stage_options or [])
        self.in_process = in_process
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.calls: list[dict] = []
        self.env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
        tf = REPO.parent / "shared" / "templateflow"
        if not self.env.get("TEMPLATEFLOW_HOME") and tf.is_dir():
            self.env["TEMPLATEFLOW_HOME"] = str(tf)

    def __call__(self, name: str, bids: Path, out: Path, level: str, *args) -> dict:
        """One app call; exit 1 at the participant level (some subjects failed) is recorded, not fatal."""
        ok = (0, 1) if level == "participant" else (0,)
        argv = [str(bids), str(out), level, "--model", str(self.model), "-w", str(self.work / "scratch"),
                *map(str, args)]
        if not self.validate:
            argv.append("--skip-bids-validation")
        if self.nprocs:
            argv += ["--nprocs", str(self.nprocs)]
        for option in self.stage_options:
            argv += ["--stage-option", option]
        cmd = [sys.executable, "-m", "ldae_bids", *argv]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: ldae-bids {shlex.join(argv)}", flush=True)
        t0, started = time.perf_counter(), datetime.now(timezone.utc)
        proc = self._in_process(argv) if self.in_process else subprocess.run(cmd, capture_output=True, text=True,
                                                                              env=self.env)
        wall = time.perf_counter() - t0
        log = self.logs / f"{name}.log"
        log.write_text(f"$ {shlex.join(cmd)}\n# exit {proc.returncode}, {wall:.1f} s\n\n--- stdout\n{proc.stdout}"
                       f"\n--- stderr\n{proc.stderr}")
        rec = {"name": name, "argv": ["ldae-bids", *argv], "exit_code": proc.returncode, "wall_seconds": wall,
               "started": started.isoformat(timespec="seconds"), "units": parse_summary(proc.stderr), "log": str(log)}
        rec["failed"] = {k: u["error"] for k, u in rec["units"].items() if u["status"] == "failed"}
        self.calls.append(rec)
        print(f"    exit {proc.returncode} in {wall:.1f} s"
              + (f"; FAILED: {', '.join(rec['failed'])}" if rec["failed"] else ""), flush=True)
        if proc.returncode not in ok:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise BenchError(f"{name}: ldae-bids exited {proc.returncode} (log: {log})\n{tail}")
        return rec

    def _in_process(self, argv):
        import contextlib
        import io

        from ldae_bids.cli.main import main as cli_main

        out, err = io.StringIO(), io.StringIO()
        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = self.env["COLUMNS"]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(list(argv))
        finally:
            if saved is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = saved
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def parse_summary(stderr: str) -> dict[str, dict]:
    """Rows of the app's summary table: unit -> status, stages run, skipped, seconds."""
    rows = {}
    for line in stderr.splitlines():
        if "│" not in line and "|" not in line:
            continue
        cells = [c.strip() for c in re.split(r"[│|┃]", line)]
        cells = [c for c in cells[1:-1]] if len(cells) > 2 else cells
        if len(cells) < 5 or not (cells[0].startswith("sub-") or cells[0].startswith("group")):
            continue
        try:
            secs = float(cells[4])
        except ValueError:
            continue
        rows[cells[0]] = {"status": cells[1], "done": [s for s in cells[2].split(", ") if s],
                          "skipped": [s for s in cells[3].split(", ") if s], "seconds": secs,
                          "error": cells[5] if len(cells) > 5 else ""}
    return rows


def stage_seconds(call: dict, stage: str) -> list[float]:
    """Per-subject seconds of the subjects where ``stage`` ran in this call (not skipped)."""
    return [u["seconds"] for k, u in call["units"].items() if k.startswith("sub-") and stage in u["done"]]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def summarise(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def machine(device: str = "auto") -> dict:
    """One description of the machine for all benchmarks (the GPU only when ``device`` may use it)."""
    import torch

    from bench_preprocess import cpu_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else None
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def bundle_info(path: Path) -> dict:
    if not (path / "checksums.json").is_file():
        raise BenchError(f"{path}: not a model bundle (no checksums.json); give --model BUNDLE")
    meta = json.loads((path / "metadata.json").read_text())
    config = json.loads((path / "config.json").read_text())
    sums = json.loads((path / "checksums.json").read_text())
    training = meta.get("training", {})
    split = training.get("split") or meta.get("split") or {}
    return {"path": str(path), "name": config.get("name", path.name), "content_hash": sums.get("content_hash"),
            "grid": meta.get("grid"), "training_data": training.get("data") or meta.get("training_data"),
            "n_train_subjects": len(split.get("train", [])), "n_validation_subjects": len(split.get("validation", [])),
            "train": [s.removeprefix("sub-") for s in split.get("train", [])],
            "validation": [s.removeprefix("sub-") for s in split.get("validation", [])],
            "steps": {k: training.get(k) for k in ("ae_steps", "ldae_steps", "decoder_steps", "ae_steps_planned",
                                                          "ldae_steps_planned")
                      if k in training}}


def bids_subjects(bids: Path) -> dict[str, Path]:
    out = {}
    for t1 in sorted(bids.glob("sub-*/anat/sub-*_T1w.nii.gz")):
        out.setdefault(t1.name.split("_")[0].removeprefix("sub-"), t1)
    return out


# ----------------------------------------------------------------------------------------------
# 1. Participant level
# ----------------------------------------------------------------------------------------------
def import_preprocessed(cache: Path, bids: Path, out: Path, subjects: dict[str, Path], grid_dict: dict) -> dict:
    """Write bench_preprocess's model-ready images into OUT as the preprocess stage names them."""
    import nibabel as nib

    from ldae_bids.bids import outputs
    from ldae_bids.bids.discover import SessionInput
    from ldae_bids.bids.writer import DerivativesWriter
    from ldae_bids.preprocessing import Grid

    grid = Grid.from_dict(grid_dict)
    params_file = cache / "preprocess_params.json"
    params = json.loads(params_file.read_text()) if params_file.is_file() else {}
    writer = DerivativesWriter(out, bids).for_stage("preprocess", {
        "StageVersion": "1", "Parameters": params,
        "ImportedBy": "benchmarks/bench_analyses.py --preprocessed",
        "ImportedFrom": str(cache)})
    n_new, missing = 0, []
    for sub, t1 in subjects.items():
        img_src = cache / f"sub-{sub}_desc-preproc_T1w.nii.gz"
        qc_src = cache / f"sub-{sub}_desc-preproc_T1w.json"
        mask_src = cache / f"sub-{sub}_desc-brain_mask.nii.gz"
        if not (img_src.is_file() and mask_src.is_file()):
            missing.append(sub)
            continue
        ses = SessionInput(sub, None, t1, {"subject": sub})
        img_dst = writer.path(**outputs.preproc_t1w(ses, grid.res_label), extension=".nii.gz")
        img = nib.load(str(img_src))
        if tuple(img.shape[:3]) != tuple(grid.shape) or not np.allclose(img.affine, grid.affine, atol=1e-3):
            raise BenchError(f"{img_src}: shape {img.shape} / affine do not match the bundle grid "
                             f"{tuple(grid.shape)}; the cache was made for another grid (bench_preprocess --grid)")
        if img_dst.is_file():
            continue
        desc = ("Model-ready image made by benchmarks/bench_preprocess.py --save-dir (the same preprocess_batch "
                "code as the preprocess stage) and imported by benchmarks/bench_analyses.py")
        path = writer.write_nifti(img, outputs.preproc_t1w(ses, grid.res_label), {
            "Description": desc, "SkullStripped": True,
            "Resolution": {grid.res_label: f"{grid.spacing:g} mm isotropic, {'x'.join(map(str, grid.shape))} voxels "
                                           f"on {grid.template}"},
            "IntensityNormalisation": params.get("normalisation"),
            **({"QC": json.loads(qc_src.read_text()).get("QC", {})} if qc_src.is_file() else {})}, sources=[t1])
        writer.write_nifti(nib.load(str(mask_src)), outputs.brain_mask_grid(ses, grid.res_label),
                           {"Type": "Brain", "Resolution": {grid.res_label: f"{grid.spacing:g} mm isotropic"}},
                           sources=[path])
        n_new += 1
    if missing:
        raise BenchError(f"{cache}: no model-ready image for {len(missing)} subject(s): {', '.join(missing[:10])}"
                         " (is bench_preprocess --save-dir finished? it writes DONE at the end)")
    return {"source": f"imported from {cache}: written by benchmarks/bench_preprocess.py --save-dir with the same "
                      "preprocess_batch code the preprocess stage runs", "n_imported_now": n_new,
            "cache_done": (cache / "DONE").is_file()}


def run_participant(args, app: App, out: Path, subjects: dict[str, Path], bundle: dict) -> dict:
    labels = list(subjects)
    res: dict = {"n_subjects": len(labels)}
    if args.preprocessed:
        t0 = time.perf_counter()
        res["preprocess"] = import_preprocessed(args.preprocessed, args.bids, out, subjects, bundle["grid"])
        res["preprocess"]["seconds"] = time.perf_counter() - t0
        skip = ["--skip-stages", "preprocess"]
    else:
        call = app("participant-preprocess", args.bids, out, "participant", "--participant-label", *labels,
                   "--stages", "preprocess")
        res["preprocess"] = {"source": "the app's preprocess stage", "wall_seconds": call["wall_seconds"],
                             "seconds_per_subject": summarise(stage_seconds(call, "preprocess"))}
        skip = []
    call = app("participant-embed-ysem", args.bids, out, "participant", "--participant-label", *labels,
               "--stages", "embed", "--no-save-xt", *skip)
    secs = stage_seconds(call, "embed")
    res["embed"] = {"wall_seconds": call["wall_seconds"], "n_embedded_this_run": len(secs),
                    "seconds_per_subject": summarise(secs),
                    "note": "per-subject seconds from the app's summary table (subjects embedded in this call; "
                            "one at a time on the CPU); the wall time adds start-up, indexing and model loading"}
    return res


# ----------------------------------------------------------------------------------------------
# 2. Group level
# ----------------------------------------------------------------------------------------------
def metrics_table(path: Path) -> list[dict]:
    import pandas as pd

    df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]


def pick(rows, target, model, metric) -> dict | None:
    for r in rows:
        if r["target"] == target and r["model"] == model and r["metric"] == metric:
            return {"value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
    return None


def _result_rows(res, target) -> list[dict]:
    rows = []
    for r in res.table().to_dict("records"):
        rows.append({"target": target, "kind": res.kind, **{k: (None if isinstance(v, float) and not np.isfinite(v)
                                                                else v) for k, v in r.items()},
                     "n_rows": res.n_rows, "n_subjects": res.n_subjects})
    return rows


def subset_probes(out: Path, bids: Path, baseline: Path | None, targets, validation: list[str], train: list[str],
                  seed: int, covariates: str | None = None) -> dict:
    """The probe on the bundle's validation subjects: CV within them; fit on training subjects, score them."""
    import pandas as pd

    from ldae_bids.analysis.probe import fit_probe, infer_kind
    from ldae_bids.analysis.targets import align_targets, read_feature_table, read_target_table

    table = pd.read_csv(out / "group" / "desc-ysem_features.tsv", sep="\t", dtype={"participant_id": str})
    X = table.filter(like="ysem_").to_numpy(dtype=float)
    subs = table["participant_id"].str.removeprefix("sub-").to_numpy()
    keys = [(p, None) for p in table["participant_id"]]
    tt = read_target_table(bids / "participants.tsv", bids)
    base = read_feature_table(baseline, keys)[0] if baseline else None
    cov = None
    if covariates:
        cov = table[[c.strip() for c in covariates.split(",")]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    val = np.isin(subs, validation)
    trn = np.isin(subs, train)
    result = {"validation_subjects_embedded": int(val.sum()), "training_subjects_embedded": int(trn.sum()),
              "validation_cv": [], "train_to_validation": [], "notes": []}
    if val.sum() < 10:
        result["notes"].append(f"only {int(val.sum())} validation subjects among the embedded ones: the "
                               "validation-only analyses need at least 10 (run without --limit)")
        return result
    for target in targets:
        y_raw = align_targets(tt, keys, target)
        kind = infer_kind(y_raw)  # from all rows, as the probe stage decides it (a subset may look categorical)
        # (a) cross-validation within the validation subjects, exactly as the probe stage does on all rows
        try:
            res = fit_probe(X[val], y_raw[val], subs[val], kind=kind, seed=seed, n_boot=N_BOOT, target=target,
                            baseline_features=None if base is None else base[val],
                            covariates=None if cov is None else cov[val])
            result["validation_cv"] += _result_rows(res, target)
        except Exception as exc:  # noqa: BLE001 - small subsets can be infeasible; say so
            result["notes"].append(f"{target}: validation-only CV not possible ({type(exc).__name__}: {exc})")
        # (b) fit on the training subjects' rows, score the validation subjects' rows (one split, no refit)
        if trn.sum() < 10:
            result["notes"].append(f"{target}: fewer than 10 training subjects embedded; no train->validation fit")
            continue
        try:
            result["train_to_validation"] += _train_to_validation(X, y_raw, subs, trn, val, base, target, kind, seed)
        except Exception as exc:  # noqa: BLE001
            result["notes"].append(f"{target}: train->validation fit not possible ({type(exc).__name__}: {exc})")
    return result


def _train_to_validation(X, y_raw, subs, trn, val, base, target, kind, seed) -> list[dict]:
    from ldae_bids.analysis.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, evaluate
    from ldae_bids.analysis.metrics import subject_bootstrap_weights
    from ldae_bids.analysis.probe import fit_probe
    from ldae_bids.analysis.targets import clean_target

    rows = []
    vals, numeric = clean_target(y_raw)
    present = np.isfinite(vals.astype(float)) if numeric else np.array([v is not None for v in vals])
    tr, te = trn & present, val & present
    probe = fit_probe(X[tr], vals[tr], subs[tr], kind=kind, seed=seed, n_boot=0, target=target).probe
    preds = {}
    feats = {"probe": (X, probe)}
    if base is not None:
        B = base.copy()
        med = np.nanmedian(B[tr], axis=0)
        B = np.where(np.isfinite(B), B, np.where(np.isfinite(med), med, 0.0))
        feats["classical"] = (B, fit_probe(B[tr], vals[tr], subs[tr], kind=kind, seed=seed, n_boot=0, target=target,
                                           feature_name="baseline").probe)
    if kind == "regression":
        y_te = vals[te].astype(float)
        preds["trivial"] = np.full(te.sum(), float(np.mean(vals[tr].astype(float))))
        for name, (F, p) in feats.items():
            preds[name] = np.asarray(p.predict(F[te]), dtype=float)
        metric_names = REGRESSION_METRICS
    else:
        classes = list(probe.classes)
        y_te = np.array([classes.index(v) for v in vals[te]])
        prior = np.array([np.mean(vals[tr] == c) for c in classes], dtype=float)
        preds["trivial"] = np.tile(prior, (te.sum(), 1))
        for name, (F, p) in feats.items():
            if list(p.classes) != classes:
                raise BenchError(f"{target}: class order differs between probes")
            preds[name] = np.asarray(p.predict_proba(F[te]), dtype=float)
        metric_names = CLASSIFICATION_METRICS
    boot = subject_bootstrap_weights(subs[te], N_BOOT, seed)
    per_model, deltas = evaluate(metric_names, y_te, {"probe": preds.pop("probe"), **preds}, boot,
                                 reference="probe")
    for group in (per_model, deltas):
        for model, ms in group.items():
            for m, e in ms.items():
                d = e.to_dict()
                rows.append({
                    "target": target, "kind": kind, "model": model, "metric": m, "value": d.get("value"),
                    "ci_low": d.get("low", d.get("ci_low")), "ci_high": d.get("high", d.get("ci_high")),
                    "n_rows_train": int(tr.sum()), "n_rows_test": int(te.sum())})
    return rows


def run_group(args, app: App, out: Path, labels: list[str], bundle: dict) -> dict:
    extra = ["--baseline-features", str(args.baseline_features)] if args.baseline_features else []
    if args.covariates:
        extra += ["--stage-option", f"probe.covariates={args.covariates}"]
    call = app("group-probe", args.bids, out, "group", "--participant-label", *labels, "--stages", "probe",
               "--targets", *args.targets, *extra)
    rows = metrics_table(out / "group" / "desc-probes_metrics.tsv")
    res = {"wall_seconds": call["wall_seconds"], "metrics_all_subjects": rows, "covariates": args.covariates,
           "probe_files": sorted(str(p) for p in (out / "group").glob("target-*_desc-probe_probe.json"))}
    t0 = time.perf_counter()
    try:
        res["validation_subjects"] = subset_probes(out, args.bids, args.baseline_features, args.targets,
                                                   bundle["validation"], bundle["train"], args.seed,
                                                   args.covariates)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001
        res["validation_subjects"] = {"notes": [f"failed: {type(exc).__name__}: {exc}"]}
    res["validation_subjects"]["seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------------------------
# 3. Manipulation
# ----------------------------------------------------------------------------------------------
def run_manipulate(args, app: App, out: Path, labels: list[str], bundle: dict) -> dict:
    import pandas as pd

    probe = out / "group" / "target-age_desc-probe_probe.json"
    if not probe.is_file():
        raise BenchError(f"{probe}: missing; the group part (probe stage with --targets age) makes it")
    val = [s for s in labels if s in set(bundle["validation"])]
    chosen = (val + [s for s in labels if s not in set(val)])[: args.manip_subjects]
    steps = ["--ddim-steps", str(args.ddim_steps)]
    c1 = app("manipulate-embed-xt", args.bids, out, "participant", "--participant-label", *chosen,
             "--stages", "embed", "--skip-stages", "preprocess", *steps)
    c2 = app("manipulate", args.bids, out, "participant", "--participant-label", *chosen,
             "--stages", "manipulate", "--skip-stages", "preprocess", "--probe", str(probe),
             "--strengths", *map(str, args.strengths), *steps)
    ages = pd.read_csv(args.bids / "participants.tsv", sep="\t", dtype={"participant_id": str})
    age_of = dict(zip(ages["participant_id"].str.removeprefix("sub-"), pd.to_numeric(ages["age"], errors="coerce")))
    oof_path = out / "group" / "target-age_desc-oof_predictions.tsv"
    oof = {}
    if oof_path.is_file():
        o = pd.read_csv(oof_path, sep="\t", dtype={"participant_id": str})
        if "probe_pred" in o.columns:
            oof = dict(zip(o["participant_id"].str.removeprefix("sub-"), o["probe_pred"].astype(float)))
    subjects, by_strength = [], {}
    for sub in chosen:
        t, monotonic = _manip_table(out, sub)
        if t is None:
            subjects.append({"subject": sub, "error": "no predictions table"})
            continue
        scores = dict(zip(t["strength"].astype(float), t["score_reencoded"].astype(float)))
        orig = t["score_original_codes"].dropna()
        for a, s in scores.items():
            by_strength.setdefault(a, []).append(s)
        subjects.append({"subject": sub, "validation_subject": sub in set(bundle["validation"]),
                         "true_age": None if not np.isfinite(age_of.get(sub, np.nan)) else float(age_of[sub]),
                         "predicted_age_original_codes": float(orig.iloc[0]) if len(orig) else None,
                         "predicted_age_out_of_fold": oof.get(sub),
                         "predicted_age_reencoded": {f"{a:g}": s for a, s in scores.items()},
                         "monotonic": monotonic,
                         "monotonic_within_1": bool(np.all(np.diff([v for a, v in sorted(scores.items())
                                                                    if abs(a) <= 1.0]) > 0))})
    ok = [s for s in subjects if "error" not in s]
    slopes = []
    for s in ok:
        a = np.array([float(k) for k in s["predicted_age_reencoded"]])
        v = np.array(list(s["predicted_age_reencoded"].values()))
        slopes.append(float(np.polyfit(a, v, 1)[0]) if a.size > 1 else float("nan"))
    result = {"subjects": subjects, "n_subjects": len(ok), "strengths": [0.0, *args.strengths],
              "n_monotonic_within_1": int(sum(s["monotonic_within_1"] for s in ok)),
              "ddim_steps": args.ddim_steps,
              "monotonic_fraction": float(np.mean([s["monotonic"] for s in ok])) if ok else None,
              "n_monotonic": int(sum(s["monotonic"] for s in ok)),
              "mean_predicted_age_by_strength": {f"{a:g}": summarise(v) for a, v in sorted(by_strength.items())},
              "slope_years_per_unit_strength": summarise(slopes),
              "embed_xt_seconds_per_subject": summarise(stage_seconds(c1, "embed")),
              "manipulate_seconds_per_subject": summarise(stage_seconds(c2, "manipulate")),
              "wall_seconds": c1["wall_seconds"] + c2["wall_seconds"], "probe": str(probe)}
    if args.changes:
        result["target_units"] = run_manipulate_years(args, app, out, chosen, probe, steps)
        result["wall_seconds"] += result["target_units"]["wall_seconds"]
    return result


def _manip_table(out: Path, sub: str):
    """A subject's ``desc-manipAge_predictions.tsv`` (sorted by strength) and its sidecar's Monotonic."""
    import pandas as pd

    tsv = out / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-manipAge_predictions.tsv"
    if not tsv.is_file():
        return None, None
    t = pd.read_csv(tsv, sep="\t", keep_default_na=False, na_values=["n/a"]).sort_values("strength")
    return t, bool(json.loads(tsv.with_suffix(".json").read_text()).get("Monotonic"))


def run_manipulate_years(args, app: App, out: Path, chosen: list[str], probe: Path, steps: list[str]) -> dict:
    """``--strength-unit target``: strengths are changes of the predicted age asked for, in years; measured
    against the change of the re-encoded prediction (re-encoded counterfactual minus re-encoded reconstruction)."""
    call = app("manipulate-years", args.bids, out, "participant", "--participant-label", *chosen,
               "--stages", "manipulate", "--skip-stages", "preprocess", "--probe", str(probe),
               "--strength-unit", "target", "--strengths", *map(str, args.changes), *steps)
    subjects, by_change = [], {}
    for sub in chosen:
        t, monotonic = _manip_table(out, sub)
        if t is None or "change_reencoded" not in t.columns:
            subjects.append({"subject": sub, "error": "no predictions table with change_reencoded"})
            continue
        got = dict(zip(t["strength"].astype(float), t["change_reencoded"].astype(float)))
        for c, v in got.items():
            by_change.setdefault(c, []).append(v)
        asked = np.array([c for c in got if c != 0.0])
        realised = np.array([got[c] for c in asked])
        big = t["strength"].abs().idxmax()  # the largest change asked (never the reconstruction's 0)
        subjects.append({"subject": sub, "monotonic": monotonic, "change_reencoded": {f"{c:g}": v for c, v in got.items()},
                         "alpha_per_year": float(t["alpha"][big] / t["strength"][big]),
                         "gain": float(asked @ realised / (asked @ asked))})  # least squares through 0
    ok = [s for s in subjects if "error" not in s]
    return {"changes": [0.0, *args.changes], "subjects": subjects, "n_subjects": len(ok),
            "n_monotonic": int(sum(s["monotonic"] for s in ok)),
            "mean_change_by_asked": {f"{c:g}": summarise(v) for c, v in sorted(by_change.items())},
            "realised_per_asked_year": summarise([s["gain"] for s in ok]),
            "alpha_per_year": summarise([s["alpha_per_year"] for s in ok]),
            "manipulate_seconds_per_subject": summarise(stage_seconds(call, "manipulate")),
            "wall_seconds": call["wall_seconds"]}


# ----------------------------------------------------------------------------------------------
# 4. Missing sessions
# ----------------------------------------------------------------------------------------------
def simulate(args, bundle: dict, long_dir: Path) -> dict:
    import pandas as pd

    dl = args.bids / "derivatives" / "dlmuse"
    parts = pd.read_csv(args.bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    ages = pd.to_numeric(parts["age"], errors="coerce")
    aged = {p.removeprefix("sub-") for p, a in zip(parts["participant_id"], ages) if np.isfinite(a)}
    usable = [s for s in sorted(bids_subjects(args.bids)) if s in aged  # simulate_longitudinal needs age + labels
              and any((dl / f"sub-{s}" / "anat").glob(f"sub-{s}*_desc-dlmuse_dseg.nii.gz"))]
    val = [s for s in bundle["validation"] if s in usable]
    chosen = (val + [s for s in usable if s not in set(val)])[: args.long_subjects]
    sim_args = ["--bids", str(args.bids), "--out", str(long_dir), "--participant-label", *chosen,
                "--months", *map(str, LONG_MONTHS), "--seed", str(args.seed)]
    record = long_dir.parent / "long-simulation.json"
    def same(a, b):  # the same simulation wherever the work folder is (a copied work folder is reused)
        def strip(x):
            return [v for i, v in enumerate(x) if not (v == "--out" or (i and x[i - 1] == "--out"))]
        return strip(a) == strip(b)

    if record.is_file() and same(json.loads(record.read_text()).get("args", []), sim_args) \
            and (long_dir / "participants.tsv").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] simulated data up to date in {long_dir}", flush=True)
        return json.loads(record.read_text())
    cmd = [sys.executable, str(REPO / "benchmarks" / "simulate_longitudinal.py"), *sim_args, "--overwrite"]
    print(f"[{time.strftime('%H:%M:%S')}] simulate: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (long_dir.parent / "logs").mkdir(parents=True, exist_ok=True)
    (long_dir.parent / "logs" / "simulate.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode:
        raise BenchError(f"simulate_longitudinal.py exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    rec = {"args": sim_args, "command": "python benchmarks/simulate_longitudinal.py " + shlex.join(sim_args),
           "subjects": chosen, "validation_subjects": [s for s in chosen if s in set(bundle["validation"])],
           "months": list(LONG_MONTHS), "seconds": time.perf_counter() - t0, "stdout": proc.stdout.strip()}
    record.write_text(json.dumps(rec, indent=1))
    return rec


def run_fill(args, app: App, work: Path, bundle: dict) -> dict:
    import pandas as pd

    long_dir, long_out = work / "long", work / "long-out"
    sim = simulate(args, bundle, long_dir)
    steps = ["--ddim-steps", str(args.ddim_steps)]
    c1 = app("fill-preprocess", long_dir, long_out, "participant", "--stages", "preprocess")
    timing = long_out / "logs" / "bench-preprocess-seconds.json"
    pre = stage_seconds(c1, "preprocess")
    if pre:  # remember them: a re-run finds the images up to date and skips the stage
        timing.write_text(json.dumps({"seconds": pre, "call": c1["started"], "nprocs": app.nprocs}))
        pre_when = f"this run ({c1['started']})"
    elif timing.is_file():
        t = json.loads(timing.read_text())
        pre = t["seconds"]
        pre_when = f"an earlier call ({t['call']}, --nprocs {t.get('nprocs')}) whose outputs this run reused"
    else:
        pre_when = "n/a"
    c2 = app("fill-embed-xt", long_dir, long_out, "participant", "--stages", "embed", *steps)
    c3 = app("fill-evaluate", long_dir, long_out, "participant", "--stages", "fill-missing-sessions",
             "--stage-option", "fill-missing-sessions.evaluate=yes", *steps)
    frames = [pd.read_csv(p, sep="\t") for p in sorted(long_out.glob("sub-*/anat/sub-*_desc-filleval_metrics.tsv"))]
    if not frames:
        raise BenchError(f"{long_out}: no *_desc-filleval_metrics.tsv written")
    df = pd.concat(frames, ignore_index=True)
    df["gap_months"] = df["gap_months"].astype(float).round(1)
    df["fraction"] = df["fraction"].astype(float).round(3)
    cols = ["ssim", "mse", "ssim_mask", "mse_mask"]
    summary = []
    order = {"ldae": 0, "nearest": 1, "blend": 2, "real": 0, "ae_reconstruction": 1}
    df = df.sort_values(["gap_months"], kind="stable")
    for (gap, ref, method), g in sorted(df.groupby(["gap_months", "reference", "method"]),
                                        key=lambda kv: (order.get(kv[0][1], 9), kv[0][0], order.get(kv[0][2], 9))):
        summary.append({"gap_months": float(gap), "reference": ref, "method": method, "n": int(len(g)),
                        "fraction": sorted(set(g["fraction"].tolist())),
                        **{c: summarise(g[c]) for c in cols}})
    paired = []
    for (gap, ref), g in sorted(df.groupby(["gap_months", "reference"]), key=lambda kv: (order.get(kv[0][1], 9),
                                                                                          kv[0][0])):
        piv = g.pivot_table(index=["participant_id", "held_out"], columns="method", values=cols)
        for base in ("nearest", "blend"):
            row = {"gap_months": float(gap), "reference": ref, "comparison": f"ldae-{base}"}
            for c in cols:
                d = (piv[(c, "ldae")] - piv[(c, base)]).to_numpy()
                row[c] = summarise(d)
                row[c + "_ldae_better"] = int(np.sum(d > 0) if c.startswith("ssim") else np.sum(d < 0))
            paired.append(row)
    return {"simulation": sim, "session_months": list(LONG_MONTHS), "ddim_steps": args.ddim_steps,
            "rows": df.to_dict("records"), "summary": summary, "paired": paired,
            "preprocess_seconds_per_subject": summarise(pre),
            "preprocess_note": f"seconds per subject (all its {len(LONG_MONTHS)} sessions) measured in {pre_when}",
            "embed_xt_seconds_per_subject": summarise(stage_seconds(c2, "embed")),
            "fill_seconds_per_subject": summarise(stage_seconds(c3, "fill-missing-sessions")),
            "wall_seconds": c1["wall_seconds"] + c2["wall_seconds"] + c3["wall_seconds"]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ci(d: dict | None, fmt: str = "{:.3f}") -> str:
    if not d or d.get("value") is None or not np.isfinite(d["value"]):
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    ci = f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None and hi is not None and np.isfinite(lo) else ""
    return fmt.format(d["value"]) + ci


def _probe_table(rows: list[dict], title: str) -> list[str]:
    lines = ["| target | metric | y_sem probe | trivial | ROI volumes (classical) | probe - trivial "
             "| probe - classical | y_sem + covariates | covariates alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    wanted = [("age", "mae"), ("age", "rmse"), ("age", "pearson_r"), ("age", "r2"), ("sex", "auroc"),
              ("sex", "balanced_accuracy")]
    targets = sorted({r["target"] for r in rows})
    for target in targets:
        metrics = [m for t, m in wanted if t == target] or sorted({r["metric"] for r in rows if r["target"] == target})
        for m in metrics:
            cells = [_ci(pick(rows, target, mod, m)) for mod in ("probe", "trivial", "classical", "probe-trivial",
                                                                 "probe-classical", "probe+covariates",
                                                                 "covariates")]
            lines.append(f"| {target} | {m} | " + " | ".join(cells) + " |")
    n = {(r["target"]): r.get("n_subjects") or r.get("n_rows_test") for r in rows}
    return [f"**{title}** (subjects: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ")", ""] + lines + [""]


def markdown(rep: dict) -> str:
    b, m = rep["bundle"], rep["machine"]
    L = ["# Analyses benchmark (issue 5)", "",
         f"Date: {rep['date']}. Command: `{rep['command']}`", "",
         f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs"
         + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
         + f"; app threads: {rep['settings']['nprocs'] or 'default'}; "
         f"torch {m['torch']}, Python {m['python']}.", "",
         f"Model bundle: `{b['name']}` (content hash `{b['content_hash']}`), {b['n_train_subjects']} training / "
         f"{b['n_validation_subjects']} validation subjects (split from the bundle's metadata.json); training "
         f"data: {b.get('training_data') or 'n/a'}.", "",
         f"Data: `{rep['bids']}`, {rep.get('participant', {}).get('n_subjects', 'n/a')} subjects. "
         f"Total run time {rep.get('total_seconds', 0) / 60:.1f} min. Every app call and its output are listed in "
         "the JSON (`calls`).", ""]
    if rep["settings"].get("stage_options"):
        L += ["Every app call had " + ", ".join(f"`--stage-option {o}`" for o in rep["settings"]["stage_options"])
              + ".", ""]
    p = rep.get("participant")
    if p:
        pre = p["preprocess"]
        e = p["embed"]["seconds_per_subject"]
        L += ["## 1. Participant level", "",
              f"Preprocessing: {pre['source']}."
              + (f" {pre['seconds_per_subject'].get('mean', float('nan')):.1f} s per subject (mean)."
                 if "seconds_per_subject" in pre else ""), "",
              f"`embed --no-save-xt` (y_sem only): {e.get('mean', float('nan')):.2f} s per subject (mean; median "
              f"{e.get('median', float('nan')):.2f}, n={e.get('n', 0)} embedded in this call); wall time of the call "
              f"{p['embed']['wall_seconds']:.0f} s including start-up and model loading.", ""]
    g = rep.get("group")
    if g:
        L += ["## 2. Probes (group level)", "",
              "Linear probes on y_sem, 5-fold subject-grouped CV, 95% subject-bootstrap intervals, paired "
              "differences on the same folds and draws (for MAE a negative difference favours the probe). "
              "Classical baseline: the same probe on the DLMUSE ROI volumes. Covariates "
              f"({g.get('covariates') or 'none'}): the affine to the template removes head size from y_sem; "
              "`probe.covariates` puts the preprocess stage's native brain-mask volume back next to y_sem "
              "(same folds).", ""]
        L += _probe_table(g["metrics_all_subjects"], "All subjects (the model was trained on most of them: "
                          "see the validation-subject rows below)")
        v = g.get("validation_subjects", {})
        if v.get("validation_cv"):
            L += _probe_table(v["validation_cv"], "Bundle validation subjects only (never seen in training), "
                              "5-fold CV within them")
        if v.get("train_to_validation"):
            L += _probe_table(v["train_to_validation"], "Fit on the bundle's training subjects, scored on its "
                              "validation subjects (one split, bootstrap over validation subjects)")
        for note in v.get("notes", []):
            L.append(f"- {note}")
        L.append("")
    mp = rep.get("manipulation")
    if mp:
        L += ["## 3. Manipulation along the age probe", "",
              f"{mp['n_subjects']} subjects ({sum(s.get('validation_subject', False) for s in mp['subjects'])} of them "
              f"bundle validation subjects), DDIM steps {mp['ddim_steps']}. Re-encoded predicted age rises "
              f"monotonically with the strength for **{mp['n_monotonic']}/{mp['n_subjects']}** subjects "
              f"(fraction {mp['monotonic_fraction']:.2f}). Slope: "
              f"{mp['slope_years_per_unit_strength'].get('mean', float('nan')):.2f} years per unit strength "
              "(mean of per-subject least-squares slopes). Over the strengths within [-1, 1] only: monotonic for "
              f"**{mp.get('n_monotonic_within_1', 'n/a')}/{mp['n_subjects']}** subjects.", "",
              "| strength | mean predicted age (re-encoded) | SD | n |", "|---|---|---|---|"]
        for a, s in mp["mean_predicted_age_by_strength"].items():
            L.append(f"| {a} | {s.get('mean', float('nan')):.2f} | {s.get('sd', float('nan')):.2f} | {s['n']} |")
        L += ["", "Strength 0 is the reconstruction (the session's own y_sem and x_T, decoded and re-encoded).", "",
              "Predicted ages by the saved probe, which was refit on all subjects (so on these too: its "
              "prediction from the original codes is in-sample); the out-of-fold column is the CV prediction "
              "from a probe that did not see the subject.", "",
              "| subject | true age | out-of-fold predicted | predicted (original codes) | " + " | ".join(
                  f"a={a:g}" for a in sorted(mp["strengths"])) + " | monotonic |",
              "|---|---|---|---|" + "---|" * len(mp["strengths"]) + "---|"]
        for s in mp["subjects"]:
            if "error" in s:
                L.append(f"| {s['subject']} | {s['error']} |")
                continue
            pa = s["predicted_age_reencoded"]
            L.append(f"| {s['subject']}{' (val)' if s['validation_subject'] else ''} | "
                     f"{s['true_age'] if s['true_age'] is not None else 'n/a'} | "
                     + (f"{s['predicted_age_out_of_fold']:.1f}" if s.get("predicted_age_out_of_fold") is not None
                        else "n/a") + f" | {s['predicted_age_original_codes']:.1f} | "
                     + " | ".join(f"{pa.get(f'{a:g}', float('nan')):.1f}" for a in sorted(mp["strengths"]))
                     + f" | {s['monotonic']} |")
        tu = mp.get("target_units")
        if tu:
            L += ["", "### Strengths in years (`--strength-unit target`)", "",
                  f"The same subjects, `--strength-unit target --strengths {' '.join(f'{c:g}' for c in tu['changes'] if c)}`: "
                  "each strength is the change of the probe's predicted age asked for; the app turns it into "
                  f"alpha = change / (sqrt(d) |w|) ({tu['alpha_per_year'].get('mean', float('nan')):.4f} per year "
                  "for this probe). Realised = predicted age of the re-encoded counterfactual minus that of the "
                  f"re-encoded reconstruction. Monotonic for **{tu['n_monotonic']}/{tu['n_subjects']}** subjects; "
                  "realised change per year asked (least squares through 0, mean over subjects): "
                  f"**{tu['realised_per_asked_year'].get('mean', float('nan')):.2f}** "
                  f"(SD {tu['realised_per_asked_year'].get('sd', float('nan')):.2f}).", "",
                  "| years asked | realised change, mean | SD | n |", "|---|---|---|---|"]
            for c, v in tu["mean_change_by_asked"].items():
                L.append(f"| {c} | {v.get('mean', float('nan')):+.2f} | {v.get('sd', float('nan')):.2f} | {v['n']} |")
        L.append("")
    f = rep.get("fill")
    if f:
        sim = f["simulation"]
        L += ["## 4. Missing sessions (leave-one-session-out on simulated longitudinal data)", "",
              f"`{sim['command']}`: {len(sim['subjects'])} subjects "
              f"({len(sim['validation_subjects'])} bundle validation subjects), sessions at months "
              f"{' '.join(map(str, f['session_months']))}. Each inner session is left out and rebuilt from its two "
              "neighbours, so the gaps between the bracketing sessions are 6, 12 and 24 months (time fractions "
              f"0.5, 0.25, 0.375). DDIM steps {f['ddim_steps']}. The simulated sessions are one real scan with "
              "growing synthetic atrophy, so neighbouring sessions are very similar and the nearest-session "
              "baseline is strong.", ""]
        for ref in ("real", "ae_reconstruction"):
            what = "real (simulated) scan" if ref == "real" else "autoencoder reconstruction of the held-out scan"
            L += [f"Against the {what}:",
                  "", "| gap (months) | fraction | method | n | SSIM | SSIM in mask | MSE | MSE in mask |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in f["summary"]:
                if r["reference"] != ref:
                    continue
                frac = ", ".join(f"{x:g}" for x in r["fraction"])
                L.append(f"| {r['gap_months']:g} | {frac} | {r['method']} | {r['n']} | "
                         + " | ".join(f"{r[c].get('mean', float('nan')):.4f} ± {r[c].get('sd', float('nan')):.4f}"
                                      if not c.startswith("mse") else
                                      f"{r[c].get('mean', float('nan')):.2e} ± {r[c].get('sd', float('nan')):.1e}"
                                      for c in ("ssim", "ssim_mask", "mse", "mse_mask")) + " |")
            L.append("")
        ps, es, fs = (f["preprocess_seconds_per_subject"], f["embed_xt_seconds_per_subject"],
                      f["fill_seconds_per_subject"])
        L += [f"Time per subject ({len(f['session_months'])} sessions): preprocess "
              f"{ps.get('mean', float('nan')):.0f} s ({f['preprocess_note']}), embed with x_T "
              f"{es.get('mean', float('nan')):.0f} s, fill-missing-sessions evaluation "
              f"{fs.get('mean', float('nan')):.0f} s.", ""]
        L += ["Paired differences (LDAE minus baseline, mean over held-out sessions; how many favour LDAE):", "",
              "| gap | reference | comparison | d SSIM | LDAE better (SSIM) | d MSE | LDAE better (MSE) |",
              "|---|---|---|---|---|---|---|"]
        for r in f["paired"]:
            L.append(f"| {r['gap_months']:g} | {r['reference']} | {r['comparison']} | "
                     f"{r['ssim'].get('mean', float('nan')):+.4f} | {r['ssim_ldae_better']}/{r['ssim']['n']} | "
                     f"{r['mse'].get('mean', float('nan')):+.2e} | {r['mse_ldae_better']}/{r['mse']['n']} |")
        L.append("")
    L += ["## Timings", "", "| part | wall s |", "|---|---|"]
    for k, v in rep.get("part_seconds", {}).items():
        L.append(f"| {k} | {v:.0f} |")
    L += ["", "Timings on a shared CPU are noisy (other jobs may run beside it)."]
    failed = [(c["name"], k, v) for c in rep.get("calls", []) for k, v in c.get("failed", {}).items()]
    if rep.get("errors") or failed:
        L += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in rep["errors"].items()]
        L += [f"- {name}: {unit} failed: {err}" for name, unit, err in failed]
    return "\n".join(L) + "\n"


def write_report(rep: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            return float(o) if np.isfinite(o) else None
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, Path):
            return str(o)
        return o

    (out / "analyses.json").write_text(json.dumps(clean(rep), indent=1) + "\n")
    (out / "analyses.md").write_text(markdown(rep))


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "ixi")
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--covariates", default="brain_volume_ml",
                    help="probe.covariates for the group part ('' for none): columns of the group y_sem table")
    ap.add_argument("--work", type=Path, required=True, help="work folder (outputs, simulated data, logs; reused)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--preprocessed", type=Path, default=None,
                    help="bench_preprocess --save-dir folder: import its model-ready images instead of preprocessing")
    ap.add_argument("--baseline-features", type=Path, default=None,
                    help="classical features TSV (default: BIDS/derivatives/dlmuse/roi_volumes.tsv when present)")
    ap.add_argument("--targets", nargs="+", default=["age", "sex"])
    ap.add_argument("--limit", type=int, default=None, help="first N subjects only")
    ap.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps for x_T inversion and decoding")
    ap.add_argument("--manip-subjects", type=int, default=8)
    ap.add_argument("--changes", type=float, nargs="*", default=list(CHANGES),
                    help="years of predicted age asked for with --strength-unit target (none: skip that run)")
    ap.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS),
                    help="manipulation strengths (z-scored units; 0, the reconstruction, is always added)")
    ap.add_argument("--long-subjects", type=int, default=4)
    ap.add_argument("--nprocs", type=int, default=None, help="threads for the app (--nprocs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validate", action="store_true", help="let the app run the BIDS validator (off: faster)")
    ap.add_argument("--skip", nargs="+", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--stage-option", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="passed to every app call (e.g. embed.refine_latent=30); repeatable")
    ap.add_argument("--in-process", action="store_true",
                    help="call ldae_bids.cli.main.main in this process instead of a subprocess (faster; for tests)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.bids.is_dir():
        print(f"bench_analyses: data folder {args.bids} not found; skipping.")
        return 0
    args.bids = args.bids.resolve()
    from ldae_bids.model.bundle import default_bundle_path

    args.model = (args.model or default_bundle_path()).resolve()
    if args.baseline_features is None:
        roi = args.bids / "derivatives" / "dlmuse" / "roi_volumes.tsv"
        args.baseline_features = roi if roi.is_file() else None
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    t_start = time.perf_counter()
    try:
        bundle = bundle_info(args.model)
    except BenchError as exc:
        print(f"bench_analyses: error: {exc}", file=sys.stderr)
        return 66
    subjects = bids_subjects(args.bids)
    if args.limit:
        subjects = dict(list(subjects.items())[: args.limit])
    if not subjects:
        print(f"bench_analyses: no sub-*/anat/*_T1w.nii.gz under {args.bids}; skipping.")
        return 0
    app = App(work, args.model, args.nprocs, args.validate, args.in_process, args.stage_option)
    rep = {"command": "python benchmarks/bench_analyses.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "bids": str(args.bids),
           "work": str(work), "bundle": bundle,
           "settings": {"ddim_steps": args.ddim_steps, "manip_subjects": args.manip_subjects,
                        "long_subjects": args.long_subjects, "limit": args.limit, "targets": args.targets,
                        "baseline_features": args.baseline_features, "preprocessed": args.preprocessed,
                        "nprocs": args.nprocs, "seed": args.seed, "bids_validation": args.validate,
                        "stage_options": list(args.stage_option),
                        "strengths": list(args.strengths), "changes": list(args.changes), "long_months": list(LONG_MONTHS)},
           "part_seconds": {}, "errors": {}, "calls": app.calls}
    labels = list(subjects)
    steps = [("participant", lambda: run_participant(args, app, out_dir, subjects, bundle)),
             ("group", lambda: run_group(args, app, out_dir, labels, bundle)),
             ("manipulation", lambda: run_manipulate(args, app, out_dir, labels, bundle)),
             ("fill", lambda: run_fill(args, app, work, bundle))]
    part_of = {"participant": "participant", "group": "group", "manipulation": "manipulate", "fill": "fill"}
    code = 0
    for key, fn in steps:
        if part_of[key] in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            rep[key] = fn()
        except BenchError as exc:
            print(f"bench_analyses: {key} failed: {exc}", file=sys.stderr, flush=True)
            rep["errors"][key] = str(exc)
            code = 1
            if key in ("participant", "group"):
                rep["part_seconds"][key] = time.perf_counter() - t0
                break  # later parts need the embeddings and the age probe
        rep["part_seconds"][key] = time.perf_counter() - t0
        rep["total_seconds"] = time.perf_counter() - t_start
        write_report(rep, args.out)
    rep["total_seconds"] = time.perf_counter() - t_start
    write_report(rep, args.out)
    print(f"bench_analyses: wrote {args.out / 'analyses.md'} and analyses.json in {rep['total_seconds'] / 60:.1f} min")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
