import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from harness.evaluation.metrics import (
    METRICS,
    aggregate,
    batch_prompt_metrics,
    paired_bootstrap,
    per_prompt_metrics,
    prompt_metrics,
)


def ap_at_k_reference(scores, labels, k):
    """AP@K written out literally from the definition in PAPER.md."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
    hits, total = 0, 0.0
    for rank, i in enumerate(order[:k], start=1):
        if labels[i] == 1:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_metrics_match_sklearn_and_scipy(tied):
    warnings.simplefilter("ignore")  # scipy warns on constant input
    rng = np.random.default_rng(1 if tied else 2)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(2, 70))
        scores = rng.integers(0, 4, n).astype(float) if tied else rng.normal(size=n)
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        graded = (y + rng.integers(0, 2, n) + rng.integers(0, 2, n)) / 3
        m = prompt_metrics(scores, y, graded)
        assert m["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        assert m["auprc"] == pytest.approx(average_precision_score(y, scores), abs=1e-12)
        # Constant scores: both undefined (NaN).
        ref_s, ref_k = spearmanr(scores, graded).statistic, kendalltau(scores, graded).statistic
        assert m["spearman"] == pytest.approx(ref_s, abs=1e-12, nan_ok=True)
        assert m["kendall"] == pytest.approx(ref_k, abs=1e-12, nan_ok=True)
        for name, k in (("ap5", 5), ("ap10", 10), ("ap25", 25)):
            assert m[name] == pytest.approx(ap_at_k_reference(list(scores), list(y), k), abs=1e-12)
        checked += 1
    assert checked > 100


def test_ap_at_k_by_hand():
    # ranks: 1:+ 2:- 3:+ 4:- 5:+ 6:+
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    y = [1, 0, 1, 0, 1, 1]
    m = prompt_metrics(scores, y, y)
    assert m["ap5"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    # K larger than the number of images: capped at 6 images.
    assert m["ap10"] == pytest.approx((1 + 2 / 3 + 3 / 5 + 4 / 6) / 4)
    assert m["ap25"] == m["ap10"]
    # No hit in the top K -> 0, not NaN.
    m = prompt_metrics([3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1])
    assert m["ap5"] == 0.0
    assert m["ap10"] == pytest.approx(1 / 6)


def test_step_wise_auprc_is_not_trapezoidal():
    scores = [0.9, 0.8, 0.7, 0.6]
    y = [0, 1, 0, 1]
    # Step-wise: positives at ranks 2 and 4 -> (1/2 + 2/4) / 2.
    assert prompt_metrics(scores, y, y)["auprc"] == pytest.approx(0.5)


def test_one_class_prompt_is_undefined_not_zero():
    m = prompt_metrics([0.1, 0.2, 0.3], [1, 1, 1], [1.0, 1.0, 0.67])
    assert np.isnan(m["auroc"])
    assert m["ap5"] == 1.0
    m = prompt_metrics([0.1, 0.2, 0.3], [0, 0, 0], [0.0, 0.0, 0.33])
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"])


def test_ties_count_half_in_auroc():
    assert prompt_metrics([1.0, 1.0], [0, 1], [0.0, 1.0])["auroc"] == 0.5
    assert prompt_metrics([0.5, 0.5, 0.9], [0, 1, 1], [0, 1, 1])["auroc"] == pytest.approx(0.75)


def test_padded_batch_equals_prompt_by_prompt():
    rng = np.random.default_rng(3)
    lengths = [50, 7, 23, 2, 50]
    rows = [(rng.normal(size=n), rng.integers(0, 2, n), rng.integers(0, 4, n) / 3) for n in lengths]
    rows[3] = (np.array([0.1, 0.2]), np.array([0, 1]), np.array([0.0, 1.0]))
    N = max(lengths)
    s, y, g, m = (np.zeros((len(rows), N)) for _ in range(4))
    for i, (ss, yy, gg) in enumerate(rows):
        s[i, : len(ss)], y[i, : len(ss)], g[i, : len(ss)], m[i, : len(ss)] = ss, yy, gg, 1
    # Padding values must not matter.
    s[m == 0] = 1e9
    batch = batch_prompt_metrics(s, y, g, m.astype(bool))
    for i, (ss, yy, gg) in enumerate(rows):
        single = prompt_metrics(ss, yy, gg)
        for name in METRICS:
            np.testing.assert_allclose(batch[name][i], single[name], atol=1e-12, equal_nan=True)


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN or infinite"):
        prompt_metrics([0.1, float("nan")], [0, 1], [0, 1])


def test_per_prompt_metrics_groups_a_long_table():
    frame = pd.DataFrame({
        "subset": ["a"] * 4 + ["b"] * 3,
        "prompt": ["p"] * 4 + ["q"] * 3,
        "score": [0.1, 0.9, 0.4, 0.3, 0.5, 0.2, 0.8],
        "binary": [0, 1, 1, 0, 1, 0, 0],
        "graded": [0, 1, 0.67, 0.33, 1, 0, 0.33],
    })
    out = per_prompt_metrics(frame)
    assert list(out["prompt"]) == ["p", "q"]
    assert list(out["n_images"]) == [4, 3]
    assert out.loc[0, "auroc"] == pytest.approx(roc_auc_score([0, 1, 1, 0], [0.1, 0.9, 0.4, 0.3]))
    assert out.loc[1, "auroc"] == pytest.approx(0.5)  # 0.5 beats 0.2, loses to 0.8


def test_aggregate_drops_one_class_prompts_and_bootstraps_reproducibly():
    rng = np.random.default_rng(4)
    per_prompt = pd.DataFrame({m: rng.uniform(0.4, 0.9, 40) for m in METRICS})
    per_prompt.loc[[3, 7], "auroc"] = np.nan  # one-class prompts
    a = aggregate(per_prompt, n_boot=500, seed=7)
    b = aggregate(per_prompt, n_boot=500, seed=7)
    assert a == b
    assert a["n_prompts"] == 38
    kept = per_prompt.drop(index=[3, 7])
    for m in METRICS:
        assert a[m] == pytest.approx(kept[m].mean())
        lo, hi = a[f"{m}_ci"]
        assert lo < a[m] < hi
    # The bootstrap interval is close to the normal approximation of the standard error.
    se = kept["auroc"].std(ddof=1) / np.sqrt(len(kept))
    width = a["auroc_ci"][1] - a["auroc_ci"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert aggregate(per_prompt, n_boot=500, seed=8)["auroc_ci"] != a["auroc_ci"]


def test_paired_bootstrap():
    rng = np.random.default_rng(5)
    a = rng.uniform(0.5, 0.9, 200)
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    better = paired_bootstrap(a + 0.05 + rng.normal(0, 0.02, 200), a, seed=1)
    assert better["diff"] == pytest.approx(0.05, abs=0.01)
    assert better["ci_low"] > 0 and better["p_value"] < 0.01
    noisy = paired_bootstrap(a + rng.normal(0, 0.1, 200), a, seed=1)
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["p_value"] > 0.05
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:10])
