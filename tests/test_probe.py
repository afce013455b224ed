"""Linear probes: planted signals found, null signals not, no subject leakage, honest intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldae_bids.analysis.metrics import auroc, binary_auc
from ldae_bids.analysis.probe import Probe, fit_probe, infer_kind, load_probe, save_probe
from ldae_bids.analysis.targets import align_targets, clean_target, read_feature_table, read_target_table
from ldae_bids.errors import InputError, ModelError, UsageError

N_SUB, N_SES, DIM = 40, 3, 16


def _data(seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"s{i:02d}" for i in range(N_SUB)], N_SES)
    subj = rng.normal(size=(N_SUB, DIM))
    X = np.repeat(subj, N_SES, axis=0) + 0.3 * rng.normal(size=(N_SUB * N_SES, DIM))
    w = rng.normal(size=DIM)
    score = X @ w / np.sqrt(DIM)
    return rng, X, groups, score


@pytest.fixture(scope="module")
def regression():
    rng, X, groups, score = _data(0)
    y = 60 + 8 * score + rng.normal(0, 1, size=score.size)
    return X, y, groups, fit_probe(X, y, groups, seed=0, n_boot=200, target="age")


@pytest.fixture(scope="module")
def binary():
    rng, X, groups, score = _data(1)
    y = np.where(score + 0.2 * rng.normal(size=score.size) > 0, "AD", "CN")
    base = rng.normal(size=(y.size, 4))
    return X, y, groups, fit_probe(X, y, groups, seed=0, n_boot=200, target="dx", baseline_features=base)


def test_regression_recovers_planted_signal(regression):
    _, _, _, r = regression
    assert r.kind == "regression"
    assert r.metrics["mae"].value < 0.4 * r.models["trivial"].metrics["mae"].value
    assert r.metrics["r2"].value > 0.7
    assert r.deltas["probe-trivial"]["mae"].high < 0  # probe better, interval excludes 0


def test_classification_recovers_planted_signal(binary):
    _, _, _, r = binary
    assert r.kind == "classification" and r.classes == ["AD", "CN"]
    assert r.metrics["auroc"].value > 0.9
    assert r.metrics["auroc"].value > r.models["classical"].metrics["auroc"].value


def test_null_signal_is_not_found():
    rng, X, groups, _ = _data(2)
    y = np.repeat(rng.choice(["a", "b"], size=N_SUB), N_SES)  # subject-level labels unrelated to X
    r = fit_probe(X, y, groups, seed=0, n_boot=300)
    auc = r.metrics["auroc"]
    assert auc.low <= 0.5 <= auc.high


def test_subjects_never_in_train_and_test(binary):
    _, _, groups, r = binary
    for g in np.unique(r.groups):
        assert np.unique(r.folds[r.groups == g]).size == 1, f"subject {g} is in several folds"
    assert (r.folds >= 0).all() and np.unique(r.folds).size == r.n_splits


def test_splitter_is_grouped_even_for_regression(regression):
    _, _, _, r = regression
    fold_of = {g: set(r.folds[r.groups == g]) for g in np.unique(r.groups)}
    assert all(len(f) == 1 for f in fold_of.values())


@pytest.mark.parametrize("which", ["regression", "binary"])
def test_intervals_contain_point_estimates(which, request):
    r = request.getfixturevalue(which)[3]
    for model in r.models.values():
        for name, e in model.metrics.items():
            if np.isfinite(e.low):
                assert e.low <= e.value <= e.high, (model.name, name, e)


def test_baselines_share_folds_and_rows(binary):
    _, y, _, r = binary
    assert set(r.models) == {"probe", "trivial", "classical"}
    assert set(r.deltas) == {"probe-trivial", "probe-classical"}
    for m in r.models.values():
        assert m.oof.shape == (y.size, 2)
        np.testing.assert_allclose(m.oof.sum(axis=1), 1.0)
    # trivial = training-fold priors: AUROC near chance, balanced accuracy exactly 0.5
    assert r.models["trivial"].metrics["balanced_accuracy"].value == pytest.approx(0.5)
    table = r.table()
    assert {"model", "metric", "value", "ci_low", "ci_high"} <= set(table.columns)


def test_missing_targets_dropped_and_counted():
    rng, X, groups, score = _data(3)
    y = list((50 + 5 * score).round(2))
    for i in (0, 5, 17):
        y[i] = "n/a"
    y[20] = None
    y[33] = float("nan")
    r = fit_probe(X, y, groups, kind="regression", n_boot=50)
    assert r.n_missing == 5 and r.n_rows == X.shape[0] - 5
    assert 0 not in r.row_index and 20 not in r.row_index


def test_kind_inference_and_override():
    assert infer_kind(np.linspace(20, 80, 50)) == "regression"
    assert infer_kind([0, 1, 1, 0, 2]) == "classification"
    assert infer_kind(["M", "F", "n/a"]) == "classification"
    assert infer_kind([38.78, 46.71, 34.24, 24.28, 60.1]) == "regression"  # few rows, still continuous
    assert infer_kind([1.0, 2.0, 2.0, 1.0]) == "classification"
    rng, X, groups, score = _data(4)
    y = np.round(score > 0).astype(int)
    assert fit_probe(X, y, groups, n_boot=0).kind == "classification"
    with pytest.raises(UsageError):
        fit_probe(X, np.where(y, "a", "b"), groups, kind="regression", n_boot=0)


def test_multiclass_probe():
    rng, X, groups, _ = _data(5)
    y = np.array(["CN", "MCI", "AD"])[np.argmax(X[:, :3], axis=1)]
    r = fit_probe(X, y, groups, n_boot=100)
    assert r.classes == ["AD", "CN", "MCI"]
    assert r.metrics["auroc"].value > 0.8
    d = r.probe.direction()
    assert d.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    p = r.probe.predict_proba(X)
    moved = r.probe.manipulate(X, 1.0, cls="MCI")
    assert (r.probe.predict_proba(moved)[:, 2] > p[:, 2]).mean() > 0.95
    with pytest.raises(UsageError):
        r.probe.manipulate(X, 1.0)


def test_weighted_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # ties on purpose
    assert binary_auc(y.astype(float), s, np.ones(200)) == pytest.approx(roc_auc_score(y, s))
    y3 = rng.integers(0, 3, 300)
    p = rng.dirichlet(np.ones(3), 300)
    assert auroc(y3, p, np.ones(300)) == pytest.approx(roc_auc_score(y3, p, multi_class="ovr", average="macro"))
    w = rng.integers(0, 3, 200).astype(float)  # bootstrap weights = repeated rows
    rep = np.repeat(np.arange(200), w.astype(int))
    assert binary_auc(y.astype(float), s, w) == pytest.approx(roc_auc_score(y[rep], s[rep]))


def test_save_load_round_trip(tmp_path, binary, regression):
    X = binary[0]
    for r in (binary[3], regression[3]):
        path = save_probe(r.probe, tmp_path / f"{r.target}.json")
        text = path.read_text()
        assert "pickle" not in text
        q = load_probe(path)
        np.testing.assert_array_equal(q.coef, r.probe.coef)
        np.testing.assert_array_equal(q.mean, r.probe.mean)
        assert q.classes == r.probe.classes and q.kind == r.probe.kind and q.target == r.target
        np.testing.assert_array_equal(q.decision_function(X), r.probe.decision_function(X))
        assert q.metrics[next(iter(q.metrics))] == r.probe.metrics[next(iter(r.probe.metrics))]


def test_load_rejects_bad_files(tmp_path, regression):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError):
        load_probe(bad)
    d = regression[3].probe.to_dict()
    d["coef"] = [d["coef"][0][:-1]]
    bad.write_text(json.dumps(d))
    with pytest.raises(ModelError):
        load_probe(bad)
    with pytest.raises(ModelError):
        load_probe(tmp_path / "absent.json")


def test_final_probe_matches_a_refit_pipeline(regression):
    X, y, groups, r = regression
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X)
    ridge = Ridge(alpha=r.probe.regularization).fit(sc.transform(X), y)
    np.testing.assert_allclose(r.probe.predict(X), ridge.predict(sc.transform(X)), rtol=1e-6, atol=1e-6)


def test_manipulate_moves_prediction_monotonically(regression, binary):
    X = regression[0][:10]
    probe = regression[3].probe
    alphas = [-2, -1, -0.5, 0, 0.5, 1, 2]
    preds = np.stack([probe.predict(probe.manipulate(X, a)) for a in alphas])
    assert (np.diff(preds, axis=0) > 0).all()
    np.testing.assert_allclose(probe.manipulate(X, 0.0), X)
    # the step in z-space has norm alpha * sqrt(d)
    step = probe.zscore(probe.manipulate(X[:1], 2.5)) - probe.zscore(X[:1])
    assert np.linalg.norm(step) == pytest.approx(2.5 * np.sqrt(DIM))
    bp = binary[3].probe
    Xb = binary[0][:10]
    p = np.stack([bp.predict_proba(bp.manipulate(Xb, a))[:, 1] for a in alphas])
    assert (np.diff(p, axis=0) > 0).all()
    assert (bp.predict_proba(bp.manipulate(Xb, 1.0, cls="AD"))[:, 0] > bp.predict_proba(Xb)[:, 0]).all()
    np.testing.assert_allclose(bp.direction("AD"), -bp.direction("CN"))


def test_strength_in_target_units_moves_the_output_as_asked(regression, binary):
    X = regression[0][:10]
    probe = regression[3].probe
    for change in (-10.0, 2.5, 7.0):  # e.g. years
        moved = probe.manipulate(X, probe.alpha_for_change(change))
        np.testing.assert_allclose(probe.output(moved) - probe.output(X), change, rtol=1e-6, atol=1e-8)
    # the gain is the output change per unit alpha
    np.testing.assert_allclose(probe.output(probe.manipulate(X, 1.0)) - probe.output(X), probe.gain())
    bp = binary[3].probe
    Xb = binary[0][:10]
    logit = np.log(bp.predict_proba(Xb)[:, 1] / bp.predict_proba(Xb)[:, 0])
    np.testing.assert_allclose(bp.output(Xb), logit, rtol=1e-6)
    for cls in ("AD", "CN"):  # towards either class: that class's log-odds rises by the change asked
        moved = bp.manipulate(Xb, bp.alpha_for_change(1.5, cls), cls=cls)
        np.testing.assert_allclose(bp.output(moved, cls) - bp.output(Xb, cls), 1.5, rtol=1e-6)


def test_strength_in_target_units_multiclass():
    rng, X, groups, _ = _data(5)
    y = np.array(["CN", "MCI", "AD"])[np.argmax(X[:, :3], axis=1)]
    probe = fit_probe(X, y, groups, n_boot=0).probe
    moved = probe.manipulate(X, probe.alpha_for_change(2.0, "MCI"), cls="MCI")
    np.testing.assert_allclose(probe.output(moved, "MCI") - probe.output(X, "MCI"), 2.0, rtol=1e-6)
    zero = Probe(target="x", kind="regression", mean=np.zeros(3), scale=np.ones(3), coef=np.zeros((1, 3)),
                 intercept=[0.0])
    with pytest.raises(UsageError, match="zero weights"):
        zero.alpha_for_change(1.0)


def test_manipulate_keeps_torch_type(regression):
    torch = pytest.importorskip("torch")
    probe = regression[3].probe
    y = torch.tensor(regression[0][:2], dtype=torch.float32)
    out = probe.manipulate(y, 1.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == y.shape


def test_bad_inputs():
    rng, X, groups, score = _data(6)
    X2 = X.copy()
    X2[3, 1] = np.nan
    with pytest.raises(InputError):
        fit_probe(X2, score, groups, n_boot=0)
    with pytest.raises(UsageError):
        fit_probe(X, ["a"] * X.shape[0], groups, n_boot=0)
    with pytest.raises(UsageError):
        fit_probe(X, score, groups[:-1], n_boot=0)


# --- targets ------------------------------------------------------------------------------------
def _tables(tmp_path):
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\nsub-01\t70.5\tF\tAD\nsub-02\tn/a\tM\tCN\nsub-03\t65\tn/a\tCN\n"
    )
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tage\tdx\nses-M00\t70.5\tMCI\nses-M12\t71.5\tAD\nses-M24\tn/a\tn/a\n"
    )
    return tmp_path


def test_read_target_table_and_align(tmp_path):
    root = _tables(tmp_path)
    table = read_target_table(root / "participants.tsv", root, column="age")
    keys = [("sub-01", "ses-M00"), ("01", "M12"), ("sub-01", "M24"), ("sub-02", None), ("sub-03", "ses-X"),
            ("sub-04", None)]
    vals, numeric = clean_target(align_targets(table, keys, "age"))
    assert numeric
    np.testing.assert_array_equal(vals, [70.5, 71.5, 70.5, np.nan, 65.0, np.nan])  # M24 n/a -> subject-level
    dx = align_targets(read_target_table(root / "participants.tsv", root, column="dx"), keys, "dx")
    assert list(dx[:3]) == ["MCI", "AD", "n/a"]
    sex = align_targets(read_target_table(root / "participants.tsv", root, column="sex"), keys, "sex")
    assert list(sex[:4]) == ["F", "F", "F", "M"]


def test_unknown_column_and_bad_tsv(tmp_path):
    root = _tables(tmp_path)
    with pytest.raises(UsageError, match="diagnosis"):
        read_target_table(root / "participants.tsv", root, column="diagnosis")
    bad = tmp_path / "bad.tsv"
    bad.write_text("subject\tage\n01\t3\n")
    with pytest.raises(InputError, match="bad.tsv"):
        read_target_table(bad, None, column="age")
    dup = tmp_path / "dup.tsv"
    dup.write_text("participant_id\tage\nsub-01\t3\nsub-01\t4\n")
    with pytest.raises(InputError, match="duplicate"):
        read_target_table(dup, None, column="age")


def test_read_feature_table(tmp_path):
    path = tmp_path / "roi.tsv"
    path.write_text("participant_id\troi_1\troi_2\nsub-01\t1.5\t2\nsub-02\tn/a\t4\n")
    feats, names = read_feature_table(path, [("sub-02", "M00"), ("sub-01", None), ("sub-09", None)])
    assert names == ["roi_1", "roi_2"]
    np.testing.assert_array_equal(feats[:2], [[np.nan, 4], [1.5, 2]])
    assert np.isnan(feats[2]).all()


def test_figures(tmp_path, binary, regression):
    from ldae_bids.analysis import figures

    figures.plot_roc(binary[3], tmp_path / "roc.svg")
    figures.plot_pred_vs_true(regression[3], tmp_path / "scatter.png")
    fig = figures.plot_embedding_map(binary[0], binary[1], tmp_path / "map.png", groups=binary[2], value_name="dx")
    figures.plot_embedding_map(regression[0], regression[1], tmp_path / "map_age.png")
    assert fig is not None
    for name in ("roc.svg", "scatter.png", "map.png", "map_age.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with pytest.raises(UsageError):
        figures.plot_roc(regression[3])


@pytest.mark.ixi
def test_roi_volume_baseline_on_ixi(ixi):
    table = read_target_table(ixi / "participants.tsv", None)
    keys = [(p, None) for p in table["participant_id"]]
    X, _ = read_feature_table(ixi / "derivatives" / "dlmuse" / "roi_volumes.tsv", keys)
    r = fit_probe(X, align_targets(table, keys, "age"), [k[0] for k in keys], n_boot=200, target="age")
    assert r.n_missing > 0  # a few subjects have no age
    assert r.metrics["mae"].high < r.models["trivial"].metrics["mae"].low


def test_result_exports(binary, regression):
    df = binary[3].predictions()
    wanted = {"row", "group", "fold", "y_true", "probe_p_AD", "probe_p_CN", "probe_pred", "classical_pred"}
    assert wanted <= set(df.columns)
    assert len(df) == binary[3].n_rows
    d = regression[3].to_dict()
    json.dumps(d)
    assert d["models"]["probe"]["metrics"]["mae"]["ci_low"] <= d["models"]["probe"]["metrics"]["mae"]["value"]


def test_positive_class_orders_classes():
    rng, X, groups, score = _data(7)
    y = np.where(score > 0, "AD", "CN")
    r = fit_probe(X, y, groups, n_boot=0, positive_class="AD")
    assert r.classes == ["CN", "AD"]
    assert np.mean(r.probe.predict(X) == y) > 0.8


def test_covariates_add_models_in_the_same_folds():
    """A covariate carrying signal absent from X: 'probe+covariates' beats 'probe'; the probe stays on X."""
    rng, X, groups, score = _data(3)
    subj_cov = rng.normal(size=N_SUB)
    cov = np.repeat(subj_cov, N_SES)  # a per-subject quantity, like brain volume
    y = 60 + 4 * score + 8 * cov + rng.normal(0, 1, size=score.size)
    cov_nan = cov.copy()
    cov_nan[::17] = np.nan  # missing values are imputed inside the training folds
    res = fit_probe(X, y, groups, seed=0, n_boot=100, target="age", covariates=cov_nan[:, None])
    assert set(res.models) == {"probe", "trivial", "covariates", "probe+covariates"}
    mae = {k: v.metrics["mae"].value for k, v in res.models.items()}
    assert mae["probe+covariates"] < 0.7 * mae["probe"]
    assert mae["probe+covariates"] < 0.7 * mae["covariates"]
    assert "probe-probe+covariates" in res.deltas
    assert res.probe.coef.shape[-1] == DIM  # the saved direction is in y_sem space only
    with pytest.raises(UsageError, match="covariates has"):
        fit_probe(X, y, groups, n_boot=0, covariates=cov[:5, None])
