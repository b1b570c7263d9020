"""Calibration in every leaderboard run: ECE and Brier with intervals and the reliability points,
from the method's own probability (TextNorm) or a mapping cross-fitted over prompts."""

import numpy as np
import pytest
from ray_models import OffsetColor
from test_protocols import Ranked

from harness import LeaderboardConfig, run_leaderboard
from harness.evaluation.reliability import brier, cross_fitted, ece
from harness.plugins import Entry, get_plugins


@pytest.fixture(scope="module")
def counting_images(tmp_path_factory, tia2_dir):
    from PIL import Image

    from harness_plugins.tia2 import TIA2

    root = tmp_path_factory.mktemp("cal")
    labels = TIA2(tia2_dir).load(["counting"]).images
    share = labels.groupby("prompt", sort=False)["binary"].mean()
    rows = labels[labels["prompt"].isin(list(share[(share > 0) & (share < 1)].index[:6]))]
    folder = root / "images" / "counting"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in rows["image"]:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return root, rows


def test_scored_and_textnorm_rows_carry_calibration(counting_images, tia2_dir, tmp_path):
    root, rows = counting_images
    get_plugins().reward_models.add(Entry("blind", OffsetColor, "test-plugin"))
    result = run_leaderboard(LeaderboardConfig.from_dict({
        "data": {"benchmark": "tia2", "data": str(tia2_dir), "subsets": ["counting"],
                 "images": str(root / "images"), "skip_missing": True},
        "scoring": {"models": ["blind"], "cache": str(root / "scores.sqlite")},
        "calibration": {"normalizers": ["textnorm"], "prompts": "tia2", "folds": 3},
        "report": {"bootstrap": 100, "calibration_bins": 5}}))
    table = result.rows.set_index(["method", "source"])
    # TextNorm of a prompt-blind reward is exactly 1/(1+C) for every image: one bin, so its ECE is
    # |mean(y) - 1/(1+C)| averaged over its C values, and Brier is the plain mean square.
    scores = result.scores[result.scores["method"] == "blind"]
    width = scores.groupby("image")["column"].max() + 1
    labelled = rows.set_index("image").loc[width.index]
    p = 1 / width.to_numpy()
    y = labelled["binary"].to_numpy(float)
    row = table.loc[("textnorm(blind)", "scored")]
    assert row["calibration"]["mapping"] == "native"
    assert row["ece"] == pytest.approx(ece(p, y, 5), abs=1e-12)
    assert row["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
    assert row["ece_ci"][0] <= row["ece"] <= row["ece_ci"][1]
    # The raw score gets a Platt mapping fitted on other prompts' images only.
    raw = table.loc[("blind", "scored")]
    assert raw["calibration"]["mapping"] == "platt" and len(raw["calibration"]["bins"]) == 5
    own = scores[scores["column"] == 0].merge(rows[["image", "prompt", "binary"]], on=["image", "prompt"])
    fitted = cross_fitted(own["score"].to_numpy(float), own["binary"].to_numpy(float),
                          own["prompt"].to_numpy(), "platt", seed=0)
    assert raw["ece"] == pytest.approx(ece(fitted, own["binary"].to_numpy(float), 5), abs=1e-12)
    assert raw["brier"] == pytest.approx(brier(fitted, own["binary"].to_numpy(float)), abs=1e-12)
    # Released per-prompt metrics are not probabilities: no calibration, and a note says why.
    assert np.isnan(table.loc[("clip", "reported"), "ece"])
    assert any("released data holds per-prompt metrics" in n for n in result.notes)
    assert any(n.startswith("calibration (native)") for n in result.notes)
    # Written: in leaderboard.json and a reliability diagram with every calibrated method.
    import json

    from harness.evaluation.report import write_run

    out = write_run(tmp_path / "run", result, plots=True)
    written = {(r["method"], r["source"]): r for r in json.loads((out / "leaderboard.json").read_text())}
    assert written[("textnorm(blind)", "scored")]["ece"] == pytest.approx(row["ece"])
    assert written[("clip", "reported")]["ece"] is None
    assert (out / "plots" / "reliability.png").stat().st_size > 10_000


def test_preference_rows_get_a_win_probability_calibration(tmp_path):
    from PIL import Image

    get_plugins().benchmarks.add(Entry("ranked", Ranked, "test-plugin"))
    get_plugins().reward_models.add(Entry("blind", OffsetColor, "test-plugin"))
    rng = np.random.default_rng(1)
    for name in Ranked().load().images["image"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    result = run_leaderboard(LeaderboardConfig.from_dict({
        "data": {"benchmark": "ranked", "images": str(tmp_path)},
        "scoring": {"models": ["blind"], "cache": False}, "report": {"bootstrap": 50}}))
    (row,) = result.rows.to_dict("records")
    assert row["calibration"]["mapping"] == "platt" and 0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 1
    assert any("win probability of image A" in n for n in result.notes)


def test_benchmarks_without_binary_labels_say_so(tia2_dir):
    from pathlib import Path

    shared = Path(tia2_dir).parent / "benchmarks" / "tifa_v1"
    result = run_leaderboard(LeaderboardConfig.from_dict({"data": {"benchmark": "tifa_v1", "data": str(shared)},
                                                          "report": {"bootstrap": 0}}))
    assert "ece" not in result.rows.columns
    assert any("needs binary per-image labels" in n for n in result.notes)


def test_bad_calibration_settings_are_one_line():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="report.calibration_mapping must be platt or isotonic"):
        LeaderboardConfig.from_dict({"report": {"calibration_mapping": "spline"}})
    with pytest.raises(HarnessError, match="report.calibration_bins must be between 2 and 1000"):
        LeaderboardConfig.from_dict({"report": {"calibration_bins": 1}})
