"""The Ray executor: the same reward plugins, cache and results, spread over a Ray cluster.

A Ray Data pipeline with two stages:

1. a CPU stage (plain tasks) that reads image files and runs the model's picklable
   :meth:`~harness.types.RewardModel.preprocessor`;
2. a ``map_batches`` stage over an actor pool of model actors
   (``compute=ActorPoolStrategy(size=actors)``, explicit ``batch_size``, ``num_gpus`` per actor,
   fractional so that several reward models can share a GPU, and a small ``num_cpus`` (0.5) so the
   CPU stage is never starved of cores: actors holding every CPU deadlock the reads).

Scores stream back to the driver, which alone writes the SQLite score cache through the same
:class:`~harness.scoring.plan.ScorePlan` as the local executor: nothing cached is sent to the cluster,
every batch is committed as it arrives (a killed driver resumes from the cache), and an image
delivered twice by a retried task is recorded once. Actors and tasks lost with a node are retried
by Ray (``max_restarts``/``max_task_retries``). A model class may declare ``ray_runtime_env``
(pip requirements, environment variables) for its actors.

Several models: this executor has no ``batches_multi``, so
:func:`~harness.scoring.score_models` runs one model at a time through it (each model's read
stage decodes the images again) rather than the local executor's one pass; a dual encoder's
images already in the embedding store are scored on the driver from their stored rows, and rows
computed by the actors are not stored.

Ray is imported only when this executor is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.errors import HarnessError


@dataclass
class RayOptions:
    """Where and how to run on Ray.

    :param address: ``None`` starts a local Ray instance; ``auto`` joins the cluster of
        ``ray start``; ``ray://host:10001`` connects a Ray Client.
    :param actors: model actors in the pool.
    :param gpus_per_actor: GPUs per model actor (fractional allowed: 0.25 puts four on one GPU).
    :param cpus_per_actor: CPUs reserved per model actor (keep it small; see the module docs).
    :param factory: a picklable zero-argument callable that builds the model inside an actor; by
        default the actor loads the run's model spec (a value) through the plugin registry.
    """

    address: str | None = None
    actors: int = 1
    gpus_per_actor: float | None = None  #: None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 0.5
    read_cpus: float = 1.0
    factory: Callable[[], Any] | None = None
    runtime_env: dict[str, Any] | None = None
    max_restarts: int = 3
    init_kwargs: dict[str, Any] = field(default_factory=dict)


def connect(options: RayOptions) -> Any:
    """``ray.init`` once, with a one-line error when there is no cluster at the address."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a declared dependency
        raise HarnessError("the ray executor needs Ray: pip install 'ray[data]'") from exc
    if ray.is_initialized():
        return ray
    _check_reachable(options.address)
    kwargs = {"include_dashboard": False, "log_to_driver": False, **options.init_kwargs}
    try:
        ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = options.address or "a new local instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"could not connect to a Ray cluster at {where}: {first}") from exc
    return ray


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` or ``ray://host:port`` nobody listens on (ray.init would wait)."""
    import socket

    if not address or address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise HarnessError(f"Ray address '{address}' is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise HarnessError(
            f"no Ray cluster at {address}: {exc.strerror or exc} (start one with `ray start --head`)"
        ) from exc


def _read(batch: dict[str, np.ndarray], preprocess: Any) -> dict[str, Any]:
    """CPU stage: decode (as opened, no conversion) and preprocess; failures travel as a string."""
    from harness.scoring.batches import decode_and_preprocess

    pixels, errors = [], []
    for path in batch["path"]:
        x, err = decode_and_preprocess(str(path), preprocess)
        if err is None:
            try:
                x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
                pixels.append(np.ascontiguousarray(x, dtype=np.float32))
                errors.append("")
                continue
            except Exception as exc:  # noqa: BLE001 - an input Ray cannot carry as an array
                err = f"{type(exc).__name__}: {exc}"
        pixels.append(np.zeros((0,), dtype=np.float32))
        errors.append(err)
    return {"i": batch["i"], "prompts": batch["prompts"], "pixels": pixels, "error": np.array(errors)}


class _ModelActor:
    """One reward model resident in an actor (on the actor's GPU when it has one)."""

    def __init__(self, factory: Callable[[], Any]):
        import ray

        self.model = factory()
        self.where = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self.gpus = ",".join(str(g) for g in ray.get_gpu_ids())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        errors = [str(e) for e in batch["error"]]
        good = [k for k, e in enumerate(errors) if not e]
        scores = [""] * len(errors)
        if good:
            pixels = torch.from_numpy(np.stack([np.asarray(batch["pixels"][k]) for k in good]))
            prompts = [json.loads(batch["prompts"][k]) for k in good]
            from harness.scoring.batches import run_with_backoff
            from harness.types import ImageFailure

            # Out-of-memory on the actor's GPU halves the batch, as in the local executor.
            for k, values in zip(good, run_with_backoff(self.model, pixels, prompts), strict=True):
                if isinstance(values, ImageFailure):  # the model could not score this image
                    errors[k] = values.reason
                    continue
                if hasattr(values, "detach"):
                    values = values.detach().float().cpu().numpy()
                scores[k] = json.dumps(np.asarray(values, dtype=np.float64).tolist())
        n = len(errors)
        return {"i": batch["i"], "scores": np.array(scores), "error": np.array(errors),
                "actor": np.array([self.where] * n), "gpus": np.array([self.gpus] * n)}


def spec_factory(spec: Any, dtype: str | None) -> Callable[[], Any]:
    """A picklable factory building the model of ``spec`` (a value) inside an actor."""
    from functools import partial

    return partial(_load_in_actor, spec, dtype)


def _load_in_actor(spec: Any, dtype: str | None) -> Any:
    import torch

    from harness.scoring.specs import load_reward_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_reward_model(spec, device=device, dtype=dtype or "auto")


class RayExecutor:
    """Scores on a Ray cluster (see the module docs); implements the
    :class:`~harness.scoring.executors.Executor` protocol.

    Actors build the model from the plan's spec (sent as a value, with the dtype the driver's
    model runs in) unless ``options.factory`` is given. ``ScoreRun.executor_info["placement"]``
    maps each actor (``node:pid``) to the GPU ids Ray gave it.
    """

    name = "ray"

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        if self.options.actors < 1:
            raise HarnessError(f"actors must be >= 1, got {self.options.actors}")
        if self.options.gpus_per_actor is not None and self.options.gpus_per_actor < 0:
            raise HarnessError(f"gpus_per_actor must be >= 0, got {self.options.gpus_per_actor}")

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {"name": self.name,
                "options": {"address": o.address, "actors": o.actors,
                            "gpus_per_actor": o.gpus_per_actor, "cpus_per_actor": o.cpus_per_actor,
                            "read_cpus": o.read_cpus, "max_restarts": o.max_restarts,
                            "factory": None if o.factory is None else repr(o.factory)}}

    def __repr__(self) -> str:
        return f"RayExecutor({self.options!r})"

    def batches(self, model: Any, plan: Any, batch_size: int
                ) -> Iterator[tuple[list[int], list[np.ndarray], list[tuple[int, str]]]]:
        """Yield ``(indices, score arrays, failures)`` batches computed on Ray."""
        options = self.options
        factory = options.factory
        if factory is None:
            if plan.spec is None:
                # Rebuilding from the id alone could drop settings (mode, text length, processor)
                # and cache another model's scores under this model's key.
                raise HarnessError(
                    f"Ray actors cannot rebuild reward model '{plan.model_name}': pass its spec "
                    "(score_images(..., spec=parse_model_spec(...)), or use score_models) or "
                    "RayOptions(factory=...)"
                )
            spec = type(plan.spec)(plan.spec.name, {k: v for k, v in plan.spec.options.items()
                                                    if k not in {"device", "dtype"}})
            factory = spec_factory(spec, plan.dtype)
        ray = connect(options)
        gpus = options.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        from ray.data import ActorPoolStrategy

        runtime_env = options.runtime_env or getattr(type(model), "ray_runtime_env", None)
        items = [{"i": i, "path": plan.paths[i], "prompts": json.dumps(plan.prompts[i])}
                 for i in plan.todo]
        blocks = max(1, min(len(items), (len(items) + batch_size - 1) // batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(_read, fn_kwargs={"preprocess": model.preprocessor()},
                            batch_size=batch_size, num_cpus=options.read_cpus, batch_format="numpy")
        # Actor restarts are not a named map_batches parameter: they go through ray_remote_args.
        remote_args: dict[str, Any] = {"max_restarts": options.max_restarts,
                                       "max_task_retries": options.max_restarts}
        ds = ds.map_batches(
            _ModelActor,
            fn_constructor_kwargs={"factory": factory},
            compute=ActorPoolStrategy(size=options.actors),
            batch_size=batch_size,
            num_gpus=gpus,
            num_cpus=options.cpus_per_actor,
            batch_format="numpy",
            runtime_env=runtime_env or None,
            **remote_args,
        )
        placement: dict[str, str] = plan.run.executor_info.setdefault("placement", {})
        plan.run.executor_info["gpus_per_actor"] = gpus
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ids, results, bad = [], [], []
                for i, scores, err, actor, gpu_ids in zip(out["i"], out["scores"], out["error"],
                                                          out["actor"], out["gpus"], strict=True):
                    i = int(i)
                    placement.setdefault(str(actor), str(gpu_ids))
                    if err:
                        bad.append((i, str(err)))
                    else:
                        ids.append(i)
                        results.append(np.asarray(json.loads(str(scores)), dtype=np.float64))
                yield ids, results, bad
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps failures in its own types
            name = type(exc).__name__
            text = str(exc)
            if ("RuntimeEnvSetupError" in name or "RuntimeEnvSetupError" in text
                    or "runtime_env" in text):
                raise HarnessError(
                    f"Ray could not build the runtime_env of reward model '{plan.model_name}' "
                    f"({json.dumps(runtime_env)}); scores finished so far are in the cache"
                ) from exc
            raise
