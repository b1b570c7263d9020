"""The scoring engine: every image encoded once, scored against any number of prompts.

``score_images(model, paths, prompts)`` runs a :class:`harness.types.RewardModel` over image
files. N prompts per image cost one image encode plus N text (or head) passes. An
:class:`~harness.scoring.executors.Executor` decides where: :class:`LocalExecutor` (this
process, DataLoader workers decoding and preprocessing) or
:class:`~harness.scoring.ray.RayExecutor` (a Ray cluster); both give the same scores and share the
cache. With a :class:`~harness.scoring.cache.ScoreCache`, scores are looked up by (model key,
image content hash, prompt) first and written after every batch: nothing is computed twice, and a
run killed midway resumes where it stopped with the same final scores.

:func:`score_models` is the library entry point used by ``harness score`` and the leaderboard:
model specs in, one :class:`ModelScores` per model out.

Images reach :meth:`~harness.types.RewardModel.preprocess` as opened
(:func:`harness.scoring.batches.open_image`: no conversion), so each model converts palette, RGBA, CMYK, ... images the way its original does.

Failures: an unreadable or corrupt image is recorded in ``ScoreRun.failed`` (path -> reason) and
the rest are scored; a NaN or infinite score raises :class:`HarnessError` naming the model, image
and prompt (batches already scored stay in the cache); a GPU out-of-memory error halves the batch
and retries.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import HarnessError
from harness.scoring.cache import ScoreCache, open_score_cache
from harness.scoring.executors import Executor, LocalExecutor
from harness.scoring.plan import ScorePlan, ScoreRun
from harness.types import RewardModel

if TYPE_CHECKING:
    from harness.scoring.embeddings import EmbeddingStore
    from harness.scoring.specs import ModelSpec

log = logging.getLogger("harness.scoring")


def score_images(
    model: RewardModel,
    paths: Sequence[str | Path],
    prompts: Sequence[Sequence[str]],
    *,
    spec: ModelSpec | None = None,
    cache: ScoreCache | str | Path | bool | None = None,
    batch_size: int = 16,
    progress: bool = False,
    executor: Executor | None = None,
    embeddings: EmbeddingStore | None = None,
) -> ScoreRun:
    """Score ``paths[i]`` against every prompt in ``prompts[i]``.

    :param spec: the :class:`~harness.scoring.specs.ModelSpec` the model was loaded from: it
        keys the cache by the constructor's options and lets a Ray actor build the same model
        (:func:`score_models` passes it). Without it the cache key uses ``describe()``.
    :param cache: an open :class:`~harness.scoring.cache.ScoreCache`, a path, ``True`` (the user
        cache) or ``None``/``False`` (none).
    :param batch_size: images per forward pass (each with all its prompts).
    :param executor: where to run (default :class:`~harness.scoring.executors.LocalExecutor`).
    :param embeddings: an open :class:`~harness.scoring.embeddings.EmbeddingStore` for a dual
        encoder (default: the one beside a file-backed ``cache``; none without a cache).
    :returns: a :class:`ScoreRun`; ``scores[i]`` is None for images in ``failed``;
        ``executor_info`` holds the executor's name, options and facts of the run.
    """
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    executor = executor if executor is not None else LocalExecutor()
    if not callable(getattr(executor, "batches", None)):
        raise HarnessError(
            f"executor {executor!r} is not an Executor (it needs batches() and describe())"
        )
    opened = None
    if cache is not None and not hasattr(cache, "put"):
        from harness.scoring.cache import open_score_cache

        cache = opened = open_score_cache(cache)
    store = embeddings
    if store is None and getattr(type(model), "embedding_kind", None) == "dual":
        from harness.scoring.embeddings import embedding_store_for

        store = embedding_store_for(cache)
    try:
        plan = ScorePlan(model, paths, prompts, cache, spec=spec, embeddings=store)
        plan.run.executor_info = dict(executor.describe())
        score_stored(model, plan, batch_size)
        if plan.todo:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(plan.todo), unit="img", desc=plan.model_name,
                           dynamic_ncols=True)
            try:
                for ids, results, bad in executor.batches(model, plan, batch_size):
                    plan.accept(ids, results, bad)
                    if bar is not None:
                        bar.update(len(ids) + len(bad))
            finally:
                if bar is not None:
                    bar.close()
        return plan.finish()
    finally:
        if store is not None and store is not embeddings:
            store.close()
        if opened is not None:  # a cache opened here: its queued writes land (or fail) now
            opened.close()


def score_stored(model: RewardModel, plan: ScorePlan, batch_size: int) -> None:
    """Score the images of ``plan.stored`` (a dual encoder's stored image embeddings) against
    their prompts: text encodes and a product, no image decoded."""
    from harness.scoring.batches import score_features

    for lo in range(0, len(plan.stored), batch_size):
        chunk = plan.stored[lo:lo + batch_size]
        ids = [i for i, _ in chunk]
        features = model.features_from_embeddings(np.stack([row for _, row in chunk]))
        plan.accept(ids, score_features(model, features, [plan.prompts[i] for i in ids]),
                    encoded=False)
    plan.stored = []


@dataclass
class ModelScores:
    """One reward model's part of :func:`score_models`."""

    spec: ModelSpec
    label: str  #: the leaderboard's method name (``spec.label``)
    describe: dict[str, Any]  #: ``model.describe()`` after scoring (truncation counts included)
    run: ScoreRun

    @property
    def uncertainty(self) -> list[Any]:
        """Per image the predicted standard deviations of its scores (``run.uncertainty``):
        float64 ``[P]``, or None (a model that reports none, or a failed image)."""
        return self.run.uncertainty

    def manifest(self) -> dict[str, Any]:
        """What a run manifest records about this model."""
        run = self.run
        out = {**self.describe, "method": self.label, "spec": self.spec.text,
               "cache_key": run.cache_key, "computed": run.computed, "cached": run.cached,
               "encoded_images": run.encoded_images, "seconds": round(run.seconds, 3),
               "failed_images": len(run.failed), "executor": run.executor_info}
        if run.reports_uncertainty:
            out["reports_uncertainty"] = True
        return out


def score_models(
    specs: Sequence[str | ModelSpec],
    paths: Sequence[str | Path],
    prompts: Sequence[Sequence[str]],
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache: bool | str | Path | ScoreCache | None = True,
    batch_size: int = 16,
    progress: bool = False,
    executor: Executor | None = None,
    one_pass: bool = True,
) -> list[ModelScores]:
    """Score ``paths[i]`` against ``prompts[i]`` with each reward model of ``specs``.

    ``one_pass=True`` (the default, with an executor that has ``batches_multi``: the
    :class:`~harness.scoring.executors.LocalExecutor` and the
    :class:`~harness.scoring.ray.RayExecutor`): every model is loaded first, each model's
    cached-or-not decision is made before any decoding (an image every model has cached is never
    read), then one pass over the images reads and decodes each image once and applies every
    needing model's preprocessing to it. Memory: all models are resident together (four CLIP-H
    size models in fp16 are ~8 GB of weights; on Ray, one actor pool per model, sharing the
    GPUs, and the driver's copies of every model on ``device``), and a decoded image's
    preprocessed inputs for every model sit in one batch.
    ``one_pass=False`` (``--no-one-pass``), or an executor without ``batches_multi``, loads,
    runs and releases one model at a time, each decoding the images again. Scores are the same
    either way; in one pass ``ScoreRun.seconds`` is the whole pass's time. A model whose cache
    key equals an earlier one's (same resolved options) is run after the pass and reads the
    earlier one's scores from the cache.

    :param cache: ``True`` the default score cache, a path, a :class:`ScoreCache` (left open),
        or ``False``/``None`` for none. Dual-encoder models keep image embeddings in an
        embedding store beside a file-backed cache.
    """
    from harness.scoring.specs import check_unique_labels, load_reward_model, parse_model_spec

    parsed = [parse_model_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise HarnessError("no reward models to score: give at least one model spec")
    check_unique_labels(parsed)
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    store = cache if isinstance(cache, ScoreCache) else open_score_cache(cache)
    executor = executor if executor is not None else LocalExecutor()
    multi = one_pass and callable(getattr(executor, "batches_multi", None))
    out: list[ModelScores] = []
    try:
        if multi and len(parsed) > 1:
            return _score_one_pass(parsed, paths, prompts, device=device, dtype=dtype,
                                   cache=store, batch_size=batch_size, progress=progress,
                                   executor=executor)
        for spec in parsed:
            model = load_reward_model(spec, device=device, dtype=dtype)
            run = score_images(model, paths, prompts, spec=spec, cache=store,
                               batch_size=batch_size, progress=progress, executor=executor)
            out.append(ModelScores(spec=spec, label=spec.label, describe=model.describe(), run=run))
            del model
            gc.collect()
    finally:
        if store is not None and store is not cache:
            store.close()
    return out


def _score_one_pass(parsed: list[ModelSpec], paths: Sequence[str | Path],
                    prompts: Sequence[Sequence[str]], *, device: str | None, dtype: str | None,
                    cache: ScoreCache | None, batch_size: int, progress: bool,
                    executor: Any) -> list[ModelScores]:
    from harness.scoring.embeddings import embedding_store_for
    from harness.scoring.plan import hash_images
    from harness.scoring.specs import load_reward_model

    models = [load_reward_model(spec, device=device, dtype=dtype) for spec in parsed]
    hashes = hash_images([str(p) for p in paths])
    embeddings = None
    if any(getattr(type(m), "embedding_kind", None) == "dual" for m in models):
        embeddings = embedding_store_for(cache)
    try:
        plans: list[ScorePlan | None] = []
        seen: set[str] = set()
        for model, spec in zip(models, parsed, strict=True):
            plan = ScorePlan(model, paths, prompts, cache, spec=spec, hashes=hashes,
                             embeddings=embeddings)
            plan.run.executor_info = {**executor.describe(), "one_pass": True}
            # Same key as an earlier model: it reads that model's scores after the pass.
            plans.append(None if plan.key in seen else plan)
            seen.add(plan.key)
        active = [k for k, p in enumerate(plans) if p is not None]
        for k in active:
            score_stored(models[k], plans[k], batch_size)
        run_models = [models[k] for k in active]
        run_plans = [plans[k] for k in active]
        total = len(set().union(*(set(p.todo) for p in run_plans)))
        bar = None
        if progress and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="img", desc="one pass", dynamic_ncols=True)
        try:
            if total:
                done: set[int] = set()
                for k, ids, results, bad in executor.batches_multi(run_models, run_plans,
                                                                   batch_size):
                    run_plans[k].accept(ids, results, bad)
                    if bar is not None:
                        new = {*ids, *(i for i, _ in bad)} - done
                        done |= new
                        bar.update(len(new))
        finally:
            if bar is not None:
                bar.close()
        out = []
        for model, spec, plan in zip(models, parsed, plans, strict=True):
            if plan is None:
                run = score_images(model, paths, prompts, spec=spec, cache=cache,
                                   batch_size=batch_size, executor=executor,
                                   embeddings=embeddings)
            else:
                run = plan.finish()
            out.append(ModelScores(spec=spec, label=spec.label, describe=model.describe(), run=run))
        return out
    finally:
        if embeddings is not None:
            embeddings.close()
