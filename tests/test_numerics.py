"""Numbers that are never silently wrong: exact TextNorm, ties, the simplest hyperparameter on a
tie, rows side by side on the same images, integer counts."""

import json

import numpy as np
import pandas as pd
import pytest
from ray_models import OffsetColor

from harness import LeaderboardConfig, run_leaderboard
from harness.evaluation.calibration import ContrastiveScores, calibrate
from harness.evaluation.metrics import merge_ties, prompt_metrics
from harness.plugins import Entry, get_plugins
from harness.types import Hyperparameter
from harness_plugins.textnorm import SCALES, MeanEnsemble, TextNorm, UREnsemble


@pytest.mark.parametrize("contrastive", [1, 2, 3, 5, 7, 32])
def test_textnorm_of_a_prompt_blind_reward_is_exactly_one_over_one_plus_c(contrastive):
    rng = np.random.default_rng(contrastive)
    for scale in SCALES:
        own = rng.normal(0, rng.uniform(0.01, 100), size=(40, 1))
        raw = np.repeat(own, 1 + contrastive, axis=1)
        assert (TextNorm(scale=scale)({"m": raw}) == 1 / (1 + contrastive)).all()
        assert (MeanEnsemble(scale=scale)({"a": raw, "b": raw * 3}) == 1 / (1 + contrastive)).all()
        ur = UREnsemble(scale=scale, lam=0.5)({"a": raw, "b": raw - 2})
        assert (ur == 1 / (1 + contrastive)).all()  # no spread across models either


def test_textnorm_is_still_the_softmax():
    raw = np.array([[0.31, 0.25, 0.40], [0.2, 0.2, -0.1]])
    for scale in (0.3, 10.0, 100.0):
        z = np.exp(scale * raw)
        assert TextNorm(scale=scale)({"m": raw}) == pytest.approx(z[:, 0] / z.sum(1), rel=1e-14)
    # Large scales neither overflow nor lose the winner.
    assert TextNorm(scale=1e6)({"m": raw})[0] == 0.0
    assert TextNorm(scale=1e6)({"m": raw})[1] == pytest.approx(0.5)


def test_scores_within_rounding_noise_are_ties():
    third = 1 / 3
    noisy = [third, third + 5.551115123125783e-17, third - 5.551115123125783e-17, third]
    labels = [1, 0, 1, 0]
    assert prompt_metrics(noisy, labels, labels)["auroc"] == 0.5
    # What the noise alone would have said.
    assert prompt_metrics([2.0, 3.0, 1.0, 2.0], labels, labels)["auroc"] == 0.125
    # Real differences stay: 1e-6 apart is not noise.
    assert prompt_metrics([third + 1e-6, third, third + 1e-6, third], labels, labels)["auroc"] == 1.0
    merged = merge_ties(np.array([[0.3, third, third * (1 + 1e-12), 0.5, third * (1 - 1e-13)]]),
                        np.ones((1, 5), bool))
    assert merged[0, 1] == merged[0, 2] == merged[0, 4] and merged[0, 0] == 0.3 and merged[0, 3] == 0.5
    # Padding is left alone.
    pad = merge_ties(np.array([[1.0, 1.0 + 1e-15, 7.0]]), np.array([[True, False, True]]))
    assert pad.tolist() == [[1.0, 1.0 + 1e-15, 7.0]]


def _blind_data(prompts=12, images=8, contrastive=3, seed=0):
    """A prompt-blind reward's raw scores (every column equal) with random labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for i in range(images):
            own = rng.normal()
            b = int(i % 2 == 0) if p % 3 else int(rng.random() < 0.5) or int(i == 0)
            rows += [{"prompt": f"p{p}", "image": f"{p}-{i}", "binary": b, "graded": float(b),
                      "model": "blind", "column": k, "score": own} for k in range(1 + contrastive)]
    return ContrastiveScores.from_long(pd.DataFrame(rows), "all")


def test_calibrating_a_prompt_blind_reward_picks_the_simplest_scale_and_gets_one_half():
    data = _blind_data()
    cv = calibrate(data, TextNorm, ["blind"], selection="cv", k=4)
    assert [c["scale"] for c in cv.chosen] == [1.0] * 4
    assert (cv.per_prompt["auroc"].dropna() == 0.5).all()
    oracle = calibrate(data, TextNorm, ["blind"], selection="oracle")
    assert {c["scale"] for c in oracle.chosen} == {1.0}
    both = ContrastiveScores(data.subset, data.prompts, {"a": data.raw["blind"], "b": data.raw["blind"] * 2},
                             data.image_mask, data.column_mask, data.binary, data.graded, data.images)
    ur = calibrate(both, UREnsemble, ["a", "b"], selection="cv", k=3)
    assert {c["lam"] for c in ur.chosen} == {0.0}  # the simplest lambda: no penalty
    assert {c["scale[a]"] for c in ur.chosen} == {c["scale[b]"] for c in ur.chosen} == {1.0}


def test_hyperparameter_complexity_orders_grid_steps_from_the_simplest_value():
    scale = Hyperparameter("scale", SCALES, default=1.0)
    assert sorted(SCALES, key=scale.complexity) == [1.0, 0.3, 3.0, 0.1, 10.0, 30.0, 100.0]
    lam = Hyperparameter("lam", (0.0, 0.05, 0.1, 0.25, 0.5, 1.0), default=0.5, simplest=0.0)
    assert sorted(lam.grid, key=lam.complexity)[:2] == [0.0, 0.05]


def test_a_real_difference_still_wins_over_simplicity():
    rng = np.random.default_rng(3)
    rows = []
    for p in range(10):
        for i in range(8):
            b = int(i < 4)
            own = 0.3 + 0.01 * b + rng.normal(0, 0.002)
            rows += [{"prompt": f"p{p}", "image": f"{p}-{i}", "binary": b, "graded": float(b),
                      "model": "m", "column": k, "score": own if k == 0 else 0.3 + rng.normal(0, 0.01)}
                     for k in range(4)]
    data = ContrastiveScores.from_long(pd.DataFrame(rows), "all")
    cv = calibrate(data, TextNorm, ["m"], k=5)
    assert {c["scale"] for c in cv.chosen} != {1.0}


@pytest.fixture(scope="module")
def blind_board(tmp_path_factory, tia2_dir):
    """TIA2 counting prompts with random images, one unreadable."""
    from PIL import Image

    from harness_plugins.tia2 import TIA2

    root = tmp_path_factory.mktemp("blind")
    labels = TIA2(tia2_dir).load(["counting"]).images
    share = labels.groupby("prompt", sort=False)["binary"].mean()
    chosen = list(share[(share > 0) & (share < 1)].index[:4])
    rows = labels[labels["prompt"].isin(chosen)]
    folder = root / "images" / "counting"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in rows["image"]:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    broken = rows["image"].iloc[0]
    (folder / broken).write_bytes(b"not an image")
    return root, rows, broken


def test_prompt_blind_reward_on_the_leaderboard(blind_board, tia2_dir):
    root, rows, broken = blind_board
    get_plugins().reward_models.add(Entry("blind", OffsetColor, "test-plugin"))
    config = LeaderboardConfig.from_dict({
        "data": {"benchmark": "tia2", "data": str(tia2_dir), "subsets": ["counting"],
                 "images": str(root / "images"), "skip_missing": True},
        "scoring": {"models": ["blind"], "cache": str(root / "scores.sqlite")},
        "calibration": {"normalizers": ["textnorm"], "prompts": "tia2", "folds": 2},
        "report": {"bootstrap": 100},
    })
    result = run_leaderboard(config)
    table = result.rows.set_index(["method", "source"])
    assert table.loc[("textnorm(blind)", "scored"), "auroc"] == 0.5
    assert table.loc[("textnorm(blind)", "scored"), "auroc_ci"] == [0.5, 0.5]
    chosen = next(c for c in result.manifest["calibration"] if c["method"] == "textnorm(blind)")["chosen"]
    assert [c["scale"] for c in chosen] == [1.0, 1.0]

    # The unreadable image is out of every row computed from images, the human row included.
    assert list(result.failed_images) == [str(root / "images" / "counting" / broken)]
    pp = result.per_prompt
    first = rows["prompt"].iloc[0]
    n_labelled = int((rows["prompt"] == first).sum())
    counts = pp[pp["prompt"] == first].set_index("source")["n_images"]
    assert counts["scored"].tolist() == [n_labelled - 1, n_labelled - 1]  # raw and textnorm
    assert counts["human"] == n_labelled - 1
    assert counts["reported"].tolist() == [n_labelled] * len(counts["reported"])
    assert any("1 images not scored by every model" in n for n in result.notes)
    assert result.manifest["data"]["n_images_evaluated"] == len(rows) - 1

    # Counts are integers everywhere they are written.
    from harness.evaluation.report import write_run

    out = write_run(root / "run", result, plots=False)
    assert pp["n_images"].dtype == np.int64 and pp["n_positive"].dtype == np.int64
    written = pd.read_csv(out / "per_prompt.csv")
    assert written["n_images"].dtype == np.int64
    assert all(isinstance(r["n_prompts"], int) for r in json.loads((out / "leaderboard.json").read_text()))
