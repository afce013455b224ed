"""Session times, lerp/slerp and fill planning."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldae_bids.analysis.longitudinal import (
    format_session_label,
    interpolate_codes,
    leave_one_out_plan,
    lerp,
    linear_blend,
    nearest_session,
    parse_session_label,
    plan_fills,
    session_times,
    slerp,
)
from ldae_bids.errors import UsageError


# --- slerp / lerp --------------------------------------------------------------------------------
def _unit(rng, shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v)


def test_slerp_endpoints_and_norm():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, (3, 4, 5)), _unit(rng, (3, 4, 5))
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-12)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-12)
    for t in np.linspace(0, 1, 11):
        assert np.linalg.norm(slerp(a, b, t)) == pytest.approx(1.0)
    assert slerp(a, b, 0.3).shape == a.shape


def test_slerp_midpoint_symmetric_and_on_the_arc():
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 64), _unit(rng, 64)
    m = slerp(a, b, 0.5)
    np.testing.assert_allclose(m, slerp(b, a, 0.5), atol=1e-12)
    assert float(m @ a) == pytest.approx(float(m @ b))  # equal angles to both ends
    omega = math.acos(float(a @ b))
    assert math.acos(float(m @ a)) == pytest.approx(omega / 2)
    np.testing.assert_allclose(slerp(a, b, 0.25), slerp(b, a, 0.75), atol=1e-12)


def test_slerp_nearly_parallel_and_opposite_are_finite():
    rng = np.random.default_rng(2)
    a = _unit(rng, 100)
    b = a + 1e-9 * rng.normal(size=100)
    out = slerp(a, b, 0.5)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, lerp(a, b, 0.5), atol=1e-8)
    assert np.isfinite(slerp(a, -a, 0.3)).all()
    assert np.isfinite(slerp(np.zeros(100), a, 0.3)).all()


def test_slerp_interpolates_norm_linearly_for_gaussian_noise():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 8, 8)), 2 * rng.normal(size=(4, 8, 8))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    assert np.linalg.norm(slerp(a, b, 0.4)) == pytest.approx(0.6 * na + 0.4 * nb)


def test_slerp_and_lerp_on_torch_tensors():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = slerp(a, b, 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == a.shape
    np.testing.assert_allclose(out.numpy(), slerp(a.numpy(), b.numpy(), 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lerp(a, b, 0.25), 0.75 * a + 0.25 * b)
    y, x = interpolate_codes(a[0, 0], b[0, 0], a, b, 0.5)
    assert y.shape == (4,) and x.shape == a.shape


def test_shape_mismatch_refused():
    with pytest.raises(ValueError):
        slerp(np.ones(3), np.ones(4), 0.5)
    with pytest.raises(ValueError):
        lerp(np.ones(3), np.ones(4), 0.5)


# --- session times -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label, months",
    [
        ("M06", 6), ("m12", 12), ("ses-M24", 24), ("month24", 24), ("Months_3", 3), ("y2", 24), ("year1", 12),
        ("bl", 0), ("baseline", 0), ("BL", 0), ("6m", 6), ("2y", 24), ("d365", 365 / (365.2425 / 12)),
        ("w52", 52 * 12 / (365.2425 / 7)), ("m1.5", 1.5),
    ],
)
def test_parse_session_label(label, months):
    assert parse_session_label(label) == pytest.approx(months)


@pytest.mark.parametrize("label", ["1", "02", "pre", "visitA", "M"])
def test_unparseable_labels(label):
    assert parse_session_label(label) is None


def test_custom_label_pattern():
    assert parse_session_label("visit3", [(r"visit(?P<value>\d+)", 6.0)]) == 18.0


def test_session_times_from_labels_relative_to_first():
    t = session_times(["M12", "M06", "M36"])
    assert t == {"M06": 0.0, "M12": 6.0, "M36": 30.0}
    assert list(t) == ["M06", "M12", "M36"]
    with pytest.raises(UsageError, match="1"):
        session_times(["1", "2"])


def test_session_times_from_tsv(tmp_path):
    p = tmp_path / "sub-01_sessions.tsv"
    p.write_text("session_id\tacq_time\tage\nses-A\t2020-01-01T10:00:00\t70\nses-B\t2021-01-01T10:00:00\t71\n"
                 "ses-C\t2020-07-02\t70.5\n")
    t = session_times(p)
    assert t["A"] == 0.0
    assert t["B"] == pytest.approx(366 / (365.2425 / 12))  # 2020 is a leap year
    assert list(t) == ["A", "C", "B"]
    assert session_times(p, source="age") == pytest.approx({"A": 0.0, "C": 6.0, "B": 12.0})


def test_session_times_auto_falls_back(tmp_path):
    p = tmp_path / "sub-01_sessions.tsv"
    p.write_text("session_id\tacq_time\tage\nses-M00\tn/a\t70\nses-M12\t2021-01-01\tn/a\n")
    assert session_times(p) == {"M00": 0.0, "M12": 12.0}  # neither column complete -> labels
    with pytest.raises(UsageError):
        session_times(p, source="acq_time")


def test_format_session_label():
    assert format_session_label(18) == "M18"
    assert format_session_label(6.0) == "M06"
    assert format_session_label(7.5) == "M07p5"


# --- planning ------------------------------------------------------------------------------------
TIMES = {"M00": 0.0, "M06": 6.0, "M24": 24.0, "M36": 36.0}


def test_plan_fills_brackets():
    plan = plan_fills(TIMES, [3, 12, 18, 30])
    assert [f.label for f in plan] == ["M03", "M12", "M18", "M30"]
    f12 = plan[1]
    assert (f12.before_label, f12.after_label) == ("M06", "M24")
    assert f12.fraction == pytest.approx(6 / 18)
    for f in plan:
        assert f.before_time < f.target_time < f.after_time and 0 < f.fraction < 1
        assert f.gap == f.after_time - f.before_time
    assert not plan.skipped


def test_plan_fills_refuses_extrapolation_and_existing():
    plan = plan_fills(TIMES, [-6, 6, 40, 12, 12])
    assert [f.target_time for f in plan] == [12]
    reasons = {s.target_time: s.reason for s in plan.skipped}
    assert "no extrapolation" in reasons[-6] and "before the first" in reasons[-6]
    assert "after the last" in reasons[40]
    assert "M06" in reasons[6]
    assert len(plan.skipped) == 4  # the duplicate 12 too


def test_plan_fills_schedule_step():
    plan = plan_fills(TIMES, step=6)
    assert [f.target_time for f in plan] == [12, 18, 30]
    assert {s.target_time for s in plan.skipped} == {0, 6, 24, 36}
    with pytest.raises(UsageError):
        plan_fills(TIMES, [3], step=6)
    with pytest.raises(UsageError):
        plan_fills(TIMES, step=0)


def test_plan_fills_needs_two_sessions():
    plan = plan_fills({"M00": 0.0}, [6])
    assert len(plan) == 0 and "fewer than two" in plan.skipped[0].reason


def test_leave_one_out_plan():
    fills = leave_one_out_plan(TIMES)
    got = [(f.held_out, f.before_label, f.after_label) for f in fills]
    assert got == [("M06", "M00", "M24"), ("M24", "M06", "M36")]
    assert fills[0].fraction == pytest.approx(6 / 24)
    assert leave_one_out_plan({"a": 0, "b": 1}) == []


def test_baselines():
    f = plan_fills(TIMES, [9])[0]
    assert nearest_session(f) == "M06"
    assert nearest_session(plan_fills(TIMES, [20])[0]) == "M24"
    a, b = np.zeros((2, 2)), np.ones((2, 2))
    np.testing.assert_allclose(linear_blend(a, b, f.fraction), np.full((2, 2), 3 / 18))
