"""The Ray executor on one local Ray instance (2 CPUs, 2 logical GPUs)."""

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from tiny_models import make_image_folder, make_tiny_clip

from harness.errors import HarnessError
from harness.scoring.specs import load_reward_model
from harness.scoring.cache import ScoreCache
from harness.scoring.runner import ScorePlan, score_images

ray = pytest.importorskip("ray")
from harness.scoring.ray import RayOptions  # noqa: E402

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
def local_scores(ckpt, images):
    model = load_reward_model(f"clip:checkpoint={ckpt}", device="cpu")
    return score_images(model, images, [PROMPTS] * len(images), batch_size=4).scores


def run_ray(model, images, options, batch_size=4, **kw):
    return score_images(model, images, [PROMPTS] * len(images), batch_size=batch_size, executor="ray",
                        ray_options=options, **kw)


def test_same_scores_as_local(cluster, ckpt, images, local_scores):
    model = load_reward_model(f"clip:checkpoint={ckpt}", device="cpu")
    for gpus in (1.0, 0.5):
        run = run_ray(model, images, RayOptions(actors=2, gpus_per_actor=gpus))
        assert run.computed == 3 * len(images) and not run.failed
        for a, b in zip(run.scores, local_scores, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("gpus,expected", [(1.0, ["0", "1"]), (0.5, None)])
def test_actor_placement_on_logical_gpus(cluster, images, monkeypatch, gpus, expected):
    import ray_models

    ray.cloudpickle.register_pickle_by_value(ray_models)
    seen = {}
    real_finish = ScorePlan.finish

    def finish(self):
        seen.update(getattr(self, "placement", {}))
        return real_finish(self)

    monkeypatch.setattr(ScorePlan, "finish", finish)
    model = ray_models.SlowColor()
    run = score_images(model, images, [["x"]] * len(images), batch_size=2, executor="ray",
                       ray_options=RayOptions(actors=2, gpus_per_actor=gpus, factory=ray_models.SlowColor))
    assert run.computed == len(images)
    assert len(seen) == 2  # both actors of the pool did work
    if expected:  # one whole logical GPU each: GPUs 0 and 1
        assert sorted(seen.values()) == expected
    else:  # half a GPU each: both fit, each on a GPU of the two
        assert all(g in {"0", "1"} for g in seen.values())


def test_shared_cache_and_driver_resume(cluster, ckpt, images, local_scores, tmp_path, monkeypatch):
    model = load_reward_model(f"clip:checkpoint={ckpt}", device="cpu")
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
        run_ray(model, images, RayOptions(actors=1), cache=cache)
    monkeypatch.setattr(ScorePlan, "accept", real_accept)
    kept = cache.count()
    assert 0 < kept < 3 * len(images)
    resumed = run_ray(model, images, RayOptions(actors=1), cache=cache)
    assert resumed.cached == kept and resumed.computed == 3 * len(images) - kept
    for a, b in zip(resumed.scores, local_scores, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The local executor reads what Ray wrote: nothing left to compute.
    again = score_images(model, images, [PROMPTS] * len(images), cache=cache)
    assert again.computed == 0


def test_runtime_env_of_a_plugin(cluster, images, tmp_path):
    import ray_models

    ray.cloudpickle.register_pickle_by_value(ray_models)
    model = ray_models.OffsetColor()
    local = score_images(model, images[:6], [["x", "y"]] * 6)
    remote = score_images(model, images[:6], [["x", "y"]] * 6, executor="ray",
                          ray_options=RayOptions(factory=ray_models.OffsetColor))
    for a, b in zip(remote.scores, local.scores, strict=True):
        np.testing.assert_allclose(a, b + 7, atol=1e-6)  # the actor saw the plugin's env var

    broken = ray_models.BrokenEnv()
    cache = ScoreCache(tmp_path / "scores.sqlite")
    score_images(broken, images[:3], [["x"]] * 3, cache=cache)  # scored earlier, locally
    with pytest.raises(HarnessError, match="could not build the runtime_env of reward model 'broken-env'"):
        score_images(broken, images[:6], [["x"]] * 6, executor="ray", cache=cache,
                     ray_options=RayOptions(factory=partial(ray_models.BrokenEnv)))
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
    with pytest.raises(HarnessError, match="need --executor ray"):
        from harness.cli import _ray_options

        _ray_options("local", None, 2, None)
