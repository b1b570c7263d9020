"""The scoring engine: encode once, cache, resume, bad images, NaN, out-of-memory."""

import shutil
import sqlite3

import numpy as np
import pytest
import torch
from tiny_models import make_image_folder, make_tiny_clip

from harness.errors import HarnessError
from harness.scoring.specs import load_reward_model
from harness.scoring.cache import ScoreCache
from harness.scoring.runner import model_cache_key, score_images

PROMPTS = ["a realistic photo of an airplane"] + [f"a realistic photo of {n} airplanes"
                                                 for n in ("two", "three", "four", "five", "six")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture
def model(ckpt):
    m = load_reward_model(f"clip:checkpoint={ckpt}", device="cpu")
    m.encode_calls = 0
    m.encoded = 0
    embed = m.embed_images

    def counting(batch):
        m.encode_calls += 1
        m.encoded += len(batch)
        return embed(batch)

    m.embed_images = counting
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return make_image_folder(root, 24, seed=5)


def prompt_lists(n, k=6):
    return [PROMPTS[:k] for _ in range(n)]


def test_one_encode_per_image_whatever_the_prompt_count(model, folder):
    run = score_images(model, folder, prompt_lists(len(folder)), batch_size=8)
    assert model.encoded == len(folder) == run.encoded_images
    assert model.encode_calls == 3
    assert run.computed == 6 * len(folder) and run.cached == 0
    assert all(s.shape == (6,) and s.dtype == np.float64 for s in run.scores)


def test_cache_computes_nothing_twice(model, folder, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    first = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=5)
    encoded = model.encoded
    second = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=7)
    assert second.computed == 0 and second.cached == 6 * len(folder)
    assert model.encoded == encoded  # nothing re-encoded
    for a, b in zip(first.scores, second.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    # The cache is keyed by image content, not path: a copy of an image is a cache hit.
    copy = tmp_path / "copy.jpg"
    shutil.copy(folder[0], copy)
    third = score_images(model, [copy], prompt_lists(1), cache=cache)
    assert third.computed == 0 and np.array_equal(third.scores[0], first.scores[0])
    # A new prompt for a cached image is computed.
    fourth = score_images(model, [folder[0]], [PROMPTS + ["a frog"]], cache=cache)
    assert fourth.computed == 7
    assert cache.count(model_cache_key(model)) == 6 * len(folder) + 1
    with sqlite3.connect(tmp_path / "scores.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_resume_after_a_crash_gives_the_same_scores(model, folder, tmp_path):
    reference = score_images(model, folder, prompt_lists(len(folder)), batch_size=4)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    embed = model.embed_images
    calls = {"n": 0}

    def dies_on_fourth_batch(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what a killed run looks like from the inside
        return embed(batch)

    model.embed_images = dies_on_fourth_batch
    with pytest.raises(KeyboardInterrupt):
        score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=4)
    assert cache.count() == 3 * 4 * 6  # three finished batches were kept
    model.embed_images = embed
    resumed = score_images(model, folder, prompt_lists(len(folder)), cache=cache, batch_size=4)
    assert resumed.cached == 3 * 4 * 6 and resumed.computed == (len(folder) - 12) * 6
    for a, b in zip(reference.scores, resumed.scores, strict=True):
        np.testing.assert_array_equal(a, b)


def test_workers_and_batch_size_do_not_change_scores(model, folder):
    a = score_images(model, folder, prompt_lists(len(folder)), batch_size=1, num_workers=0)
    b = score_images(model, folder, prompt_lists(len(folder)), batch_size=16, num_workers=2)
    for x, y in zip(a.scores, b.scores, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_corrupt_and_missing_images_are_named_and_the_rest_scored(model, folder, tmp_path):
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(folder[0].read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    paths = [folder[1], bad, folder[2], text, tmp_path / "gone.jpg"]
    run = score_images(model, paths, prompt_lists(len(paths), 2), batch_size=2)
    assert set(run.failed) == {str(bad), str(text), str(tmp_path / "gone.jpg")}
    assert "FileNotFoundError" in run.failed[str(tmp_path / "gone.jpg")]
    assert run.scores[0] is not None and run.scores[2] is not None
    assert run.scores[1] is None and run.scores[3] is None
    assert run.encoded_images == 2


def test_nan_score_is_rejected_naming_model_image_and_prompt(model, folder, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    score = model.score
    seen = {"n": 0}

    def nan_in_second_batch(features, prompts):
        out = score(features, prompts)
        seen["n"] += 1
        if seen["n"] == 2:
            out[1][2] = np.nan
        return out

    model.score = nan_in_second_batch
    with pytest.raises(HarnessError) as info:
        score_images(model, folder[:8], prompt_lists(8, 3), cache=cache, batch_size=4)
    msg = str(info.value)
    assert "reward model 'clip' returned a non-finite score (nan)" in msg
    assert str(folder[5]) in msg and repr(PROMPTS[2]) in msg
    assert cache.count() == 4 * 3  # the first batch stays cached


def test_out_of_memory_halves_the_batch(model, folder):
    reference = score_images(model, folder[:8], prompt_lists(8), batch_size=8)
    embed = model.embed_images
    sizes = []

    def small_gpu(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return embed(batch)

    model.embed_images = small_gpu
    run = score_images(model, folder[:8], prompt_lists(8), batch_size=8)
    assert sizes[:3] == [8, 4, 2]
    for a, b in zip(reference.scores, run.scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_numpy_plugin_runs_through_the_engine(folder, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "t2i-harness-example"))
    from t2i_harness_example import ExampleColorReward

    run = score_images(ExampleColorReward(), folder[:3], [["a red car", "a car"]] * 3, batch_size=2)
    assert all(s.shape == (2,) and s[1] == 0.0 for s in run.scores)
