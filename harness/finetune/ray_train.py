"""Fine-tuning on Ray Train: any registered FineTuner over several workers, GPUs or nodes.

``TorchTrainer`` starts ``workers`` processes in a torch.distributed group; each builds the
fine-tuner's ``config_class`` from the driver's settings and calls :meth:`FineTuner.train` with
an ``on_checkpoint`` that reports every epoch (and the checkpoint it wrote) to Ray Train. How the
work is split is the fine-tuner's business (the SD fine-tuners shard batches or prompts by rank,
gather rewards and average gradients, which is what DDP does); :meth:`FineTuner.check_workers`
refuses a worker count its config cannot split before anything starts. The reward lives in a pool
of shared Ray actors (``reward_actors``), not in every training worker. With
``FailureConfig(max_failures)`` a worker that dies restarts the group from the last reported
checkpoint (``config.resume_from``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.types import FineTuner, FineTuneResult, FineTuneSettings

#: written into output_dir by a worker that stopped with a HarnessError, so that Ray's restarts
#: of the worker group stop at once with the same message instead of training again
STOP_FILE = ".harness-stopped"


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
        try:
            return np.asarray(ray.get(actor.__call__.remote(images, prompts)), dtype=np.float64)
        except ray.exceptions.RayTaskError as exc:
            # The reward's own one-line error (a NaN score, ...), without the remote traceback.
            if isinstance(exc.cause, HarnessError):
                raise HarnessError(str(exc.cause)) from None
            raise


def _resolve(tuner: str | FineTuner) -> FineTuner:
    if isinstance(tuner, FineTuner):
        return tuner
    from harness.plugins import get_plugins

    return get_plugins().finetuners.get(tuner)()


def _loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the config, resume from Ray's checkpoint, train, report."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    tuner: FineTuner = loop_config["tuner"]
    config = tuner.config_class(**loop_config["config"])
    stop_file = Path(config.output_dir) / STOP_FILE
    if stop_file.is_file():  # a restart after a stop that would only happen again
        raise HarnessError(stop_file.read_text(encoding="utf-8").strip())
    checkpoint = ray.train.get_checkpoint()
    staged = None
    if checkpoint is not None:
        staged = Path(tempfile.mkdtemp(prefix="harness-resume-"))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, staged, dirs_exist_ok=True)
        config.resume_from = str(staged)

    def report(saved: Path | None, logs: dict[str, Any]) -> None:
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        if saved is not None:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(saved)))
        else:
            ray.train.report(metrics)

    try:
        tuner.train(config, loop_config["reward"], on_checkpoint=report)
    except HarnessError as exc:
        # A HarnessError (a diverged run, a bad reward) is deterministic: Ray would restart the
        # group from the last checkpoint and hit it again, max_failures times. Restarts read this.
        with contextlib.suppress(OSError):
            stop_file.write_text(str(exc), encoding="utf-8")
        raise
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


def train_on_ray(
    tuner: str | FineTuner,
    config: FineTuneSettings,
    workers: int = 2,
    *,
    address: str | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 2,
    reward: Callable[[], Any] | None = None,
    reward_actors: int = 1,
    cpus_per_worker: float = 1.0,
) -> FineTuneResult:
    """Fine-tune with ``workers`` data-parallel Ray Train workers through the FineTuner contract.

    :param tuner: a registered fine-tuner id or alias, or a :class:`FineTuner` instance (sent to
        the workers by value).
    :param reward: a picklable factory ``() -> reward callable`` for the shared reward actors;
        default: the reward ``config`` describes (checked here, before Ray starts).
    """
    from harness.finetune.reward import check_reward_settings, reward_from_settings, reward_name
    from harness.scoring.ray import RayOptions, connect

    tuner = _resolve(tuner)
    if not isinstance(config, tuner.config_class):
        raise HarnessError(f"fine-tuner '{tuner.id}' needs a {tuner.config_class.__name__}, "
                           f"got a {type(config).__name__}")
    config.validate()
    if workers < 1:
        raise HarnessError(f"--workers must be >= 1, got {workers}")
    tuner.check_workers(config, workers)
    out = Path(config.output_dir).expanduser().resolve()
    if not config.resume_from and out.is_dir() and any(out.iterdir()):
        # Workers cannot tell a restart from a fresh start into a used folder: check here.
        raise HarnessError(f"output_dir '{out}' is not empty: continue the run in it with --resume "
                           "(resume_from: latest), or choose an empty output_dir")
    if reward is None:
        check_reward_settings(config)
        config.training_prompts()
        name = reward_name(config.reward, config.normalizer)
        factory = partial(reward_from_settings, config)
    else:
        name = getattr(reward, "name", "reward")
        factory = reward
    ray = connect(RayOptions(address=address))
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    actor_cls = ray.remote(num_cpus=0.25, num_gpus=0.25 if use_gpu else 0)(_RewardActor)
    actors = [actor_cls.remote(factory) for _ in range(reward_actors)]
    shared = SharedReward(actors, name)
    out.mkdir(parents=True, exist_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    config = dataclasses.replace(config, output_dir=str(out))
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"tuner": tuner, "config": dataclasses.asdict(config), "reward": shared},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=f"harness-{tuner.id}", storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors
        cause = _harness_error(exc)
        if cause is not None:
            raise cause from exc
        raise
    finally:
        (out / STOP_FILE).unlink(missing_ok=True)
    return tuner.result(config)


def _harness_error(exc: BaseException) -> HarnessError | None:
    """The first HarnessError a worker raised, out of Ray's wrappers: a cause chain, a Ray Train
    ``WorkerGroupError``'s ``worker_failures`` (by rank) or a task error's ``cause``."""
    todo: list[Any] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        wrapped = getattr(err, "cause", None)  # RayTaskError: also an instance of its cause's class
        if isinstance(err, HarnessError) and not isinstance(wrapped, BaseException):
            return err
        failures = getattr(err, "worker_failures", None) or {}
        todo += [wrapped, err.__cause__, *(failures[rank] for rank in sorted(failures))]
    return None
