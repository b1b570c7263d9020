"""Fine-tuning on Ray Train: data-parallel SFT/DDPO over several workers, GPUs or nodes.

``TorchTrainer`` starts ``workers`` processes in a torch.distributed group. Each worker samples
its share of every epoch's batches (DDPO) or prompts (SFT); rewards are gathered so that all
workers compute the same advantages; gradients of the trainable (LoRA) parameters are averaged
over workers before every optimizer step, which is what DDP does. The reward model lives in a
pool of shared Ray actors (``reward_actors``), not in every training worker. Rank 0 writes the
checkpoints and reports them through ``ray.train.report``; with ``FailureConfig(max_failures)``
a worker that dies restarts the group from the last reported checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError


class _RewardActor:
    """A reward function resident in a Ray actor, shared by all training workers."""

    def __init__(self, factory: Callable[[], Any]):
        self.fn = factory()

    def __call__(self, images: list[Any], prompts: list[str]) -> list[float]:
        return np.asarray(self.fn(images, prompts), dtype=np.float64).tolist()


class SharedReward:
    """Calls a pool of reward actors round-robin; a picklable handle for training workers."""

    def __init__(self, actors: list[Any], name: str):
        self.actors = actors
        self.name = name
        self._next = 0

    def __call__(self, images: list[Any], prompts: list[str]) -> np.ndarray:
        import ray

        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return np.asarray(ray.get(actor.__call__.remote(images, prompts)), dtype=np.float64)


def _reward_factory(config: Any) -> tuple[str, Callable[[], Any]]:
    from functools import partial

    from harness.finetune.reward import RewardFunction

    name = config.reward if config.normalizer is None else f"{config.normalizer}({config.reward})"
    return name, partial(RewardFunction, config.reward, normalizer=config.normalizer,
                         scale=config.normalizer_scale, contrastive=config.contrastive_prompts,
                         prompts=config.training_prompts())


def _loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the trainer, resume from Ray's checkpoint, train, report."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from harness.plugins import get_plugins

    tuner = get_plugins().finetuners.get(loop_config["method"])
    config = tuner.config_class(**loop_config["config"])
    checkpoint = ray.train.get_checkpoint()
    staged = None
    if checkpoint is not None:
        staged = Path(tempfile.mkdtemp(prefix="harness-resume-"))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, staged, dirs_exist_ok=True)
        config.resume_from = str(staged)
    trainer = tuner.trainer_class(config, reward=loop_config["reward"])
    hook = loop_config.get("test_hook")

    def report(saved: Path | None, logs: dict[str, Any]) -> None:
        if hook is not None:
            hook(trainer)
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        if saved is not None:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(saved)))
        else:
            ray.train.report(metrics)

    trainer.on_checkpoint = report
    trainer.train()
    if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)


def train_on_ray(
    method: str,
    config: Any,
    workers: int = 2,
    *,
    address: str | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 2,
    reward: Any = None,
    reward_actors: int = 1,
    cpus_per_worker: float = 1.0,
    test_hook: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune with ``workers`` data-parallel Ray Train workers; returns what the trainer logged.

    :param reward: a picklable factory ``() -> reward callable`` for the shared reward actors;
        default: ``config.reward`` (a reward-model spec, optionally with ``config.normalizer``).
    """
    from harness.plugins import get_plugins
    from harness.scoring.ray import RayOptions, connect

    tuner = get_plugins().finetuners.get(method)
    config.validate()
    if workers < 1:
        raise HarnessError(f"--workers must be >= 1, got {workers}")
    if getattr(config, "sample_num_batches_per_epoch", None) and tuner.id == "sd_ddpo":
        if config.sample_num_batches_per_epoch % workers:
            raise HarnessError(
                f"sample_num_batches_per_epoch ({config.sample_num_batches_per_epoch}) must be a "
                f"multiple of --workers ({workers}) so that every worker takes as many steps"
            )
    if tuner.id == "sd_sft" and len(config.training_prompts()) < workers:
        raise HarnessError(f"SFT with {workers} workers needs at least {workers} prompts")
    ray = connect(RayOptions(address=address))
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    if reward is None:
        name, factory = _reward_factory(config)
    else:
        name, factory = getattr(reward, "name", "reward"), reward
    actor_cls = ray.remote(num_cpus=0.25, num_gpus=0.25 if use_gpu else 0)(_RewardActor)
    actors = [actor_cls.remote(factory) for _ in range(reward_actors)]
    shared = SharedReward(actors, name)
    out = Path(config.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, output_dir=str(out))
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"method": tuner.id, "config": dataclasses.asdict(config), "reward": shared,
                           "test_hook": test_hook},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=f"harness-{tuner.id}", storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors
        cause = exc
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if isinstance(cause, HarnessError):
            raise cause from exc
        raise
    log = out / "train_log.csv"
    import pandas as pd

    return {"metrics": result.metrics, "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
            "log": pd.read_csv(log).to_dict(orient="records") if log.is_file() else [],
            "output_dir": str(out)}
