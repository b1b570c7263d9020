"""A simulated multi-node Ray cluster: a worker node dies mid-run and the run still completes."""

import threading

import numpy as np
import pytest
from tiny_models import make_image_folder, make_tiny_clip

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
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
PROMPTS = ["a realistic photo of an airplane", "two airplanes"]


@pytest.fixture(scope="module")
def cluster():
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 100 * 1024**2})
    workers = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 1024**2) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_worker_node_lost_mid_run(cluster, tmp_path, monkeypatch):
    c, workers = cluster
    ckpt = make_tiny_clip(tmp_path / "clip")
    images = make_image_folder(tmp_path / "img", 32, seed=11)
    spec = parse_model_spec(f"clip:checkpoint={ckpt}")
    model = load_reward_model(spec, device="cpu")
    reference = score_images(model, images, [PROMPTS] * len(images), batch_size=4).scores

    real_accept = ScorePlan.accept
    state = {"batches": 0, "removed": False}
    placement = {}

    def accept(self, ids, results, bad=()):
        state["batches"] += 1
        placement.update(self.run.executor_info.get("placement", {}))
        if state["batches"] == 2 and not state["removed"]:
            # Remove the worker node that hosts a model actor, while it is still busy.
            actor_nodes = {where.split(":")[0] for where in placement}
            victim = next(w for w in workers if w.node_id[:8] in actor_nodes)
            state["removed"] = victim.node_id
            threading.Thread(target=c.remove_node, args=(victim,), daemon=True).start()
        return real_accept(self, ids, results, bad)

    monkeypatch.setattr(ScorePlan, "accept", accept)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    run = score_images(model, images, [PROMPTS] * len(images), spec=spec, batch_size=4, cache=cache,
                       executor=RayExecutor(RayOptions(actors=2, gpus_per_actor=0.5)))
    assert state["removed"]
    assert not run.failed
    assert run.computed == 2 * len(images)  # every (image, prompt) once, whatever was retried
    assert cache.count() == 2 * len(images)
    for a, b in zip(run.scores, reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and state["removed"] not in {n["NodeID"] for n in alive}
    # Work was left when the node went: later batches came from actors elsewhere.
    assert state["batches"] > 2
