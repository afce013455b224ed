"""Two example stages: a participant-level QC metric and a group-level k-NN probe."""

from __future__ import annotations

import numpy as np

from ldae_bids.bids import outputs
from ldae_bids.plugins.api import GroupInput, Level, Stage, StageContext, StageOption


class RawQC(Stage):
    """Raw T1w QC: voxel size, matrix and a crude foreground SNR (mean of the top half / std of the corners)."""

    name = "example-qc"
    level = Level.PARTICIPANT
    version = "1"
    description = "raw T1w QC metrics (example plugin)"
    default = False
    # declared options are checked before the run starts (a typo or a bad value stops it with exit 64)
    options = {"corner": StageOption("edge of the background cubes in the corners, in voxels", "8", kind=int,
                                     minimum=1)}

    def parameters(self, settings):
        return {"corner": self.option_value(settings, "corner")}

    def run(self, ctx: StageContext, unit) -> None:
        import nibabel as nib
        import pandas as pd

        corner = self.parameters(ctx.settings)["corner"]
        for ses in unit.sessions:
            img = nib.load(ses.t1w)
            data = np.asarray(img.dataobj, dtype=np.float32)
            c = corner
            corners = np.concatenate([data[:c, :c, :c].ravel(), data[-c:, -c:, -c:].ravel(),
                                      data[:c, -c:, :c].ravel(), data[-c:, :c, -c:].ravel()])
            fg = data[data > np.percentile(data, 50)]
            snr = float(fg.mean() / corners.std()) if corners.std() > 0 else float("inf")
            row = {"participant_id": f"sub-{ses.subject}", "session_id": f"ses-{ses.session}" if ses.session else "n/a",
                   "voxel_size_mm": "x".join(f"{z:.3g}" for z in img.header.get_zooms()[:3]),
                   "matrix": "x".join(map(str, data.shape[:3])), "snr_foreground": round(snr, 3)}
            ctx.writer.write_tsv(pd.DataFrame([row]), {**ses.entities, "desc": "rawqc", "suffix": "features"},
                                 {"snr_foreground": {"Description": "mean above the median / std in 4 corners"}},
                                 sources=[ses.t1w])


class KnnProbe(Stage):
    """k-NN probe on the y_sem codes written by the built-in embed stage (no model run)."""

    name = "example-knn-probe"
    level = Level.GROUP
    version = "1"
    description = "k-NN probe on y_sem with subject-grouped CV (example plugin)"
    default = False
    options = {"k": StageOption("neighbours", "10", kind=int, minimum=1)}

    def run(self, ctx: StageContext, unit: GroupInput) -> None:
        import pandas as pd
        from sklearn.model_selection import GroupKFold, cross_val_predict
        from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from ldae_bids.errors import MissingInputError, UsageError

        rows, feats = [], []
        for subject in unit.subjects:
            for ses in subject.sessions:
                path = ctx.writer.path(**outputs.ysem(ses), extension=".tsv")
                if path.is_file():
                    df = pd.read_csv(path, sep="\t")
                    feats.append(df.filter(like="ysem_").to_numpy(dtype=float)[0])
                    rows.append({"participant_id": f"sub-{ses.subject}", **ses.metadata})
        if len(rows) < 10:
            raise MissingInputError(f"{unit.output_dir}: only {len(rows)} y_sem tables found; run the "
                                    "participant level with the embed stage first")
        meta = pd.DataFrame(rows)
        X, groups = np.vstack(feats), meta["participant_id"].to_numpy()
        k = ctx.option("k")
        out = []
        for target in ctx.settings.targets or ("age",):
            if target not in meta.columns:
                raise UsageError(f"target {target!r} is not a participants.tsv/sessions.tsv column")
            ok = meta[target].notna().to_numpy()
            y = meta.loc[ok, target].to_numpy()
            numeric = pd.api.types.is_numeric_dtype(meta[target]) and len(set(y)) > 10
            est = KNeighborsRegressor(k) if numeric else KNeighborsClassifier(k)
            cv = GroupKFold(n_splits=5)
            pred = cross_val_predict(make_pipeline(StandardScaler(), est), X[ok], y, groups=groups[ok], cv=cv)
            score = float(np.mean(np.abs(pred - y))) if numeric else float(np.mean(pred == y))
            out.append({"target": target, "metric": "MAE" if numeric else "accuracy", "value": score,
                        "k": k, "n": int(ok.sum())})
        ctx.writer.write_tsv(pd.DataFrame(out), {"desc": "knnprobe", "suffix": "metrics"},
                             {"Description": "k-NN probe on y_sem, 5-fold subject-grouped CV (example plugin)"})
