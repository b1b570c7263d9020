"""The Ray executor: the same reward plugins, cache and results, spread over a Ray cluster.

A Ray Data pipeline, for one reward model or for every model of a run in one pass:

1. a CPU stage (plain tasks) that reads and decodes each image once and applies the picklable
   :meth:`~harness.types.RewardModel.preprocessor` of every model that still needs the image
   (each model's cached-or-not decision is made on the driver before anything is sent);
2. one ``map_batches`` stage per model over an actor pool of that model's actors
   (``compute=ActorPoolStrategy(size=actors)``, explicit ``batch_size``, ``num_gpus`` per actor,
   fractional so that several reward models can share a GPU, and a small ``num_cpus`` (0.5) so the
   CPU stage is never starved of cores: actors holding every CPU deadlock the reads). Each stage
   scores its model's rows and drops that model's inputs from the rows it passes on.

With GPUs unset, each actor gets a whole GPU when the cluster has one per actor, else the largest
share that gives every actor a place on a GPU (four models on one GPU: 0.25 each; three on two:
0.5); actors' CPUs shrink to leave the read stage its share. Scores stream back to the driver, which alone writes the score cache through
the same :class:`~harness.scoring.plan.ScorePlan` as the local executor: nothing cached is sent
to the cluster, every batch is committed as it arrives (a killed driver resumes from the
cache), and an image delivered twice by a retried task is recorded once. A dual encoder's
image embeddings come back with its scores and go to the driver's embedding store. Actors and
tasks lost with a node are retried by Ray (``max_restarts``/``max_task_retries``). A model class
may declare ``ray_runtime_env`` (pip requirements, environment variables) for its actors.
``ScoreRun.executor_info`` records the placement of each model's actors, the resources per
actor and ``decoded_images`` (the rows the read stage delivered: each image any model needed,
decoded once, a failed decode included; a retried task's rows may count twice). A model with
nothing left to score gets no actor pool.

Ray is imported only when this executor is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
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
    gpus_per_actor: float | None = None  #: None: 1 per actor if the cluster has them, else shared
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


def _read(batch: dict[str, np.ndarray], preprocessors: list[Any]) -> dict[str, Any]:
    """CPU stage: each image read and decoded once (as opened, no conversion), and the
    preprocessing of every model that needs it (bit ``k`` of ``need``) applied to it; model
    ``k``'s input goes to ``pixels_k`` and its failure, as a string, to ``error_k``."""
    from harness.scoring.batches import decode_for_models

    out: dict[str, Any] = {"i": batch["i"], "prompts": batch["prompts"], "need": batch["need"]}
    columns = [([], []) for _ in preprocessors]
    for path, need in zip(batch["path"], batch["need"], strict=True):
        wanted = [pre if (int(need) >> k) & 1 else None for k, pre in enumerate(preprocessors)]
        inputs, errs = decode_for_models(str(path), wanted)
        for k, (pixels, errors) in enumerate(columns):
            x, err = inputs[k], errs[k]
            if wanted[k] is not None and err is None:
                try:
                    x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
                    pixels.append(np.ascontiguousarray(x, dtype=np.float32))
                    errors.append("")
                    continue
                except Exception as exc:  # noqa: BLE001 - an input Ray cannot carry as an array
                    err = f"{type(exc).__name__}: {exc}"
            pixels.append(np.zeros((0,), dtype=np.float32))
            errors.append(err or "")
    for k, (pixels, errors) in enumerate(columns):
        out[f"pixels_{k}"] = pixels
        out[f"error_{k}"] = np.array(errors)
    return out


class _ModelActor:
    """Reward model ``k`` of a run resident in an actor (on the actor's GPU when it has one):
    scores the rows that need it from ``pixels_k`` (dropped from the rows it passes on) into
    ``scores_k``/``error_k``, with ``actor_k``/``gpus_k`` (where it ran) and, for a dual encoder
    whose embeddings the driver stores, the image rows in ``emb_k``."""

    def __init__(self, factory: Callable[[], Any], k: int = 0, embeddings: bool = False):
        import ray

        self.model = factory()
        self.k = k
        self.embeddings = embeddings
        self.where = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self.gpus = ",".join(str(g) for g in ray.get_gpu_ids())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from harness.scoring.batches import run_with_backoff
        from harness.scoring.embeddings import features_to_rows
        from harness.types import ImageFailure

        k = self.k
        out = {name: column for name, column in batch.items() if name != f"pixels_{k}"}
        errors = [str(e) for e in batch[f"error_{k}"]]
        good = [j for j, (need, e) in enumerate(zip(batch["need"], errors, strict=True))
                if (int(need) >> k) & 1 and not e]
        scores = [""] * len(errors)
        rows: list[Any] = [np.zeros((0,), dtype=np.float32)] * len(errors)
        if good:
            pixels = torch.from_numpy(np.stack([np.asarray(batch[f"pixels_{k}"][j]) for j in good]))
            prompts = [json.loads(batch["prompts"][j]) for j in good]

            def keep(offset: int, features: Any) -> None:
                for j, row in zip(good[offset:], features_to_rows(features), strict=False):
                    rows[j] = row

            # Out-of-memory on the actor's GPU halves the batch, as in the local executor.
            results = run_with_backoff(self.model, pixels, prompts,
                                       keep if self.embeddings else None)
            for j, values in zip(good, results, strict=True):
                if isinstance(values, ImageFailure):  # the model could not score this image
                    errors[j] = values.reason
                    continue
                if hasattr(values, "detach"):
                    values = values.detach().float().cpu().numpy()
                scores[j] = json.dumps(np.asarray(values, dtype=np.float64).tolist())
        n = len(errors)
        out.update({f"scores_{k}": np.array(scores), f"error_{k}": np.array(errors),
                    f"actor_{k}": np.array([self.where] * n),
                    f"gpus_{k}": np.array([self.gpus] * n)})
        if self.embeddings:
            out[f"emb_{k}"] = rows
        return out


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
        for _, ids, results, bad in self._run([model], [plan], batch_size):
            yield ids, results, bad

    def batches_multi(self, models: Sequence[Any], plans: Sequence[Any], batch_size: int
                      ) -> Iterator[tuple[int, list[int], list[np.ndarray], list[tuple[int, str]]]]:
        """One pass for several models (same paths and prompts in every plan): one read stage
        decodes each image any model still needs once and applies each needing model's
        preprocessing; one actor pool per model follows it. Yields ``(model index, ids,
        results, failures)`` as :meth:`LocalExecutor.batches_multi
        <harness.scoring.executors.LocalExecutor.batches_multi>` does."""
        if self.options.factory is not None and len(models) > 1:
            raise HarnessError(
                "RayOptions(factory=...) builds one reward model, so it cannot score "
                f"{len(models)} models: leave factory unset (actors build each model from its "
                "spec), or score one model per call"
            )
        yield from self._run(list(models), list(plans), batch_size)

    def _factory(self, model: Any, plan: Any) -> Callable[[], Any]:
        if self.options.factory is not None:
            return self.options.factory
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
        return spec_factory(spec, plan.dtype)

    def _resources(self, ray: Any, pools: int) -> tuple[float, float]:
        """GPUs and CPUs per actor for ``pools`` actor pools of ``options.actors`` actors.

        Ray places an actor asking for part of a GPU on one GPU with that much free, so GPUs
        are counted in slots: ``floor(1 / share)`` actors per GPU. Unset GPUs: one per actor
        when the cluster has a GPU per actor, else the largest share that gives every actor a
        slot (four models on one GPU: 0.25 each; three on two GPUs: 0.5), else none. Set ones
        that leave an actor without a slot are refused: the pipeline would wait for it forever.
        GPUs are counted over the whole cluster, not per node. CPUs per actor shrink so that
        the read stage keeps ``read_cpus``: actors holding every CPU deadlock the reads."""
        import math

        o = self.options
        total = pools * o.actors
        have = ray.cluster_resources()
        gpus_there, cpus_there = float(have.get("GPU", 0)), float(have.get("CPU", 0))
        whole = math.floor(gpus_there + 1e-9)  # GPUs a fraction can be placed on
        gpus = o.gpus_per_actor
        if gpus is None:
            if whole >= total:
                gpus = 1.0
            elif whole >= 1:
                per_gpu = math.ceil(total / whole)
                gpus = math.floor(100 / per_gpu) / 100
                if gpus == 0:
                    raise HarnessError(
                        f"{pools} reward model(s) x {o.actors} actor(s) cannot share the cluster's "
                        f"{whole} GPU(s) (under 0.01 GPU each): lower --actors"
                    )
            else:
                gpus = 0.0
        elif gpus > 0:
            if gpus > 1 and gpus != math.floor(gpus):
                raise HarnessError(f"--gpus-per-actor above 1 must be a whole number of GPUs, "
                                   f"got {gpus:g}")
            slots = math.floor(1 / gpus + 1e-9) * whole if gpus <= 1 else \
                math.floor(whole / gpus)
            if slots < total:
                fit = math.floor(100 / math.ceil(total / whole)) / 100 if whole else 0
                fix = (f"lower --gpus-per-actor {fit:g} to share, or --actors" if fit else
                       "set --gpus-per-actor 0 to run the actors on CPUs, or add GPUs")
                raise HarnessError(
                    f"{pools} reward model(s) x {o.actors} actor(s) at {gpus:g} GPU each need "
                    f"{total} GPU slots and the Ray cluster's {gpus_there:g} GPUs hold {slots}: "
                    f"{fix}"
                )
        cpus = o.cpus_per_actor
        budget = cpus_there - o.read_cpus
        if cpus_there and cpus * total > budget:
            if budget < 0.01 * total:
                raise HarnessError(
                    f"the Ray cluster has {cpus_there:g} CPUs, too few for the read stage "
                    f"({o.read_cpus:g}) and {total} model actor(s): add CPUs or lower --actors"
                )
            cpus = math.floor(budget / total * 100) / 100
        return float(gpus), float(cpus)

    def _run(self, models: list[Any], plans: list[Any], batch_size: int
             ) -> Iterator[tuple[int, list[int], list[np.ndarray], list[tuple[int, str]]]]:
        options = self.options
        needs = [set(plan.todo) for plan in plans]
        union = sorted(set().union(*needs))
        if not union:
            return
        # a model with nothing left to score (all cached) gets no actor pool
        active = [k for k, need in enumerate(needs) if need]
        factories = {k: self._factory(models[k], plans[k]) for k in active}
        ray = connect(options)
        gpus, cpus = self._resources(ray, len(active))
        from ray.data import ActorPoolStrategy

        envs = [options.runtime_env or getattr(type(m), "ray_runtime_env", None) for m in models]
        plan0 = plans[0]
        items = [{"i": i, "path": plan0.paths[i], "prompts": json.dumps(plan0.prompts[i]),
                  "need": sum(1 << k for k, need in enumerate(needs) if i in need)}
                 for i in union]
        blocks = max(1, min(len(items), (len(items) + batch_size - 1) // batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(_read, fn_kwargs={"preprocessors": [m.preprocessor() for m in models]},
                            batch_size=batch_size, num_cpus=options.read_cpus, batch_format="numpy")
        # Actor restarts are not a named map_batches parameter: they go through ray_remote_args.
        remote_args: dict[str, Any] = {"max_restarts": options.max_restarts,
                                       "max_task_retries": options.max_restarts}
        for k in active:
            factory, env, plan = factories[k], envs[k], plans[k]
            ds = ds.map_batches(
                _ModelActor,
                fn_constructor_kwargs={"factory": factory, "k": k,
                                       "embeddings": plan.embeddings is not None},
                compute=ActorPoolStrategy(size=options.actors),
                batch_size=batch_size,
                num_gpus=gpus,
                num_cpus=cpus,
                batch_format="numpy",
                runtime_env=env or None,
                **remote_args,
            )
        for plan in plans:
            info = plan.run.executor_info
            info.setdefault("placement", {})
            info.update({"gpus_per_actor": gpus, "cpus_per_actor": cpus,
                         "decoded_images": info.get("decoded_images", 0)})
            if len(models) > 1:
                info["one_pass"] = True
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [int(i) for i in out["i"]]
                for plan in plans:
                    plan.run.executor_info["decoded_images"] += len(rows)
                for k in active:
                    plan = plans[k]
                    placement = plan.run.executor_info["placement"]
                    ids, results, bad, embedded = [], [], [], []
                    for j, i in enumerate(rows):
                        if not (int(out["need"][j]) >> k) & 1:
                            continue
                        placement.setdefault(str(out[f"actor_{k}"][j]), str(out[f"gpus_{k}"][j]))
                        err = str(out[f"error_{k}"][j])
                        if err:
                            bad.append((i, err))
                            continue
                        ids.append(i)
                        results.append(np.asarray(json.loads(str(out[f"scores_{k}"][j])),
                                                  dtype=np.float64))
                        if plan.embeddings is not None:
                            embedded.append(np.asarray(out[f"emb_{k}"][j], dtype=np.float32))
                    if embedded and all(row.size for row in embedded):
                        plan.feature_sink(ids)(0, np.stack(embedded))
                    if ids or bad:
                        yield k, ids, results, bad
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps failures in its own types
            name = type(exc).__name__
            text = str(exc)
            if ("RuntimeEnvSetupError" in name or "RuntimeEnvSetupError" in text
                    or "runtime_env" in text):
                named = [(plans[k].model_name, envs[k]) for k in active if envs[k]]
                which = ", ".join(f"'{n}'" for n, _ in named) or \
                    ", ".join(f"'{plans[k].model_name}'" for k in active)
                shown = json.dumps(named[0][1]) if len(named) == 1 else \
                    json.dumps(dict(named)) if named else "{}"
                raise HarnessError(
                    f"Ray could not build the runtime_env of reward model {which} ({shown}); "
                    "scores finished so far are in the cache"
                ) from exc
            raise
