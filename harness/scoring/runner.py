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

Images reach :meth:`~harness.types.RewardModel.preprocess` as opened (:func:`open_image`: no
conversion), so each model converts palette, RGBA, CMYK, ... images the way its original does.

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
from harness.scoring.plan import ScorePlan, ScoreRun
from harness.types import RewardModel

if TYPE_CHECKING:
    from harness.scoring.executors import Executor
    from harness.scoring.specs import ModelSpec

log = logging.getLogger("harness.scoring")


def open_image(path: str | Path) -> Any:
    """The one image decoder: ``Image.open`` + ``load()``, in the file's own mode (no convert)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
    return img


def decode_and_preprocess(path: str | Path, preprocess: Any) -> tuple[Any, str | None]:
    """``(preprocessed input, None)`` or ``(None, "ErrorType: message")`` for one image file."""
    try:
        return preprocess(open_image(path)), None
    except Exception as exc:  # noqa: BLE001 - any decode failure names the file
        return None, f"{type(exc).__name__}: {exc}"


class _Images:
    """Map-style dataset: index -> (index, preprocessed image or None, error message or None)."""

    def __init__(self, paths: Sequence[str], preprocess: Any):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        x, err = decode_and_preprocess(self.paths[i], self.preprocess)
        return i, x, err


def collate(inputs: list[Any]) -> Any:
    """Preprocessed inputs -> one batch: stacked tensors or arrays, dicts of them, else a list."""
    first = inputs[0]
    if isinstance(first, dict):
        return {k: collate([x[k] for x in inputs]) for k in first}
    if type(first).__module__.startswith("torch"):
        import torch

        if isinstance(first, torch.Tensor):
            return torch.stack(inputs)
    if isinstance(first, np.ndarray):
        return np.stack(inputs)
    return list(inputs)


def _collate(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """DataLoader collate: ``(index, input, error)`` items -> ``(indices, batch, failures)``."""
    ok = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not ok:
        return [], None, bad
    return [i for i, _ in ok], collate([x for _, x in ok]), bad


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _slice(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi) for k, v in batch.items()}
    return batch[lo:hi]


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def _embed_and_score(model: RewardModel, batch: Any, prompts: list[list[str]]) -> list[np.ndarray]:
    features = model.embed_images(batch)
    return [np.asarray(_to_numpy(s), dtype=np.float64).reshape(-1)
            for s in model.score(features, prompts)]


def run_with_backoff(model: RewardModel, batch: Any, prompts: list[list[str]]) -> list[np.ndarray]:
    """Score a batch; on out-of-memory, split it in halves and retry (down to one image).

    The retry happens after the ``except`` block: inside it, the traceback would keep the failed
    forward pass's tensors alive and the smaller batches would run out of memory too.
    """
    try:
        return _embed_and_score(model, batch, prompts)
    except Exception as exc:
        if not _is_oom(exc) or len(prompts) == 1:
            raise
        del exc
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    n = len(prompts)
    half = n // 2
    log.warning("out of memory at batch size %d; retrying with %d", n, half)
    return run_with_backoff(model, _slice(batch, 0, half), prompts[:half]) + run_with_backoff(
        model, _slice(batch, half, n), prompts[half:]
    )


def score_images(
    model: RewardModel,
    paths: Sequence[str | Path],
    prompts: Sequence[Sequence[str]],
    *,
    spec: ModelSpec | None = None,
    cache: ScoreCache | None = None,
    batch_size: int = 16,
    progress: bool = False,
    executor: Executor | None = None,
) -> ScoreRun:
    """Score ``paths[i]`` against every prompt in ``prompts[i]``.

    :param spec: the :class:`~harness.scoring.specs.ModelSpec` the model was loaded from: it
        keys the cache by the constructor's options and lets a Ray actor build the same model
        (:func:`score_models` passes it). Without it the cache key uses ``describe()``.
    :param batch_size: images per forward pass (each with all its prompts).
    :param executor: where to run (default :class:`~harness.scoring.executors.LocalExecutor`).
    :returns: a :class:`ScoreRun`; ``scores[i]`` is None for images in ``failed``;
        ``executor_info`` holds the executor's name, options and facts of the run.
    """
    from harness.scoring.executors import LocalExecutor

    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    executor = executor if executor is not None else LocalExecutor()
    if not callable(getattr(executor, "batches", None)):
        raise HarnessError(
            f"executor {executor!r} is not an Executor (it needs batches() and describe())"
        )
    plan = ScorePlan(model, paths, prompts, cache, spec=spec)
    plan.run.executor_info = dict(executor.describe())
    if plan.todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.todo), unit="img", desc=plan.model_name, dynamic_ncols=True)
        try:
            for ids, results, bad in executor.batches(model, plan, batch_size):
                plan.accept(ids, results, bad)
                if bar is not None:
                    bar.update(len(ids) + len(bad))
        finally:
            if bar is not None:
                bar.close()
    return plan.finish()


@dataclass
class ModelScores:
    """One reward model's part of :func:`score_models`."""

    spec: ModelSpec
    label: str  #: the leaderboard's method name (``spec.label``)
    describe: dict[str, Any]  #: ``model.describe()`` after scoring (truncation counts included)
    run: ScoreRun

    def manifest(self) -> dict[str, Any]:
        """What a run manifest records about this model."""
        run = self.run
        return {**self.describe, "method": self.label, "spec": self.spec.text,
                "cache_key": run.cache_key, "computed": run.computed, "cached": run.cached,
                "encoded_images": run.encoded_images, "seconds": round(run.seconds, 3),
                "failed_images": len(run.failed), "executor": run.executor_info}


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
) -> list[ModelScores]:
    """Score ``paths[i]`` against ``prompts[i]`` with each reward model of ``specs``, in turn.

    Each model is loaded (:func:`~harness.scoring.specs.load_reward_model`), run through
    :func:`score_images` with its spec, described, and released before the next one loads.

    :param cache: ``True`` the default score cache, a path, a :class:`ScoreCache` (left open),
        or ``False``/``None`` for none.
    """
    from harness.scoring.specs import check_unique_labels, load_reward_model, parse_model_spec

    parsed = [parse_model_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise HarnessError("no reward models to score: give at least one model spec")
    check_unique_labels(parsed)
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    store = cache if isinstance(cache, ScoreCache) else open_score_cache(cache)
    out: list[ModelScores] = []
    try:
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
