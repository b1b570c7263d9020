"""The uncertainty contract end to end, on a tiny pure-numpy reward model (no torch model).

A reward model that sets ``reports_uncertainty`` returns ``[P, 2]`` per image (score, standard
deviation): the scoring plan checks and splits it, the score cache keeps both (a rerun restores
the deviations), the leaderboard's scores get an ``uncertainty`` column and the model's rows an
``uncertainty_mean``, ``ur_self`` uses it, and a fine-tuning reward takes the score (the mean).
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness import (
    Benchmark,
    BenchmarkData,
    HarnessError,
    LeaderboardConfig,
    RewardModel,
    run_leaderboard,
)
from harness.plugins import Entry, get_plugins
from harness.scoring import ScoreCache, score_images, score_models
from harness.testing import check_normalizer, check_reward_model


def _prompt_vector(prompt: str) -> np.ndarray:
    """A fixed pseudo-random direction per prompt (stable across processes)."""
    seed = int.from_bytes(prompt.encode()[:8].ljust(8, b"\0"), "little") ^ len(prompt)
    return np.random.default_rng(seed).normal(size=3)


class Noisy(RewardModel):
    """Score: the image's mean colour against a per-prompt direction; its standard deviation
    grows with the image's darkness. Float32 ``[P, 2]`` per image."""

    id: ClassVar[str] = "noisy"
    reports_uncertainty: ClassVar[bool] = True
    calls: ClassVar[list[int]] = []

    def __init__(self, checkpoint=None, device="cpu", dtype="float32", spread: float = 0.2):
        super().__init__(checkpoint, device, dtype)
        self.spread = float(spread)

    def preprocess(self, image):
        return np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) / 255

    def embed_images(self, batch):
        Noisy.calls.append(len(batch))
        return np.asarray(batch, dtype=np.float32)

    def score(self, features, prompts):
        out = []
        for f, ps in zip(features, prompts, strict=True):
            mu = np.array([f @ _prompt_vector(p) for p in ps])
            sigma = np.full(len(ps), self.spread * (1.2 - f.mean()))
            out.append(np.stack([mu, sigma], axis=1).astype(np.float32))
        return out


class Plain(Noisy):
    """The same scores without uncertainty: ``[P]``."""

    id: ClassVar[str] = "plain"
    reports_uncertainty: ClassVar[bool] = False

    def score(self, features, prompts):
        return [s[:, 0] for s in super().score(features, prompts)]


class Liar(Noisy):
    """Declares uncertainty but returns ``[P]``."""

    id: ClassVar[str] = "liar"

    def score(self, features, prompts):
        return [s[:, 0] for s in super().score(features, prompts)]


class Negative(Noisy):
    id: ClassVar[str] = "negative"

    def score(self, features, prompts):
        return [s * np.array([1, -1], dtype=np.float32) for s in super().score(features, prompts)]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(6):
        path = tmp_path / f"im{k}.png"
        Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _register(*classes):
    for cls in classes:
        get_plugins().reward_models.add(Entry(cls.id, cls, "test-plugin"))


def test_contract_check_and_plan_split(images):
    model = Noisy()
    pil = [Image.open(p) for p in images]
    prompts = [["a cat", "a dog", "two cats"]] * len(pil)
    scores = check_reward_model(model, pil, prompts)
    assert all(s.shape == (3, 2) for s in scores)
    run = score_images(model, images, prompts, cache=None, batch_size=4)
    assert run.reports_uncertainty
    for i, (s, u) in enumerate(zip(run.scores, run.uncertainty, strict=True)):
        np.testing.assert_allclose(s, scores[i][:, 0], atol=1e-6)
        np.testing.assert_allclose(u, scores[i][:, 1], atol=1e-6)
    plain = score_images(Plain(), images, prompts, cache=None)
    assert plain.uncertainty == [None] * len(images) and not plain.reports_uncertainty
    np.testing.assert_allclose(np.stack(plain.scores), np.stack(run.scores))


def test_contract_refusals(images):
    prompts = [["a cat", "a dog"]] * len(images)
    with pytest.raises(HarnessError, match=r"reports uncertainty, so it must return \[prompts, 2\].*shape \[2\]"):
        score_images(Liar(), images, prompts, cache=None)
    with pytest.raises(HarnessError, match="negative standard deviation"):
        score_images(Negative(), images, prompts, cache=None)
    pil = [Image.open(p) for p in images]
    with pytest.raises(AssertionError, match=r"expected \(2, 2\).*reports_uncertainty"):
        check_reward_model(Liar(), pil, prompts)


def test_cache_restores_uncertainty(images, tmp_path):
    prompts = [["a cat", "a dog"]] * len(images)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score_images(Noisy(), images, prompts, cache=cache)
    assert first.computed == 12 and first.cached == 0
    Noisy.calls.clear()
    again = score_images(Noisy(), images, prompts, cache=cache)
    assert again.cached == 12 and again.computed == 0 and Noisy.calls == []
    for a, b in zip(first.uncertainty, again.uncertainty, strict=True):
        np.testing.assert_array_equal(a, b)
    assert cache.count(first.cache_key + "#std") == 12
    # Scores without their deviations (a run stopped between the two writes) are recomputed.
    with cache.transaction() as conn:
        conn.execute("DELETE FROM scores WHERE model = (SELECT id FROM models WHERE key = ?)",
                     (first.cache_key + "#std",))
    third = score_images(Noisy(), images, prompts, cache=cache)
    assert third.computed == 12 and all(u is not None for u in third.uncertainty)
    # score_models carries it too.
    _register(Noisy, Plain)
    both = score_models(["noisy", "plain"], images, prompts, cache=cache)
    assert both[0].run.reports_uncertainty and both[0].uncertainty[0].shape == (2,)
    assert both[0].manifest()["reports_uncertainty"] is True
    assert both[1].uncertainty == [None] * len(images) and "reports_uncertainty" not in both[1].manifest()
    cache.close()


# -- the leaderboard -------------------------------------------------------------------------------
class Bench(Benchmark):
    """Six prompts of eight images each, with contrastive sets."""

    id: ClassVar[str] = "unc-bench"
    subsets: ClassVar[tuple[str, ...]] = ("all",)

    def load(self, subsets=None):
        rows = [{"subset": "all", "prompt_id": p, "prompt": f"prompt {p}", "image": f"{p}-{i}.png",
                 "binary": int(i % 2), "graded": float(i % 2)} for p in range(6) for i in range(8)]
        contrastive = {("all", f"prompt {p}"): [f"other {p} {k}" for k in range(3)] for p in range(6)}
        return BenchmarkData(self.id, pd.DataFrame(rows), contrastive=contrastive)


@pytest.fixture
def board(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for p in range(6):
        for i in range(8):
            base = 60 + 120 * (i % 2)  # the positives are brighter
            pixels = np.clip(rng.normal(base, 40, (6, 6, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{p}-{i}.png")
    get_plugins().benchmarks.add(Entry("unc-bench", Bench, "test-plugin"))
    _register(Noisy, Plain)
    return tmp_path


def _config(root, **calibration):
    return LeaderboardConfig.from_dict({
        "data": {"benchmark": "unc-bench", "images": str(root / "images")},
        "scoring": {"models": ["noisy", "plain"], "cache": str(root / "scores.sqlite")},
        "calibration": calibration, "report": {"bootstrap": 20, "plots": False}})


def test_leaderboard_uncertainty_column_and_row(board):
    from harness.evaluation.report import write_run

    result = run_leaderboard(_config(board, normalizers=["ur_self"], ensembles=["ur_self"]))
    scores = result.scores
    assert "uncertainty" in scores
    noisy, plain = scores[scores["method"] == "noisy"], scores[scores["method"] == "plain"]
    assert noisy["uncertainty"].notna().all() and plain["uncertainty"].isna().all()
    rows = result.rows.set_index(["method", "source"])
    expected = noisy[noisy["column"] == 0]["uncertainty"].mean()
    assert rows.loc[("noisy", "scored"), "uncertainty_mean"] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(rows.loc[("plain", "scored"), "uncertainty_mean"])
    assert {"ur_self(noisy)", "ur_self(plain)", "ur_self(noisy+plain)"} <= set(result.rows["method"])
    assert any("plain report no uncertainty" in n for n in result.notes)
    out = write_run(board / "run", result, plots=False)
    records = {(r["method"], r["source"]): r for r in json.loads((out / "leaderboard.json").read_text())}
    assert records[("noisy", "scored")]["uncertainty_mean"] == pytest.approx(expected, abs=1e-9)
    assert records[("plain", "scored")]["uncertainty_mean"] is None
    assert "uncertainty" in pd.read_parquet(out / "scores.parquet")


def test_leaderboard_without_uncertainty_has_no_column(board):
    config = _config(board)
    config.scoring.models = ["plain"]
    result = run_leaderboard(config)
    assert "uncertainty_mean" not in result.rows and result.scores["uncertainty"].isna().all()


class PooledBench(Bench):
    id: ClassVar[str] = "unc-pooled"
    from harness.types import Protocol

    protocol: ClassVar = Protocol(grouping="pooled", metrics=("auroc", "spearman"), headline="auroc")


def test_pooled_rows_get_uncertainty_mean(board):
    get_plugins().benchmarks.add(Entry("unc-pooled", PooledBench, "test-plugin"))
    config = _config(board)
    config.data.benchmark = "unc-pooled"
    result = run_leaderboard(config)
    rows = result.rows.set_index("method")
    noisy = result.scores[(result.scores["method"] == "noisy") & (result.scores["column"] == 0)]
    assert rows.loc["noisy", "uncertainty_mean"] == pytest.approx(noisy["uncertainty"].mean())
    assert np.isnan(rows.loc["plain", "uncertainty_mean"])


# -- ur_self -----------------------------------------------------------------------------------
def test_ur_self_contract_and_reductions():
    from harness_plugins.textnorm import TextNorm, UREnsemble, URSelf

    check_normalizer(URSelf)
    check_normalizer(URSelf, models=["one"])
    rng = np.random.default_rng(3)
    scores = {"a": rng.normal(size=(5, 4)), "b": rng.normal(size=(5, 4))}
    # Without uncertainty (or lam 0) it is the mean TextNorm confidence.
    mean = np.mean([TextNorm(scale=2.0)({m: s}) for m, s in scores.items()], axis=0)
    np.testing.assert_allclose(URSelf(scale=2.0)(scores), mean, atol=1e-12)
    spread = {"a": rng.uniform(0, 0.3, (5, 4)), "b": np.full((5, 4), np.nan)}
    np.testing.assert_allclose(URSelf(scale=2.0, lam=0.0)(scores, uncertainty=spread), mean, atol=1e-12)
    # A model without uncertainty contributes u = 0: the penalty is half model a's alone.
    alone = URSelf(scale=2.0, lam=1.0)({"a": scores["a"]}, uncertainty={"a": spread["a"]})
    together = URSelf(scale=2.0, lam=1.0)(scores, uncertainty=spread)
    c_a = TextNorm(scale=2.0)({"a": scores["a"]})
    np.testing.assert_allclose(mean - together, (c_a - alone) / 2, atol=1e-12)
    # Unlike ur, it needs one model only and ignores disagreement between models.
    assert URSelf.min_models == 1 and UREnsemble.min_models == 2
    with pytest.raises(HarnessError, match="lambda must be >= 0"):
        URSelf(lam=-1)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_ur_self_delta_method_matches_monte_carlo(scale):
    """u (the delta method through the softmax Jacobian) against the standard deviation of the
    TextNorm confidence over normal draws of the scores with the predicted deviations."""
    from harness_plugins.textnorm import confidence_std, textnorm_confidence

    rng = np.random.default_rng(7)
    P, N, K = 2, 3, 5
    raw = rng.normal(size=(P, N, K))
    sigma = rng.uniform(0.005, 0.03, size=(P, N, K))
    mask = np.ones((P, K), dtype=bool)
    mask[1, 4] = False  # a prompt with one contrastive prompt fewer
    c, u = confidence_std(raw, sigma, mask, scale)
    np.testing.assert_allclose(c, textnorm_confidence(raw, mask, scale), atol=1e-15)
    draws = raw[None] + sigma[None] * rng.standard_normal((20000, P, N, K))
    samples = np.stack([textnorm_confidence(d, mask, scale) for d in draws])
    np.testing.assert_allclose(u, samples.std(axis=0), rtol=0.05)
    # The contrastive columns matter: own-prompt deviation alone underestimates.
    own_only = sigma.copy()
    own_only[:, :, 1:] = 0
    assert (confidence_std(raw, own_only, mask, scale)[1] < u).all()
    # Huge deviations are capped at 1/2 (a quantity in [0, 1] cannot spread more).
    assert confidence_std(raw, sigma * 1e4, mask, scale)[1].max() <= 0.5


def test_finetune_reward_uses_the_mean(images):
    from harness.finetune.reward import RewardFunction

    _register(Noisy, Plain)
    pil = [Image.open(p) for p in images]
    prompts = ["a cat", "a dog", "a cat", "a dog", "a cat", "a dog"]
    raw = RewardFunction("noisy", contrastive=None)(pil, prompts)
    plain = RewardFunction("plain", contrastive=None)(pil, prompts)
    np.testing.assert_allclose(raw, plain, atol=1e-6)
    sets = {"a cat": ["a dog", "a bird"], "a dog": ["a cat", "a bird"]}
    lam0 = RewardFunction("noisy", normalizer="ur_self", normalizer_options={"lam": 0.0, "scale": 3.0},
                          contrastive=sets)(pil, prompts)
    lam1 = RewardFunction("noisy", normalizer="ur_self", normalizer_options={"lam": 1.0, "scale": 3.0},
                          contrastive=sets)(pil, prompts)
    assert (lam1 < lam0).all()  # the model's own uncertainty is penalised
    plain1 = RewardFunction("plain", normalizer="ur_self", normalizer_options={"lam": 1.0, "scale": 3.0},
                            contrastive=sets)(pil, prompts)
    np.testing.assert_allclose(plain1, lam0, atol=1e-6)  # no uncertainty: no penalty
