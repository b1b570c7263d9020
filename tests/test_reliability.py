"""Calibration metrics against independent references (sklearn, and definitions written here)."""

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.evaluation.reliability import (
    brier,
    calibration_row,
    cross_fitted,
    ece,
    isotonic_apply,
    isotonic_fit,
    platt_fit,
    reliability,
    win_probabilities,
)


def _ece_reference(p, y, bins):
    """Equal-mass bins written out: sort, cut into `bins` nearly equal consecutive groups (the
    probabilities here are distinct, so no bin boundary falls inside a tie)."""
    order = sorted(range(len(p)), key=lambda i: (p[i], i))
    size, extra = divmod(len(p), bins)
    total, start = 0.0, 0
    for b in range(bins):
        n = size + (1 if b < extra else 0)
        group = order[start:start + n]
        start += n
        if group:
            total += n * abs(np.mean([y[i] for i in group]) - np.mean([p[i] for i in group]))
    return total / len(p)


def test_ece_brier_and_reliability_against_references():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    p = rng.random(203)
    y = (rng.random(203) < p ** 2).astype(float)
    assert ece(p, y, 10) == pytest.approx(_ece_reference(list(p), list(y), 10), abs=1e-12)
    assert brier(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    points = reliability(p, y, 10)
    assert [n for *_, n in points] == [21, 21, 21, 20, 20, 20, 20, 20, 20, 20]
    assert all(a[0] <= b[0] for a, b in zip(points[:-1], points[1:], strict=True))  # by confidence
    # Equal probabilities share a bin: a constant 0.5 on 30% positives has ECE exactly 0.2.
    assert ece(np.full(100, 0.5), np.r_[np.ones(30), np.zeros(70)], 10) == pytest.approx(0.2)


def test_isotonic_equals_sklearn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(1)
    s = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-2 * s))).astype(float)
    ref = IsotonicRegression(out_of_bounds="clip").fit(s, y)
    model = isotonic_fit(s, y)
    probe = np.linspace(-3, 3, 61)
    np.testing.assert_allclose(isotonic_apply(model, s), ref.predict(s), atol=1e-12)
    inside = (probe >= s.min()) & (probe <= s.max())
    # Between training points sklearn interpolates linearly, PAV here is a step: they agree on
    # the training points and bracket each other in between.
    assert np.all(np.diff(isotonic_apply(model, probe)) >= 0) and inside.any()


def test_platt_recovers_a_logistic_and_matches_sklearn_closely():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    s = rng.normal(0.3, 0.05, size=4000)  # raw CLIP-like scores: small spread
    y = (rng.random(4000) < 1 / (1 + np.exp(-(40 * (s - 0.3) + 0.2)))).astype(float)
    a, b = platt_fit(s, y)
    assert a == pytest.approx(40, rel=0.15) and (a * 0.3 + b) == pytest.approx(0.2, abs=0.15)
    ref = LogisticRegression(C=1e9).fit(s[:, None], y)
    assert a == pytest.approx(ref.coef_[0, 0], rel=0.02)


def test_cross_fitting_never_sees_the_evaluated_prompts():
    rng = np.random.default_rng(3)
    groups = np.repeat([f"p{i}" for i in range(10)], 20)
    s = rng.normal(size=200)
    y = (s > 0).astype(float)
    p = cross_fitted(s, y, groups, "isotonic", k=5, seed=0)
    assert ((p >= 0) & (p <= 1)).all()
    # Changing one prompt's labels changes no probability of that prompt's own images.
    y2 = y.copy()
    y2[groups == "p3"] = 1 - y2[groups == "p3"]
    p2 = cross_fitted(s, y2, groups, "isotonic", k=5, seed=0)
    np.testing.assert_array_equal(p[groups == "p3"], p2[groups == "p3"])
    assert not np.array_equal(p, p2)
    with pytest.raises(HarnessError, match="unknown probability mapping"):
        cross_fitted(s, y, groups, "spline")


def test_calibration_row_intervals_and_errors():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40), 10)
    p = rng.random(400)
    y = (rng.random(400) < p).astype(float)
    row = calibration_row(p, y, groups, bins=10, n_boot=200, seed=0)
    assert row["ece_ci"][0] <= row["ece"] <= row["ece_ci"][1]
    assert row["brier_ci"][0] <= row["brier"] <= row["brier_ci"][1]
    assert len(row["reliability"]) == 10
    with pytest.raises(HarnessError, match="probabilities in \\[0, 1\\]"):
        calibration_row(p * 2, y, groups)


def test_win_probabilities_of_a_good_preference_model():
    rng = np.random.default_rng(5)
    diff = rng.normal(size=600)
    wins = (rng.random(600) < 1 / (1 + np.exp(-3 * diff))).astype(float)
    p = win_probabilities(diff, wins, np.repeat(np.arange(60), 10))
    assert ece(p, wins, 10) < 0.08 and brier(p, wins) < brier(np.full(600, 0.5), wins)
