"""Fine-tuning on Ray Train with two CPU workers: gradient sync, checkpoints, a killed worker."""

import json

import pandas as pd
import pytest
from tiny_models import make_tiny_sd

from harness.config import load_config
from harness_plugins.sd.config import DDPOConfig, SFTConfig
from harness_plugins.sd.ddpo import SDDDPO
from harness_plugins.sd.sft import SDSFT

ray = pytest.importorskip("ray")
from harness.finetune.ray_train import train_on_ray  # noqa: E402

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    import brightness_reward

    ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(brightness_reward)
    yield brightness_reward
    ray.shutdown()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def cfg(cls, sd, out, **kw):
    base = dict(base_model=str(sd), prompts=["a red car", "a cat"], num_epochs=2, sample_num_steps=3,
                output_dir=str(out), sample_num_batches_per_epoch=2, sample_batch_size=2,
                train_batch_size=2, mixed_precision="no")
    base.update(kw)
    return load_config(cls, base)


def ranks(out):
    return {r: [json.loads(line) for line in (out / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}


def test_ddpo_two_workers_stay_in_sync(cluster, sd, tmp_path):
    out = tmp_path / "ddpo"
    tuner = cluster.instrumented(SDDDPO, cluster.record_weights)
    result = train_on_ray(tuner, cfg(DDPOConfig, sd, out), workers=2, reward=cluster.make,
                          cpus_per_worker=0.5)
    assert [row["epoch"] for row in result.log] == [1, 2]
    assert result.log[0]["images"] == 4  # both workers' samples enter the statistics
    by_rank = ranks(out)
    for a, b in zip(by_rank[0], by_rank[1], strict=True):
        assert a["epoch"] == b["epoch"] and a["pid"] != b["pid"]
        assert a["sum"] == pytest.approx(b["sum"], abs=1e-9)  # same adapters after every step
    assert by_rank[0][0]["sum"] != by_rank[0][1]["sum"]  # and they do change
    assert (out / "checkpoints" / "epoch-0002" / "pytorch_lora_weights.safetensors").is_file()
    assert [p.rsplit("/", 1)[-1] for p in result.checkpoints] == ["epoch-0001", "epoch-0002"]


def test_killed_worker_resumes_from_the_last_checkpoint(cluster, sd, tmp_path):
    out = tmp_path / "ddpo-kill"
    train_on_ray(cluster.instrumented(SDDDPO, cluster.die_once), cfg(DDPOConfig, sd, out, num_epochs=3),
                 workers=2, reward=cluster.make, cpus_per_worker=0.5, max_failures=2)
    assert (out / "killed-once").is_file()
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    epochs = [row["epoch"] for row in ranks(out)[0]]
    assert epochs.count(2) == 2 and epochs[-1] == 3  # epoch 2 ran again after the restart
    assert (out / "checkpoints" / "epoch-0003").is_dir()


def test_sft_two_workers(cluster, sd, tmp_path):
    out = tmp_path / "sft"
    result = train_on_ray(cluster.instrumented(SDSFT, cluster.record_weights),
                          cfg(SFTConfig, sd, out, images_per_prompt=2, train_steps_per_round=2),
                          workers=2, reward=cluster.make, cpus_per_worker=0.5)
    assert [row["epoch"] for row in result.log] == [1, 2]
    by_rank = ranks(out)
    assert [a["sum"] for a in by_rank[0]] == pytest.approx([b["sum"] for b in by_rank[1]], abs=1e-9)



def test_cli_ray_builds_the_reward_from_the_config(cluster, sd, tmp_path):
    """`harness finetune ddpo --ray`: the config's reward (a tiny CLIP calibrated by TextNorm)
    is built in the shared reward actors, and the fine-tuner runs through its contract."""
    from click.testing import CliRunner
    from tiny_models import make_tiny_clip

    from harness.cli import cli

    clip = make_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run.yaml"
    run.write_text(f"base_model: {sd}\nprompts: [a red car, a cat]\nnum_epochs: 1\nsample_num_steps: 3\n"
                   f"sample_num_batches_per_epoch: 1\nsample_batch_size: 2\ntrain_batch_size: 2\n"
                   f"mixed_precision: 'no'\noutput_dir: {tmp_path / 'out'}\n"
                   f"reward: 'clip:checkpoint={clip}'\nnormalizer: textnorm\nnormalizer_scale: 10\n")
    result = CliRunner().invoke(cli, ["finetune", "ddpo", "--config", str(run), "--ray", "--workers", "1"])
    assert result.exit_code == 0, result.output[-3000:]
    log = pd.read_csv(tmp_path / "out" / "train_log.csv")
    assert list(log["epoch"]) == [1] and 0 < log["reward_mean"].iloc[0] <= 1
    assert f"Trained 1 epoch on Ray Train; last mean reward {log['reward_mean'].iloc[0]:.4f}" in result.stderr
    assert (tmp_path / "out" / "checkpoints" / "epoch-0001").is_dir()


def test_a_diverging_run_stops_once_not_max_failures_times(cluster, sd, tmp_path):
    """A run stopped by a HarnessError (here: weights that overflow the UNet, at the first
    checkpoint) is not trained again by Ray's restarts: they stop at once with the same line."""
    from harness.errors import HarnessError

    out = tmp_path / "diverge"
    with pytest.raises(HarnessError, match=r"^stopped at epoch 1, step 1: the weights after this step make "
                                           r"the UNet's output non-finite; .*Lower train_learning_rate"):
        train_on_ray(cluster.instrumented(SDDDPO, cluster.record_weights),
                     cfg(DDPOConfig, sd, out, num_epochs=3, train_learning_rate=1e10),
                     workers=2, reward=cluster.make, cpus_per_worker=0.5, max_failures=2)
    # Rank 1 finished epoch 1 once (rank 0 stopped while saving it); no restart trained again.
    assert [row["epoch"] for row in ranks_of(out, 1)] == [1]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("epoch-*"))
    with pytest.raises(HarnessError, match=r"output_dir '.*diverge' is not empty: continue the run in it "
                                           r"with --resume"):
        train_on_ray(SDDDPO(), cfg(DDPOConfig, sd, out), workers=2, reward=cluster.make)


def ranks_of(out, rank):
    path = out / "ranks" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
