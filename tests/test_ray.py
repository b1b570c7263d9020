"""The Ray executor on one local Ray instance (2 CPUs, 2 logical GPUs)."""

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from tiny_models import make_image_folder, make_tiny_clip

from harness.errors import HarnessError
from harness.scoring import (
    RayExecutor,
    RayOptions,
    ScoreCache,
    load_reward_model,
    parse_model_spec,
    score_images,
)
from harness.scoring.plan import ScorePlan

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PROMPTS = ["a realistic photo of an airplane", "two airplanes", "three airplanes"]


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("img"), 24, seed=9)


@pytest.fixture(scope="module")
def spec(ckpt):
    return parse_model_spec(f"clip:checkpoint={ckpt}")


@pytest.fixture(scope="module")
def local_scores(spec, images):
    model = load_reward_model(spec, device="cpu")
    return score_images(model, images, [PROMPTS] * len(images), spec=spec, batch_size=4).scores


def run_ray(model, spec, images, options, batch_size=4, **kw):
    return score_images(model, images, [PROMPTS] * len(images), spec=spec, batch_size=batch_size,
                        executor=RayExecutor(options), **kw)


def test_same_scores_as_local(cluster, spec, images, local_scores):
    model = load_reward_model(spec, device="cpu")
    for gpus in (1.0, 0.5):
        run = run_ray(model, spec, images, RayOptions(actors=2, gpus_per_actor=gpus))
        assert run.computed == 3 * len(images) and not run.failed
        assert run.executor_info["name"] == "ray" and run.executor_info["options"]["actors"] == 2
        for a, b in zip(run.scores, local_scores, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_images_reach_preprocess_as_opened_on_ray_too(cluster, spec, tmp_path):
    from PIL import Image

    from harness.testing import write_image_modes

    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    paths = list(write_image_modes(rgb, tmp_path).values())
    model = load_reward_model(spec, device="cpu")
    local = score_images(model, paths, [PROMPTS] * len(paths), spec=spec)
    remote = score_images(model, paths, [PROMPTS] * len(paths), spec=spec,
                          executor=RayExecutor(RayOptions(actors=1, gpus_per_actor=0)))
    assert not remote.failed and remote.computed == 3 * len(paths)
    for a, b in zip(remote.scores, local.scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("gpus,expected", [(1.0, ["0", "1"]), (0.5, None)])
def test_actor_placement_on_logical_gpus(cluster, images, gpus, expected):
    import ray_models

    ray.cloudpickle.register_pickle_by_value(ray_models)
    model = ray_models.SlowColor()
    options = RayOptions(actors=2, gpus_per_actor=gpus, factory=ray_models.SlowColor)
    run = score_images(model, images, [["x"]] * len(images), batch_size=2,
                       executor=RayExecutor(options))
    seen = run.executor_info["placement"]
    assert run.computed == len(images)
    assert len(seen) == 2  # both actors of the pool did work
    if expected:  # one whole logical GPU each: GPUs 0 and 1
        assert sorted(seen.values()) == expected
    else:  # half a GPU each: both fit, each on a GPU of the two
        assert all(g in {"0", "1"} for g in seen.values())


def test_shared_cache_and_driver_resume(cluster, spec, images, local_scores, tmp_path, monkeypatch):
    model = load_reward_model(spec, device="cpu")
    cache = ScoreCache(tmp_path / "scores.sqlite")
    real_accept = ScorePlan.accept
    calls = {"n": 0}

    def dies_after_two_batches(self, ids, results, bad=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the driver is killed
        return real_accept(self, ids, results, bad)

    monkeypatch.setattr(ScorePlan, "accept", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_ray(model, spec, images, RayOptions(actors=1), cache=cache)
    monkeypatch.setattr(ScorePlan, "accept", real_accept)
    kept = cache.count()
    assert 0 < kept < 3 * len(images)
    resumed = run_ray(model, spec, images, RayOptions(actors=1), cache=cache)
    assert resumed.cached == kept and resumed.computed == 3 * len(images) - kept
    for a, b in zip(resumed.scores, local_scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The local executor reads what Ray wrote: nothing left to compute.
    again = score_images(model, images, [PROMPTS] * len(images), spec=spec, cache=cache)
    assert again.computed == 0


def test_runtime_env_of_a_plugin(cluster, images, tmp_path):
    import ray_models

    ray.cloudpickle.register_pickle_by_value(ray_models)
    model = ray_models.OffsetColor()
    local = score_images(model, images[:6], [["x", "y"]] * 6)
    remote = score_images(model, images[:6], [["x", "y"]] * 6,
                          executor=RayExecutor(RayOptions(factory=ray_models.OffsetColor)))
    for a, b in zip(remote.scores, local.scores, strict=True):
        np.testing.assert_allclose(a, b + 7, atol=1e-6)  # the actor saw the plugin's env var

    broken = ray_models.BrokenEnv()
    cache = ScoreCache(tmp_path / "scores.sqlite")
    score_images(broken, images[:3], [["x"]] * 3, cache=cache)  # scored earlier, locally
    with pytest.raises(HarnessError, match="could not build the runtime_env of reward model 'broken-env'"):
        score_images(broken, images[:6], [["x"]] * 6, cache=cache,
                     executor=RayExecutor(RayOptions(factory=partial(ray_models.BrokenEnv))))
    assert cache.count() == 3  # nothing already computed is lost


def test_cli_on_the_running_cluster(cluster, ckpt, images, local_scores, tmp_path):
    import pandas as pd

    out = tmp_path / "scores.csv"
    folder = images[0].parent
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "score", "--executor", "ray", "--address", cluster,
         "--actors", "2", "--gpus-per-actor", "0.5", "--model", f"clip:checkpoint={ckpt}",
         "--images", str(folder), *sum((["--prompt", p] for p in PROMPTS), []), "--out", str(out),
         "--no-cache", "--batch-size", "4"],
        capture_output=True, text=True, timeout=400, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out)
    got = table.pivot(index="image", columns="prompt", values="score").loc[[str(p) for p in images], PROMPTS]
    np.testing.assert_allclose(got.to_numpy(), np.stack(local_scores), atol=1e-6)


def test_no_cluster_at_the_address(tmp_path, images, ckpt):
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "score", "--executor", "ray", "--address",
         "127.0.0.1:1", "--model", f"clip:checkpoint={ckpt}", "--images", str(images[0].parent),
         "--prompt", "a cat", "--no-cache"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Error: no Ray cluster at 127.0.0.1:1" in result.stderr
    from harness.cli.options import build_executor

    with pytest.raises(HarnessError, match="need --executor ray"):
        build_executor("local", 0, None, 2, None)
    with pytest.raises(HarnessError, match="--actors must be >= 1"):
        build_executor("ray", 0, None, 0, None)


def test_one_pass_of_several_models_on_ray(cluster, ckpt, images, tmp_path):
    """Two models in one Ray pass: each image decoded once by the read stage, the same scores as
    the local one pass, the cached-or-not decision per model, embeddings stored on the driver."""
    from harness.scoring import score_models
    from harness.scoring.embeddings import EmbeddingStore

    other = make_tiny_clip(tmp_path / "clip48", seed=1, image_size=48)
    specs = [f"clip:checkpoint={ckpt}", f"clip:checkpoint={other},label=clip48"]
    prompts = [PROMPTS] * len(images)
    local = score_models(specs, images, prompts, cache=False, batch_size=4)
    executor = RayExecutor(RayOptions(actors=1, gpus_per_actor=0.5))
    cache = ScoreCache(tmp_path / "scores.sqlite")
    # model A already has half of the images: only B needs those
    half = len(images) // 2
    score_models(specs[:1], images[:half], prompts[:half], cache=cache, batch_size=4)
    runs = score_models(specs, images, prompts, cache=cache, batch_size=4, executor=executor)
    a, b = (r.run for r in runs)
    assert a.executor_info["one_pass"] and a.executor_info["name"] == "ray"
    assert a.executor_info["decoded_images"] == len(images) == b.executor_info["decoded_images"]
    assert (a.cached, a.computed) == (3 * half, 3 * (len(images) - half))
    assert (b.cached, b.computed) == (0, 3 * len(images))
    assert len(a.executor_info["placement"]) == 1 and len(b.executor_info["placement"]) == 1
    assert a.executor_info["placement"] != b.executor_info["placement"]  # an actor per model
    for ray_run, local_run in zip((a, b), local, strict=True):
        for x, y in zip(ray_run.scores, local_run.run.scores, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)
    assert not np.allclose(np.stack(a.scores), np.stack(b.scores))  # two different models
    cache.close()
    # the actors' image embeddings reached the driver's store: a new prompt set decodes nothing
    store = EmbeddingStore(tmp_path / "scores.sqlite.embeddings.sqlite")
    assert store.count() == 2 * len(images)  # A: 12 stored by the local run, 12 by Ray; B: 24
    store.close()
    new = [["a photo of a red airplane"]] * len(images)
    again = score_models(specs, images, new, cache=tmp_path / "scores.sqlite", batch_size=4,
                         executor=executor)
    fresh = score_models(specs, images, new, cache=False, batch_size=4)
    for r, f in zip(again, fresh, strict=True):
        assert r.run.encoded_images == 0 and r.run.executor_info.get("decoded_images", 0) == 0
        for x, y in zip(r.run.scores, f.run.scores, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)
    # per model on Ray: each model's read stage decodes the images again
    per_model = score_models(specs, images, prompts, cache=False, batch_size=4,
                             executor=executor, one_pass=False)
    assert sum(r.run.executor_info["decoded_images"] for r in per_model) == 2 * len(images)


def test_ray_refuses_what_cannot_run(cluster, ckpt, images, tmp_path):
    from harness.scoring import score_models

    other = make_tiny_clip(tmp_path / "clip_b", seed=2)
    specs = [f"clip:checkpoint={ckpt}", f"clip:checkpoint={other},label=clip_b"]
    too_many = RayExecutor(RayOptions(actors=2, gpus_per_actor=1.0))  # 4 GPUs on a 2-GPU cluster
    with pytest.raises(HarnessError, match=r"need 4 GPU slots and the Ray cluster's 2 GPUs hold "
                                           r"2: lower --gpus-per-actor 0.5 to share, or --actors"):
        score_models(specs, images[:4], [PROMPTS] * 4, cache=False, executor=too_many)
    import ray_models

    one = RayExecutor(RayOptions(factory=ray_models.OffsetColor))
    with pytest.raises(HarnessError, match="builds one reward model, so it cannot score 2"):
        score_models(specs, images[:4], [PROMPTS] * 4, cache=False, executor=one)


def test_a_fully_cached_model_gets_no_actor_pool(cluster, ckpt, images, tmp_path):
    from harness.scoring import score_models

    fresh = make_tiny_clip(tmp_path / "clip_c", seed=3)
    specs = [f"clip:checkpoint={ckpt}", f"clip:checkpoint={fresh},label=clip_c"]
    prompts = [["a photo of a boat"]] * 6
    cache = ScoreCache(tmp_path / "scores.sqlite")
    score_models(specs[:1], images[:6], prompts, cache=cache)  # the first model: all cached
    runs = score_models(specs, images[:6], prompts, cache=cache, batch_size=3,
                        executor=RayExecutor(RayOptions(actors=1, gpus_per_actor=0.5)))
    a, c = (r.run for r in runs)
    assert (a.computed, a.cached) == (0, 6) and (c.computed, c.cached) == (6, 0)
    assert a.executor_info.get("placement", {}) == {}  # no actors were started for it
    assert len(c.executor_info["placement"]) == 1 and c.executor_info["decoded_images"] == 6
    cache.close()


@pytest.mark.parametrize("models,actors,gpus,have,want", [
    (3, 1, None, {"GPU": 2, "CPU": 8}, (0.5, 0.5)),  # 0.66 each would leave one unplaced
    (5, 1, None, {"GPU": 4, "CPU": 8}, (0.5, 0.5)),
    (4, 1, None, {"GPU": 1, "CPU": 8}, (0.25, 0.5)),
    (2, 1, None, {"GPU": 2, "CPU": 8}, (1.0, 0.5)),
    (2, 2, None, {"CPU": 8}, (0.0, 0.5)),
    (2, 2, 0.5, {"GPU": 2, "CPU": 8}, (0.5, 0.5)),
    (1, 2, 2.0, {"GPU": 4, "CPU": 8}, (2.0, 0.5)),
    (4, 1, None, {"GPU": 4, "CPU": 2}, (1.0, 0.25)),  # actors' CPUs leave the reads one
    (3, 1, 0.6, {"GPU": 2, "CPU": 8}, "hold 2: lower --gpus-per-actor 0.5 to share"),
    (1, 3, 2.0, {"GPU": 4, "CPU": 8}, "need 3 GPU slots"),
    (1, 1, 1.5, {"GPU": 4, "CPU": 8}, "must be a whole number"),
    (64, 1, None, {"CPU": 1.5}, "too few for the read stage"),
    (2, 1, 0.5, {"CPU": 8}, "GPUs hold 0: set --gpus-per-actor 0 to run the actors on CPUs"),
])
def test_actor_resources(models, actors, gpus, have, want):
    class FakeRay:
        @staticmethod
        def cluster_resources():
            return have

    executor = RayExecutor(RayOptions(actors=actors, gpus_per_actor=gpus))
    if isinstance(want, str):
        with pytest.raises(HarnessError, match=want):
            executor._resources(FakeRay, models)
    else:
        assert executor._resources(FakeRay, models) == want
