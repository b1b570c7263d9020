"""TextNorm, ensembles and honest hyperparameter selection."""

import math

import numpy as np
import pandas as pd
import pytest

from harness.errors import HarnessError
from harness.evaluation.calibration import ContrastiveScores, calibrate, make_folds
from harness.evaluation.metrics import prompt_metrics
from harness.plugins import get_plugins
from harness_plugins.textnorm import textnorm_confidence as textnorm_tensor

RAW_A = np.array([[0.30, 0.20, 0.25], [0.10, 0.40, 0.20]])  # 2 images, prompt + 2 contrastive
RAW_B = np.array([[1.5, -0.5, 0.0], [-1.0, 0.5, 2.0]])


def by_hand(raw, s):
    return [math.exp(s * r[0]) / sum(math.exp(s * x) for x in r) for r in raw.tolist()]


def normalizer(name, **kw):
    return get_plugins().normalizers.get(name)(**kw)


def test_textnorm_by_hand():
    out = normalizer("textnorm", scale=10.0)({"clip": RAW_A})
    assert out == pytest.approx(by_hand(RAW_A, 10.0), abs=1e-12)
    assert out[0] == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2) + math.exp(2.5)))
    # Per-model scales.
    tn = normalizer("textnorm", scale={"ir": 2.0})
    assert tn({"ir": RAW_B}) == pytest.approx(by_hand(RAW_B, 2.0), abs=1e-12)
    with pytest.raises(HarnessError, match="no scale given for model 'clip'"):
        tn({"clip": RAW_A})


def test_ensembles_by_hand():
    scales = {"clip": 10.0, "ir": 1.0}
    a, b = np.array(by_hand(RAW_A, 10.0)), np.array(by_hand(RAW_B, 1.0))
    mean = normalizer("mean", scale=scales)({"clip": RAW_A, "ir": RAW_B})
    assert mean == pytest.approx((a + b) / 2, abs=1e-12)
    ur = normalizer("ur", scale=scales, lam=0.5)({"clip": RAW_A, "ir": RAW_B})
    std = np.abs(a - b) / 2  # population std of two values
    assert ur == pytest.approx((a + b) / 2 - 0.5 * std, abs=1e-12)
    z = normalizer("zscore")({"clip": RAW_A, "ir": RAW_B})
    assert z == pytest.approx([((0.3 - 0.2) / 0.1 + (1.5 + 1) / 2.5 * 1) / 2,
                               ((0.1 - 0.2) / 0.1 + (-1 - 0.25) / 1.25) / 2], abs=1e-9)
    assert normalizer("identity")({"clip": RAW_A}).tolist() == [0.30, 0.10]


def test_textnorm_is_shift_invariant_and_needs_contrastive_prompts():
    tn = normalizer("textnorm", scale=3.0)
    assert tn({"m": RAW_B + 7.5}) == pytest.approx(tn({"m": RAW_B}), abs=1e-12)
    with pytest.raises(HarnessError, match="prompt set of size 0"):
        tn({"m": RAW_B[:, :1]})
    with pytest.raises(HarnessError, match="use the 'mean' or 'ur' ensemble"):
        tn({"a": RAW_A, "b": RAW_B})
    with pytest.raises(HarnessError, match="lambda must be >= 0"):
        normalizer("ur", lam=-1)


def synthetic(P=30, N=20, C=4, seed=0, models=("a", "b")):
    """Prompts where the image's own-prompt margin over contrastive prompts predicts the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(P):
        for i in range(N):
            good = rng.random() < 0.5
            g = (1.0 if good else 0.0) if rng.random() < 0.8 else rng.random()
            for m_idx, m in enumerate(models):
                base = rng.normal(0, 1) + 5 * p  # per-prompt offsets: raw scores are not comparable
                own = base + (0.6 if good else 0.0) + rng.normal(0, 0.5 + m_idx)
                rows.append((f"p{p}", f"i{i}", int(good), g, m, 0, own))
                for c in range(1, C + 1):
                    rows.append((f"p{p}", f"i{i}", int(good), g, m, c, base + rng.normal(0, 0.5)))
    frame = pd.DataFrame(rows, columns=["prompt", "image", "binary", "graded", "model", "column", "score"])
    return ContrastiveScores.from_long(frame, "synthetic"), frame


def test_tensor_textnorm_matches_the_normalizer():
    data, frame = synthetic(P=3, N=4, C=2)
    tensor = textnorm_tensor(data.raw["a"], data.column_mask, 3.0)
    tn = normalizer("textnorm", scale=3.0)
    for p, prompt in enumerate(data.prompts):
        sub = frame[(frame.prompt == prompt) & (frame.model == "a")]
        raw = sub.pivot(index="image", columns="column", values="score").loc[data.images[p]].to_numpy()
        assert tensor[p] == pytest.approx(tn({"a": raw}), abs=1e-12)


def test_calibrated_metrics_are_real_metrics():
    data, frame = synthetic(P=6, N=10)
    result = calibrate(data, "textnorm", ["a"], selection="cv", k=3)
    for fold in result.chosen:
        assert fold["scale"] in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    folds = make_folds(6, 3, 0)
    for f, test in enumerate(folds):
        s = result.chosen[f]["scale"]
        for p in test:
            prompt = data.prompts[p]
            sub = frame[(frame.prompt == prompt) & (frame.model == "a")]
            raw = sub.pivot(index="image", columns="column", values="score").loc[data.images[p]].to_numpy()
            labels = sub[sub.column == 0].set_index("image").loc[data.images[p]]
            expected = prompt_metrics(by_hand(raw, s), labels["binary"], labels["graded"])
            got = result.per_prompt.iloc[p]
            for k, v in expected.items():
                assert got[k] == pytest.approx(v, abs=1e-9, nan_ok=True)


def test_textnorm_beats_raw_scores_with_per_prompt_offsets():
    data, _ = synthetic(P=30)
    raw = calibrate(data, "identity", ["a"]).per_prompt["auroc"].mean()
    tn = calibrate(data, "textnorm", ["a"]).per_prompt["auroc"].mean()
    ur = calibrate(data, "ur", ["a", "b"]).per_prompt["auroc"].mean()
    assert tn > raw + 0.05
    assert ur > 0.6


def test_cross_validation_never_sees_test_fold_labels():
    data, _ = synthetic(P=25, seed=3)
    folds = make_folds(25, 5, seed=0)
    before = calibrate(data, "ur", ["a", "b"], k=5, seed=0)
    # Plant a leak: rewrite fold 0's labels so that they reward the smallest scale and lambda
    # (label = rank of the scale-0.1 score), which the training folds never favour.
    leaky = ContrastiveScores(data.subset, data.prompts, data.raw, data.image_mask, data.column_mask,
                              data.binary.copy(), data.graded.copy(), data.images)
    planted = textnorm_tensor(data.raw["b"], data.column_mask, 0.1)
    for p in folds[0]:
        cut = np.median(planted[p])
        leaky.binary[p] = (planted[p] > cut).astype(float)
        leaky.graded[p] = leaky.binary[p]
    after = calibrate(leaky, "ur", ["a", "b"], k=5, seed=0)
    assert after.chosen[0] == before.chosen[0]  # fold 0's choice only saw folds 1-4
    # The planted labels did change what fold 0's prompts score, and an oracle would follow them.
    assert not np.allclose(after.per_prompt["auroc"].iloc[folds[0]], before.per_prompt["auroc"].iloc[folds[0]])
    oracle_before = calibrate(data, "textnorm", ["b"], selection="oracle")
    oracle_after = calibrate(leaky, "textnorm", ["b"], selection="oracle")
    changed = [oracle_before.chosen[p]["scale"] != oracle_after.chosen[p]["scale"] for p in folds[0]]
    assert any(changed)


def test_oracle_is_an_upper_envelope_and_labelled():
    data, _ = synthetic(P=20, seed=4)
    cv = calibrate(data, "textnorm", ["a"])
    oracle = calibrate(data, "textnorm", ["a"], selection="oracle")
    assert (oracle.per_prompt["auroc"] >= cv.per_prompt["auroc"] - 1e-12).all()
    assert oracle.selection == "oracle" and "oracle" in oracle.summary()
    assert cv.summary().startswith("5-fold cv: scale=")


def test_calibration_errors():
    data, _ = synthetic(P=4, N=5)
    with pytest.raises(HarnessError, match="textnorm takes one reward model"):
        calibrate(data, "textnorm", ["a", "b"])
    with pytest.raises(HarnessError, match="unknown selection metric 'aucroc'"):
        calibrate(data, "textnorm", ["a"], metric="aucroc")
    with pytest.raises(HarnessError, match="no scores for model"):
        calibrate(data, "textnorm", ["zzz"])
    no_sets = ContrastiveScores(data.subset, data.prompts, {"a": data.raw["a"][:, :, :1]}, data.image_mask,
                                data.column_mask[:, :1], data.binary, data.graded, data.images)
    with pytest.raises(HarnessError, match="needs contrastive prompts"):
        calibrate(no_sets, "textnorm", ["a"])


def test_leaderboard_calibration_drops_images_a_model_could_not_score():
    from harness.evaluation.leaderboard import _calibrated_rows, _common_images

    data, frame = synthetic(P=6, N=8, C=3)
    frame = frame.assign(subset="s")
    labels = frame[(frame.column == 0) & (frame.model == "a")][["subset", "prompt", "image", "binary", "graded"]]
    scores = frame.rename(columns={"model": "method"}).drop(columns=["binary", "graded"])
    scores["text"] = ""
    gone = (scores.method == "b") & (scores.prompt == "p0") & (scores.image == "i3")
    from harness.evaluation.config import CalibrationSection

    jobs = [("textnorm", ["a"]), ("textnorm", ["b"]), ("ur", ["a", "b"])]
    common, kept = _common_images(scores[~gone], labels, 2)
    assert len(kept) == len(labels) - 1 and len(common) == len(scores) - 2 * 4  # a's i3 too
    parts, record, _ = _calibrated_rows(common, kept, jobs, CalibrationSection(prompts="x", folds=3), seed=0)
    rows = pd.concat(parts)
    p0 = rows[(rows.prompt == "p0")]
    assert set(p0["n_images"]) == {7}  # i3 left out for every model, once per image
    assert set(rows[rows.prompt == "p1"]["n_images"]) == {8}
    # The same numbers as calibrating without that image from the start.
    ref = calibrate(ContrastiveScores.from_long(frame[~((frame.prompt == "p0") & (frame.image == "i3"))], "s"),
                    "textnorm", ["a"], k=3, seed=0)
    got = rows[rows.method == "textnorm(a)"].set_index("prompt")["auroc"]
    np.testing.assert_allclose(got.loc[ref.per_prompt["prompt"]].to_numpy(), ref.per_prompt["auroc"], atol=1e-12)


@pytest.mark.parametrize("name,models", [("textnorm", ["a"]), ("mean", ["a", "b"]), ("ur", ["a", "b"]),
                                         ("identity", ["a"]), ("zscore", ["a", "b"])])
def test_batched_path_equals_the_per_prompt_contract(name, models):
    """Each built-in's math exists once: its batched path over padded prompts equals calling it on
    each prompt's real images and columns alone, which is all a plugin must implement."""
    from harness.evaluation.calibration import normalize

    data, _ = synthetic(P=8, N=10, C=4, seed=5)
    # Ragged prompts: fewer images and contrastive prompts for some.
    data.image_mask[2, 7:] = False
    data.column_mask[3, 3:] = False
    cls = get_plugins().normalizers.get(name)
    values = {"scale": {"a": 3.0, "b": 0.3}} if cls.hyperparameters else {}
    fast = normalize(cls(**values), data, models)

    class ContractOnly(cls):
        def batched(self, scores, column_mask, image_mask):
            return None

    ContractOnly.id = name
    slow = normalize(ContractOnly(**values), data, models)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert fast[2, 7:].tolist() == [0.0] * 3
