"""One pass over the images for all models of a run: each image decoded once, every model's
preprocessing applied to it, the cached-or-not decision made per model before any decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_image_folder, make_tiny_clip, make_tiny_hpsv2

import harness.images
from harness.scoring import score_models

PROMPTS = ["a photo of a cat", "a photo of two cats", "a drawing of a dog"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = make_tiny_clip(root / "clip_a", seed=0)
    b = make_tiny_clip(root / "clip_b", seed=1, image_size=48)
    h = make_tiny_hpsv2(root / "hps")
    return [f"clip:checkpoint={a}", f"clip:checkpoint={b},label=clip_b",
            f"hpsv2:checkpoint={h},version=2.1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), 10, seed=3)


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes per path (every executor decodes through harness.images.open_image)."""
    seen: dict[str, int] = {}
    real = harness.images.open_image

    def counting(path):
        seen[str(path)] = seen.get(str(path), 0) + 1
        return real(path)

    monkeypatch.setattr(harness.images, "open_image", counting)
    return seen


def lists(n):
    return [PROMPTS for _ in range(n)]


def test_one_pass_decodes_each_image_once_with_the_same_scores_bit_for_bit(specs, folder, decodes):
    per_model = score_models(specs, folder, lists(len(folder)), device="cpu", cache=False,
                             batch_size=4, one_pass=False)
    assert sum(decodes.values()) == 3 * len(folder)  # each model decodes every image again
    decodes.clear()
    one = score_models(specs, folder, lists(len(folder)), device="cpu", cache=False,
                       batch_size=4)
    assert decodes == {str(p): 1 for p in folder}
    for a, b in zip(per_model, one, strict=True):
        assert a.label == b.label and a.run.cache_key == b.run.cache_key
        assert b.run.computed == 3 * len(folder) and b.run.encoded_images == len(folder)
        assert b.run.executor_info["one_pass"] is True
        for x, y in zip(a.run.scores, b.run.scores, strict=True):
            assert x.dtype == y.dtype == np.float64
            np.testing.assert_array_equal(x, y)
        assert b.manifest()["computed"] == 3 * len(folder)


def test_cached_or_not_is_decided_per_model_before_decoding(specs, folder, decodes, tmp_path):
    cache = tmp_path / "scores.sqlite"
    # The first model has scored the first 4 images; the others nothing.
    score_models(specs[:1], folder[:4], lists(4), device="cpu", cache=cache)
    decodes.clear()
    runs = score_models(specs, folder, lists(len(folder)), device="cpu", cache=cache, batch_size=3)
    assert decodes == {str(p): 1 for p in folder}  # images 0-3 still decoded once for the others
    assert [r.run.cached for r in runs] == [12, 0, 0]
    assert [r.run.encoded_images for r in runs] == [6, 10, 10]
    decodes.clear()
    again = score_models(specs, folder, lists(len(folder)), device="cpu", cache=cache)
    assert decodes == {}  # every model has every image cached: nothing is read
    assert [r.run.computed for r in again] == [0, 0, 0]
    for a, b in zip(runs, again, strict=True):
        np.testing.assert_array_equal(np.stack(a.run.scores), np.stack(b.run.scores))


def test_a_broken_image_fails_for_every_model_and_the_rest_are_scored(specs, folder, decodes,
                                                                       tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    gray = tmp_path / "gray.png"
    Image.new("L", (30, 20), 90).save(gray)
    paths = [folder[0], bad, gray]
    runs = score_models(specs, paths, lists(3), device="cpu", cache=False)
    assert decodes == {str(p): 1 for p in paths}
    for r in runs:
        assert list(r.run.failed) == [str(bad)]
        assert r.run.scores[1] is None and r.run.scores[0].shape == (3,)
        assert r.run.scores[2].shape == (3,)


def test_models_with_one_cache_key_share_the_scores(specs, folder, tmp_path):
    twin = specs[0] + ",label=twin,batch_size=2"  # batch_size is a runtime option: same key
    runs = score_models([specs[0], twin], folder[:3], lists(3), device="cpu",
                        cache=tmp_path / "c.sqlite")
    assert runs[0].run.computed == 9 and runs[1].run.computed == 0 and runs[1].run.cached == 9
    np.testing.assert_array_equal(np.stack(runs[0].run.scores), np.stack(runs[1].run.scores))


def test_one_pass_with_data_loader_workers_gives_the_same_scores(specs, folder):
    from harness.scoring import LocalExecutor

    one = score_models(specs[:2], folder[:6], lists(6), device="cpu", cache=False, batch_size=4)
    workers = score_models(specs[:2], folder[:6], lists(6), device="cpu", cache=False,
                           batch_size=4, executor=LocalExecutor(num_workers=2))
    for a, b in zip(one, workers, strict=True):
        assert b.run.executor_info["options"]["num_workers"] == 2
        np.testing.assert_array_equal(np.stack(a.run.scores), np.stack(b.run.scores))
