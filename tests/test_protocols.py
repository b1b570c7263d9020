"""Protocols beyond per-prompt means: pooled per-image metrics, preference accuracy with tie rules,
released per-image scores as reported rows, images inside containers, and one leaderboard run over
several benchmarks with a tiny model on images the test makes."""

import io
import json
import zipfile
from itertools import combinations
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from ray_models import OffsetColor
from scipy.stats import kendalltau, pearsonr, spearmanr
from test_cli import harness

from harness import Benchmark, BenchmarkData, LeaderboardConfig, run_leaderboard
from harness.errors import HarnessError
from harness.evaluation.protocols import (
    evaluate,
    evaluate_pooled,
    pair_credit,
    tie_optimised_accuracy,
)
from harness.plugins import Entry, get_plugins
from harness.types import Protocol

POOLED = Protocol(family="per_image", grouping="pooled",
                  metrics=("auroc", "spearman", "kendall", "pearson", "pairwise_acc"), headline="spearman")


def _reference_pairwise(s, h):
    """Deutsch et al.'s tie-calibrated accuracy, brute force over every candidate epsilon."""
    best = (-1.0, None)
    pairs = list(combinations(range(len(s)), 2))
    for eps in sorted({0.0, *(abs(s[i] - s[j]) for i, j in pairs)}):
        right = 0
        for i, j in pairs:
            ds, dh = s[i] - s[j], h[i] - h[j]
            right += (dh == 0) if abs(ds) <= eps else (np.sign(ds) == np.sign(dh) and dh != 0)
        if right / len(pairs) > best[0]:
            best = (right / len(pairs), eps)
    return best


def test_pooled_metrics_against_independent_references():
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"prompt_id": np.repeat(np.arange(12), 5), "score": rng.normal(size=n).round(1),
                          "graded": rng.integers(0, 5, n) / 4, "binary": rng.integers(0, 2, n)})
    row = evaluate_pooled(frame, POOLED, n_boot=0, seed=0, confidence=0.95)
    s, g, y = frame["score"].to_numpy(), frame["graded"].to_numpy(), frame["binary"].to_numpy()
    assert row["spearman"] == pytest.approx(spearmanr(s, g).statistic, abs=1e-12)
    assert row["kendall"] == pytest.approx(kendalltau(s, g).statistic, abs=1e-12)  # tau-b
    assert row["pearson"] == pytest.approx(pearsonr(s, g).statistic, abs=1e-12)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert row["auroc"] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    acc, eps = _reference_pairwise(list(s), list(g))
    assert row["pairwise_acc"] == pytest.approx(acc, abs=1e-12)
    assert tie_optimised_accuracy(s, g) == pytest.approx((acc, eps))
    assert row["n_prompts"] == 12 and row["n_items"] == 60


def test_pooled_intervals_resample_prompts():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"prompt_id": np.repeat(np.arange(30), 4), "score": rng.normal(size=120),
                          "graded": rng.random(120), "binary": rng.integers(0, 2, 120)})
    frame["score"] += 2 * frame["graded"]
    row = evaluate_pooled(frame, POOLED, n_boot=200, seed=3, confidence=0.9)
    for m in POOLED.metrics:
        lo, hi = row[f"{m}_ci"]
        assert lo <= row[m] <= hi and hi - lo > 0.01
    again = evaluate_pooled(frame, POOLED, n_boot=200, seed=3, confidence=0.9)
    assert again["spearman_ci"] == row["spearman_ci"]


@pytest.mark.parametrize("rule", ["skip", "inversions", "threshold", "dropped"])
def test_pair_credit_follows_the_protocol_text(rule):
    a = np.array([2.0, 1.0, 1.0, 3.0, 0.0, 5.0])
    b = np.array([1.0, 2.0, 1.0, 3.0, 0.1, 0.0])
    label = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.0])
    credit, counts = pair_credit(a, b, label, rule, threshold=0.1)
    if rule in ("skip", "dropped"):  # human ties out; a model tie (pair 3) is wrong
        assert counts.tolist() == [True, True, True, False, False, True]
        assert credit[counts].tolist() == [1.0, 0.0, 0.0, 0.0]
    elif rule == "inversions":  # 1 - discordant: ties are never discordant
        assert counts.all() and credit.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    else:  # |p_a - p_b| = |tanh(d / 2)|: pairs 2, 3 (d = 0) and 4 (d = 0.1 -> 0.05) are tie calls
        assert credit.tolist() == [1.0, 0.0, 0.5, 1.0, 1.0, 0.0]


class Ranked(Benchmark):
    """Preference pairs from rankings of 3 images per prompt, with a validation split."""

    id: ClassVar[str] = "ranked"
    subsets: ClassVar[tuple[str, ...]] = ("all",)
    protocol: ClassVar[Protocol] = Protocol(family="preference", grouping="pooled",
                                            metrics=("accuracy", "accuracy_ties_dropped"),
                                            headline="accuracy", tie_rule="threshold")

    def load(self, subsets=None):
        images, pairs = [], []
        for p in range(8):
            split = "validation" if p < 3 else "test"
            names = [f"p{p}/{k}.png" for k in range(3)]
            ranks = [1, 2, 2] if p % 2 else [1, 2, 3]
            images += [{"subset": "all", "prompt_id": f"p{p}", "prompt": f"prompt {p}", "image": n,
                        "binary": np.nan, "graded": np.nan, "split": split} for n in names]
            for i, j in combinations(range(3), 2):
                label = 0.5 if ranks[i] == ranks[j] else float(ranks[i] < ranks[j])
                pairs.append({"subset": "all", "prompt_id": f"p{p}", "image_a": names[i],
                              "image_b": names[j], "label": label, "split": split})
        return BenchmarkData(self.id, pd.DataFrame(images), pairs=pd.DataFrame(pairs))


def test_preference_rows_with_a_threshold_chosen_on_validation():
    data = Ranked().load()
    rng = np.random.default_rng(4)
    scores = data.images[["subset", "image"]].assign(method="m", source="scored", score=rng.normal(size=24))
    rows = evaluate(Ranked.protocol, data.images, data.pairs, scores, n_boot=0, seed=0, confidence=0.95)
    (row,) = rows.to_dict("records")
    # Independently: the threshold maximising validation credit, then test credit at it.
    s = dict(zip(scores["image"], scores["score"], strict=True))

    def credit(pairs, t):
        out = []
        for _, r in pairs.iterrows():
            pa, pb = np.exp(s[r.image_a]), np.exp(s[r.image_b])
            gap = abs(pa - pb) / (pa + pb)
            call = 0.5 if gap <= t else float(s[r.image_a] > s[r.image_b])
            out.append(1.0 if call == r.label else 0.5 if 0.5 in (call, r.label) else 0.0)
        return np.mean(out)

    val, test = data.pairs[data.pairs.split == "validation"], data.pairs[data.pairs.split == "test"]
    grid = Ranked.protocol.thresholds
    best = grid[int(np.argmax([credit(val, t) for t in grid]))]
    assert row["threshold"] == best
    assert row["accuracy"] == pytest.approx(credit(test, best), abs=1e-12)
    untied = test[test.label != 0.5]
    dropped = np.mean([float((s[r.image_a] > s[r.image_b]) == (r.label == 1.0)) for _, r in untied.iterrows()])
    assert row["accuracy_ties_dropped"] == pytest.approx(dropped, abs=1e-12)
    assert row["n_prompts"] == 5 and row["n_accuracy_pairs"] == 15 and row["n_accuracy_ties_dropped_pairs"] == 12


class Released(Benchmark):
    """Pooled per-image labels with released per-image scores of two methods."""

    id: ClassVar[str] = "released"
    subsets: ClassVar[tuple[str, ...]] = ("a", "b")
    protocol: ClassVar[Protocol] = POOLED
    data_folder: ClassVar[str] = "released-files"

    def load(self, subsets=None):
        rows = [{"subset": sub, "prompt_id": f"{sub}{p}", "prompt": f"prompt {p}", "image": f"{sub}/{p}-{i}.png",
                 "binary": int((p + i) % 3 == 0), "graded": ((p * 7 + i * 3) % 5) / 4}
                for sub in self.check_subsets(subsets) for p in range(6) for i in range(4)]
        return BenchmarkData(self.id, pd.DataFrame(rows))

    def image_path(self, root, subset, image):
        return root / image

    def reported_scores(self, subsets=None):
        frame = self.load(subsets).images
        return pd.concat([frame[["subset", "image"]].assign(method="oracle-ish", score=frame["graded"] + 0.01 * np.arange(len(frame))),
                          frame[["subset", "image"]].assign(method="flat", score=1.0)])


def test_released_scores_become_reported_rows_exactly():
    get_plugins().benchmarks.add(Entry("released", Released, "test-plugin"))
    result = run_leaderboard(LeaderboardConfig.from_dict({"data": {"benchmark": "released"},
                                                          "report": {"bootstrap": 50}}))
    rows = result.rows.set_index(["subset", "method"])
    frame = Released().load().images
    scores = Released().reported_scores().merge(frame, on=["subset", "image"])
    for (subset, method), g in scores.groupby(["subset", "method"]):
        row = rows.loc[(subset, method)]
        assert row["source"] == "reported"
        if method == "flat":
            assert np.isnan(row["spearman"]) and row["auroc"] == 0.5  # constant scores: all ties
        else:
            assert row["spearman"] == pytest.approx(spearmanr(g["score"], g["graded"]).statistic, abs=1e-12)
            assert row["kendall"] == pytest.approx(kendalltau(g["score"], g["graded"]).statistic, abs=1e-12)
    assert result.notes[0].startswith("protocol: over all images of each subset")
    assert result.manifest["data"]["protocol"]["grouping"] == "pooled"
    assert set(result.rows.columns) >= {"pairwise_acc", "pairwise_acc_ci", "n_items"}


def test_normalizers_need_a_per_prompt_benchmark():
    get_plugins().benchmarks.add(Entry("ranked", Ranked, "test-plugin"))
    with pytest.raises(HarnessError, match="needs per-prompt per-image labels to calibrate against"):
        run_leaderboard(LeaderboardConfig.from_dict({
            "data": {"benchmark": "ranked", "images": "."}, "scoring": {"models": ["clip"]},
            "calibration": {"normalizers": ["textnorm"]}}))


def test_a_bad_protocol_is_one_line():
    class Bad(Ranked):
        id = "bad"
        protocol = Protocol(family="preference", metrics=("auroc",), headline="auroc", tie_rule="coin")

    get_plugins().benchmarks.add(Entry("bad", Bad, "test-plugin"))
    with pytest.raises(HarnessError, match="declares an inconsistent protocol: metrics"):
        run_leaderboard(LeaderboardConfig.from_dict({"data": {"benchmark": "bad"}}))


def _png(value):
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_inside_zip_and_parquet_score_like_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness.scoring import score_images

    values = [10, 120, 250]
    for v in values:
        (tmp_path / f"{v}.png").write_bytes(_png(v))
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as zf:
        for v in values:
            zf.writestr(f"deep/{v}.png", _png(v))
    pq.write_table(pa.table({"jpg_0": [_png(v) for v in values], "n": values}), tmp_path / "pairs.parquet")
    model = OffsetColor()
    files = score_images(model, [str(tmp_path / f"{v}.png") for v in values], [["x"]] * 3, cache=False)
    zipped = score_images(model, [f"{tmp_path}/images.zip::deep/{v}.png" for v in values], [["x"]] * 3, cache=False)
    parquet = score_images(model, [f"{tmp_path}/pairs.parquet::{i}/jpg_0" for i in range(3)], [["x"]] * 3,
                           cache=False)
    assert [float(s[0]) for s in zipped.scores] == [float(s[0]) for s in files.scores]
    assert [float(s[0]) for s in parquet.scores] == [float(s[0]) for s in files.scores]
    missing = score_images(model, [f"{tmp_path}/images.zip::nope.png"], [["x"]], cache=False)
    assert missing.scores == [None] and "nope.png" in next(iter(missing.failed.values()))


def test_cross_benchmark_run_end_to_end(tmp_path, tia2_dir):
    """TIA2 (per-prompt) and two in-process benchmarks (pooled, preference) in one run, one
    tiny model, images the test makes, one shared cache."""
    from PIL import Image

    from harness_plugins.tia2 import TIA2

    get_plugins().reward_models.add(Entry("offset-color", OffsetColor, "test-plugin"))
    get_plugins().benchmarks.add(Entry("released", Released, "test-plugin"))
    get_plugins().benchmarks.add(Entry("ranked", Ranked, "test-plugin"))
    images = tmp_path / "images"
    rng = np.random.default_rng(0)

    def make(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)

    labels = TIA2(tia2_dir).load(["counting"]).images
    for name in labels[labels["prompt"].isin(list(dict.fromkeys(labels["prompt"]))[:3])]["image"]:
        make(images / "tia2" / "counting" / name)
    for subset in ("comprehensive", "composition"):  # no images: skipped with --skip-missing
        (images / "tia2" / subset).mkdir()
    for name in Released().load().images["image"]:
        make(images / "released" / name)
    for name in Ranked().load().images["image"]:
        make(images / "ranked" / name)
    cache = tmp_path / "scores.sqlite"
    out = tmp_path / "run"
    args = ["leaderboard", "tia2,released,ranked", "--data", tia2_dir, "--images", images, "--skip-missing",
            "--model", "offset-color", "--cache", cache, "--bootstrap", 20, "--no-plots", "--out", out]
    result = harness(*args)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"tia2", "released", "ranked", "summary.json", "summary.csv",
                                               "summary.md", "summary.html", "manifest.json"}
    summary = pd.DataFrame(json.loads((out / "summary.json").read_text()))
    mine = summary[summary["method"] == "offset-color"].set_index(["benchmark", "subset"])
    assert set(mine.index) == {("tia2", "counting"), ("released", "a"), ("released", "b"), ("ranked", "all")}
    assert set(summary[summary["source"] == "reported"]["benchmark"]) == {"tia2", "released"}
    assert mine.loc[("released", "a"), "metric"] == "spearman"
    assert mine.loc[("ranked", "all"), "metric"] == "accuracy"
    # Each cell is the headline of the benchmark's own table.
    for bench, subset in mine.index:
        rows = {(r["subset"], r["method"], r["source"]): r
                for r in json.loads((out / bench / "leaderboard.json").read_text())}
        row = rows[(subset, "offset-color", "scored")]
        cell = mine.loc[(bench, subset)]
        assert cell["value"] == row[cell["metric"]]
        assert [cell["ci_low"], cell["ci_high"]] == row[f"{cell['metric']}_ci"]
    assert "| offset-color | scored |" in (out / "summary.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["benchmarks"] == ["tia2", "released", "ranked"]
    assert manifest["data"]["protocols"]["ranked"]["tie_rule"] == "threshold"
    # One shared cache: a rerun scores nothing.
    again = harness(*args[:-1], tmp_path / "run2")
    assert again.returncode == 0, again.stderr
    for bench in ("tia2", "released", "ranked"):
        models = json.loads((tmp_path / "run2" / bench / "manifest.json").read_text())["models"]
        assert models[0]["computed"] == 0


def test_a_run_over_benchmarks_without_models_keeps_those_with_numbers(tia2_dir):
    from pathlib import Path

    from harness.evaluation.multi import run_leaderboards

    shared = Path(tia2_dir).parent / "benchmarks"
    config = LeaderboardConfig.from_dict({"report": {"bootstrap": 0}})
    multi = run_leaderboards(config, ["tifa_v1", "seetrue"], [shared])
    assert list(multi.results) == ["tifa_v1"] and multi.manifest["data"]["skipped"] == ["seetrue"]
    assert any("no rows for seetrue" in n for n in multi.notes)
    cells = multi.summary.set_index("method")
    assert cells.loc["clipscore_vitb32", "metric"] == "spearman"
    assert cells.loc["clipscore_vitb32", "value"] == pytest.approx(0.319803, abs=5e-7)
    with pytest.raises(HarnessError, match="seetrue release no numbers of their own"):
        run_leaderboards(config, ["seetrue"], [shared])
