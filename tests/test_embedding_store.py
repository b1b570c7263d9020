"""The embedding store: a dual encoder's image embeddings are kept beside the score cache, so a
new prompt set costs text encodes and a product, with no image decoded."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_image_folder, make_tiny_clip, make_tiny_hpsv2

import harness.images
from harness.scoring import load_reward_model, score_images, score_models
from harness.scoring.embeddings import EmbeddingStore, embedding_store_for
from harness.scoring.plan import model_cache_key

FIRST = ["a photo of a cat", "a photo of two cats"]
SECOND = ["a red car", "a blue car", "three red cars", "a photo of a cat"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [f"clip:checkpoint={make_tiny_clip(root / 'clip')}",
            f"hpsv2:checkpoint={make_tiny_hpsv2(root / 'hps')},version=2.1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), 7, seed=11)


@pytest.fixture
def decodes(monkeypatch):
    count = {"n": 0}
    real = harness.images.open_image

    def counting(path):
        count["n"] += 1
        return real(path)

    monkeypatch.setattr(harness.images, "open_image", counting)
    return count


def test_a_new_prompt_set_decodes_no_image_and_equals_a_fresh_run(specs, folder, decodes,
                                                                  tmp_path):
    cache = tmp_path / "scores.sqlite"
    score_models(specs, folder, [FIRST] * len(folder), device="cpu", cache=cache, batch_size=4)
    assert decodes["n"] == len(folder)
    store = EmbeddingStore(tmp_path / "scores.sqlite.embeddings.sqlite")
    assert store.count() == 2 * len(folder)  # one row per (model, image)
    store.close()
    decodes["n"] = 0
    new = score_models(specs, folder, [SECOND] * len(folder), device="cpu", cache=cache,
                       batch_size=4)
    assert decodes["n"] == 0
    for r in new:
        assert r.run.encoded_images == 0 and r.run.computed == len(SECOND) * len(folder)
    fresh = score_models(specs, folder, [SECOND] * len(folder), device="cpu", cache=False,
                         batch_size=4)
    for a, b in zip(new, fresh, strict=True):
        assert a.run.cache_key == b.run.cache_key
        for x, y in zip(a.run.scores, b.run.scores, strict=True):
            np.testing.assert_array_equal(x, y)


def test_score_images_uses_the_store_beside_its_cache(specs, folder, decodes, tmp_path):
    model = load_reward_model(specs[0], device="cpu")
    cache = tmp_path / "c.sqlite"
    score_images(model, folder[:3], [FIRST] * 3, cache=cache)
    decodes["n"] = 0
    run = score_images(model, folder, [SECOND] * len(folder), cache=cache)
    assert decodes["n"] == len(folder) - 3  # only the images never embedded are read
    assert run.encoded_images == len(folder) - 3
    fresh = score_images(model, folder, [SECOND] * len(folder))
    for x, y in zip(run.scores, fresh.scores, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_store_rows_round_trip_and_only_dual_encoders_use_it(specs, tmp_path):
    from harness.scoring.cache import open_score_cache

    cache = open_score_cache(tmp_path / "s.sqlite")
    store = embedding_store_for(cache)
    assert store.path.name == "s.sqlite.embeddings.sqlite"
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    store.put("m:1", [("h0", rows[0]), ("h1", rows[1])])
    got = store.get("m:1", ["h1", "h0", "absent"])
    assert set(got) == {"h0", "h1"}
    np.testing.assert_array_equal(got["h1"], rows[1])
    assert store.get("m:2", ["h0"]) == {} and store.count("m:1") == 2
    store.close()
    cache.close()
    assert embedding_store_for(None) is None
    model = load_reward_model(specs[0], device="cpu")
    assert type(model).embedding_kind == "dual" and model_cache_key(model)


def test_put_rows_copies_the_batch_and_stores_what_put_stores(tmp_path):
    """``put_rows`` (one batch, the scorer's path) equals ``put``; both copy, so the caller may
    reuse its array at once; rows of a wrong count are refused in the caller."""
    rng = np.random.default_rng(3)
    block = rng.normal(size=(5, 8)).astype(np.float32)
    want = block.copy()
    hashes = [f"{i:064x}" for i in range(5)]
    a, b = EmbeddingStore(tmp_path / "a.sqlite"), EmbeddingStore(tmp_path / "b.sqlite")
    try:
        a.put_rows("m", hashes, block)
        b.put("m", [(h, row) for h, row in zip(hashes, block, strict=True)])
        block[...] = 0.0  # reused by the caller before the writer ran
        got_a, got_b = a.get("m", hashes), b.get("m", hashes)
        assert sorted(got_a) == sorted(got_b) == hashes
        for i, h in enumerate(hashes):
            assert got_a[h].dtype == np.float32 and np.array_equal(got_a[h], want[i])
            assert np.array_equal(got_b[h], want[i])
        a.put_rows("m", [], np.zeros((0, 8), np.float32))  # nothing to store
        with pytest.raises(ValueError, match="2 image hashes"):
            a.put_rows("m", hashes[:2], want)
        assert a.count("m") == b.count("m") == 5
        a.flush_rows = 3  # a full buffer goes to the writer as one transaction
        a.put_rows("n", hashes[:4], want[:4])
        assert a.count("n") == 4
    finally:
        a.close()
        b.close()


def test_text_rows_are_stored_and_a_later_run_encodes_only_new_prompts(specs, folder, tmp_path,
                                                                      monkeypatch):
    """Dual encoders' text embeddings are kept too: a later run (fresh models, other images)
    encodes only the prompts never seen, with the same scores and truncation counts as a
    fresh run."""
    import transformers

    long = "a very long prompt " + "with many words " * 60  # past the text model's length
    first = [FIRST[0], FIRST[1], long]
    cache = tmp_path / "scores.sqlite"
    score_models(specs, folder[:3], [first] * 3, device="cpu", cache=cache, batch_size=2)
    store = EmbeddingStore(tmp_path / "scores.sqlite.embeddings.sqlite")
    assert store.count(table="text_embeddings") == 2 * len(first)  # per model, per prompt
    keys = {model_cache_key(load_reward_model(s, device="cpu"), None) for s in specs}
    assert len(keys) == 2
    store.close()

    encodes = {"n": 0}
    real = transformers.CLIPModel.get_text_features

    def counting(self, *args, **kwargs):
        encodes["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPModel, "get_text_features", counting)
    second = [*first, "a green bus"]
    later = score_models(specs, folder[3:], [second] * (len(folder) - 3), device="cpu",
                         cache=cache, batch_size=2)
    assert encodes["n"] == 2  # "a green bus", once per model; the others were loaded
    encodes["n"] = 0
    fresh = score_models(specs, folder[3:], [second] * (len(folder) - 3), device="cpu",
                         cache=False, batch_size=2)
    assert encodes["n"] == 2 * len(second)
    for a, b in zip(later, fresh, strict=True):
        assert a.describe["truncated_prompts"] == b.describe["truncated_prompts"] == 1
        for x, y in zip(a.run.scores, b.run.scores, strict=True):
            np.testing.assert_array_equal(x, y)
    store = EmbeddingStore(tmp_path / "scores.sqlite.embeddings.sqlite")
    assert store.count(table="text_embeddings") == 2 * len(second)
    with pytest.raises(ValueError, match="no table"):
        store.count(table="scores")
    store.close()
