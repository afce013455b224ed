"""``probe``: linear probes on y_sem for participants.tsv / sessions.tsv columns, with baselines."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ldae_bids.errors import MissingInputError, UsageError
from ldae_bids.plugins.api import GroupInput, Level, Stage, StageContext, StageOption

MIN_ROWS = 10


def target_label(column: str) -> str:
    """A BIDS-safe label for a column name (``age_at_scan`` -> ``ageatscan``)."""
    label = re.sub(r"[^A-Za-z0-9]", "", column)
    if not label:
        raise UsageError(f"target column {column!r} has no letters or digits to name its outputs")
    return label


def first_clash(items, label_of):
    """The first two items whose labels are equal ignoring case (their files would overwrite each other, on
    case-insensitive file systems too), or None. An item given twice is not a clash."""
    seen = {}
    for item in items:
        other = seen.setdefault(label_of(item).lower(), item)
        if other != item:
            return other, item
    return None


class ProbeStage(Stage):
    name = "probe"
    level = Level.GROUP
    version = "1"
    description = "linear probes on y_sem (subject-grouped CV, bootstrap CIs, trivial and classical baselines)"
    requires = ("collect-embeddings",)
    options = {
        "n_splits": StageOption("outer cross-validation folds (grouped by subject)", "5", kind=int, minimum=2),
        "n_boot": StageOption("subject-bootstrap draws for the 95% intervals", "1000", kind=int, minimum=100),
        "covariates": StageOption("comma-separated columns of the group y_sem table to put next to y_sem "
                                  "(e.g. brain_volume_ml)", "")}

    def parameters(self, settings) -> dict[str, Any]:
        from ldae_bids.state import digest

        base = settings.baseline_features
        return {"targets": list(settings.targets), "seed": settings.random_seed,
                "baseline_features": str(base) if base else None,
                "baseline_digest": digest(base) if base and base.is_file() else None,
                "n_splits": self.option_value(settings, "n_splits"),
                "n_boot": self.option_value(settings, "n_boot"),
                "covariates": covariate_names(self.option_value(settings, "covariates"))}

    def run(self, ctx: StageContext, unit: GroupInput) -> None:
        import pandas as pd

        from ldae_bids.analysis.figures import plot_embedding_map, plot_pred_vs_true, plot_roc
        from ldae_bids.analysis.probe import fit_probe, save_probe
        from ldae_bids.analysis.targets import align_targets, read_feature_table, read_target_table

        params = self.parameters(ctx.settings)
        table_path = ctx.writer.path(desc="ysem", suffix="features", extension=".tsv")
        if not table_path.is_file():
            raise MissingInputError(f"{table_path}: missing; the collect-embeddings stage makes it")
        table = pd.read_csv(table_path, sep="\t", dtype={"participant_id": str, "session_id": str},
                            keep_default_na=False, na_values=["n/a"])
        X = table.filter(like="ysem_").to_numpy(dtype=float)
        covariates = None
        if params["covariates"]:
            absent = [c for c in params["covariates"] if c not in table.columns]
            if absent:
                raise UsageError(f"{table_path}: no column {', '.join(absent)} for probe.covariates "
                                 f"(columns besides ysem_*: {', '.join(c for c in table.columns if not c.startswith('ysem_'))})")
            covariates = table[params["covariates"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
            n_nan = int(np.isnan(covariates).any(axis=1).sum())
            if n_nan:
                ctx.log.warning("probe.covariates: %d of %d rows lack a value (imputed with the training-fold "
                                "median)", n_nan, len(table))
        sessions = table["session_id"] if "session_id" in table.columns else [None] * len(table)
        keys = [(p, s if isinstance(s, str) and s else None) for p, s in zip(table["participant_id"], sessions)]
        groups = table["participant_id"].to_numpy()
        if len(table) < MIN_ROWS:  # not an error: the group level of a small pilot still runs
            ctx.log.warning("%s: only %d embedded session(s); probes need at least %d: no probe fitted",
                            table_path, len(table), MIN_ROWS)
            return
        bids = ctx.settings.bids_dir
        targets_table = read_target_table(bids / "participants.tsv", bids)
        targets = list(ctx.settings.targets) or [
            c for c in targets_table.columns if c not in ("participant_id", "session_id")
            and _usable(align_targets(targets_table, keys, c))]
        if not targets:
            raise UsageError("no probe target: give --targets COLUMN ... (participants.tsv/sessions.tsv columns)")
        if clash := first_clash(targets, target_label):
            raise UsageError(f"targets {clash[0]!r} and {clash[1]!r} name the same output files "
                             f"(target-{target_label(clash[1])}): give one of them (--targets)")
        base = None
        if ctx.settings.baseline_features:
            base, names = read_feature_table(ctx.settings.baseline_features, keys)
            ctx.log.info("baseline features: %d columns from %s", len(names), ctx.settings.baseline_features)

        rows = []
        for column in targets:
            label = target_label(column)
            y = align_targets(targets_table, keys, column)
            res = fit_probe(X, y, groups, seed=params["seed"], n_splits=params["n_splits"],
                            n_boot=params["n_boot"], baseline_features=base, target=column, covariates=covariates)
            ctx.log.info("%s", res.summary())
            tab = res.table()
            tab.insert(0, "target", column)
            tab.insert(1, "kind", res.kind)
            tab["n_rows"], tab["n_subjects"], tab["n_missing"] = res.n_rows, res.n_subjects, res.n_missing
            rows.append(tab)
            path = ctx.writer.write_file({"target": label, "desc": "probe", "suffix": "probe"}, ".json",
                                         lambda tmp, p=res.probe: save_probe(p, tmp))
            ctx.log.info("probe for %s saved to %s", column, path)
            ctx.writer.write_tsv(_oof_table(res, keys), {"target": label, "desc": "oof", "suffix": "predictions"}, {
                "Description": f"out-of-fold predictions for {column} ({res.n_splits}-fold CV grouped by subject)"})
            if res.kind == "classification":
                ctx.writer.write_figure(plot_roc(res), {"target": label, "desc": "roc", "suffix": "figure"})
            else:
                ctx.writer.write_figure(plot_pred_vs_true(res), {"target": label, "desc": "predvstrue",
                                                                 "suffix": "figure"})
            ctx.writer.write_figure(plot_embedding_map(X, y, title=f"y_sem PCA, coloured by {column}",
                                                       value_name=column, groups=groups),
                                    {"target": label, "desc": "pca", "suffix": "figure"})
        metrics = pd.concat(rows, ignore_index=True)
        ctx.writer.write_tsv(metrics, {"desc": "probes", "suffix": "metrics"}, {
            "Description": "Linear probes on y_sem: outer CV grouped by subject, regularisation chosen by inner "
                           "grouped CV in the training folds, 95% bootstrap CIs over subjects; baselines "
                           "(trivial, classical features) in the same folds; 'probe-<baseline>' rows are paired "
                           "differences; with probe.covariates, 'covariates' (alone) and 'probe+covariates' (y_sem and covariates) "
                           "rows come from the same folds.",
            "Parameters": params,
        })


def covariate_names(option: str) -> list[str]:
    """``probe.covariates``: comma-separated columns of the group y_sem table (e.g. brain_volume_ml)."""
    names = [c.strip() for c in str(option).split(",") if c.strip()]
    bad = [c for c in names if c.startswith("ysem_") or c in ("participant_id", "session_id")]
    if bad:
        raise UsageError(f"probe.covariates: {', '.join(bad)} cannot be a covariate (y_sem or an identifier)")
    return names


def _usable(values) -> bool:
    from ldae_bids.analysis.targets import clean_target

    vals, numeric = clean_target(values)
    present = ~np.isnan(vals) if numeric else np.array([v is not None for v in vals])
    return int(present.sum()) >= MIN_ROWS and len({str(v) for v in np.asarray(vals)[present]}) > 1


def _oof_table(res, keys):
    import pandas as pd

    kept = [keys[i] for i in res.row_index]
    out = pd.DataFrame({"participant_id": [k[0] for k in kept],
                        "session_id": [k[1] or "n/a" for k in kept], "fold": res.folds})
    if res.kind == "classification":
        out["y_true"] = [res.classes[i] for i in res.y]
        for name, ev in res.models.items():
            for j, cls in enumerate(res.classes):
                out[f"{name}_p_{cls}"] = ev.oof[:, j]
    else:
        out["y_true"] = res.y
        for name, ev in res.models.items():
            out[f"{name}_pred"] = ev.oof
    return out
