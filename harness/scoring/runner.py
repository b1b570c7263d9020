"""The scoring engine: every image encoded once, scored against any number of prompts.

``score_images(model, paths, prompts)`` runs a :class:`harness.types.RewardModel` over image
files. N prompts per image cost one image encode plus N text (or head) passes. DataLoader workers
decode and preprocess; batches are pinned for fast host-to-GPU copies; a tqdm bar shows images/s.
With a :class:`~harness.scoring.cache.ScoreCache`, scores are looked up by (model key, image content
hash, prompt) first and written after every batch: nothing is computed twice, and a run killed
midway resumes where it stopped with the same final scores.

Failures: an unreadable or corrupt image is recorded in ``ScoreRun.failed`` (path -> reason) and
the rest are scored; a NaN or infinite score raises :class:`HarnessError` naming the model, image
and prompt (batches already scored stay in the cache); a GPU out-of-memory error halves the batch
and retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.scoring.cache import ScoreCache
from harness.types import RewardModel

log = logging.getLogger("harness.scoring")


@dataclass
class ScoreRun:
    """Result of :func:`score_images`: ``scores[i]`` is float64 ``[len(prompts[i])]`` or None."""

    scores: list[np.ndarray | None]
    failed: dict[str, str] = field(default_factory=dict)
    computed: int = 0  #: (image, prompt) pairs scored by the model in this run
    cached: int = 0  #: pairs read from the cache
    encoded_images: int = 0  #: images passed through ``embed_images``
    seconds: float = 0.0


def model_cache_key(model: RewardModel) -> str:
    """What identifies a model's numbers: everything ``describe()`` reports (id, checkpoint,
    revision or weight hash, preprocessing version, dtype, variant, text length, processor...)."""
    info = model.describe()
    # Every setting the model reports identifies its numbers, except counters of the run.
    counters = {"truncated_prompts"}
    return json.dumps({k: info[k] for k in sorted(info) if k not in counters and info[k] is not None},
                      sort_keys=True, default=str)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _Images:
    """Map-style dataset: index -> (index, preprocessed image) or (index, error message)."""

    def __init__(self, paths: Sequence[str], preprocess: Any):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                img.load()
                rgb = img.convert("RGB")
            return i, self.preprocess(rgb), None
        except Exception as exc:  # noqa: BLE001 - any decode failure names the file
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not ok:
        return [], None, bad
    inputs = [x for _, x in ok]
    first = inputs[0]
    try:
        import torch

        if isinstance(first, torch.Tensor):
            return [i for i, _ in ok], torch.stack(inputs), bad
    except ImportError:  # pragma: no cover - torch is optional for numpy-only plugins
        pass
    if isinstance(first, np.ndarray):
        return [i for i, _ in ok], np.stack(inputs), bad
    return [i for i, _ in ok], inputs, bad


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _slice(batch: Any, lo: int, hi: int) -> Any:
    return batch[lo:hi]


def _embed_and_score(model: RewardModel, batch: Any, prompts: list[list[str]]) -> list[np.ndarray]:
    features = model.embed_images(batch)
    return [np.asarray(_to_numpy(s), dtype=np.float64).reshape(-1) for s in model.score(features, prompts)]


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def _run_with_backoff(model: RewardModel, batch: Any, prompts: list[list[str]]) -> list[np.ndarray]:
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
    return _run_with_backoff(model, _slice(batch, 0, half), prompts[:half]) + _run_with_backoff(
        model, _slice(batch, half, n), prompts[half:]
    )


def score_images(
    model: RewardModel,
    paths: Sequence[str | Path],
    prompts: Sequence[Sequence[str]],
    *,
    cache: ScoreCache | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    pin_memory: bool | None = None,
    executor: str = "local",
    ray_options: Any = None,
) -> ScoreRun:
    """Score ``paths[i]`` against every prompt in ``prompts[i]``.

    :param batch_size: images per forward pass (each with all its prompts).
    :param num_workers: DataLoader worker processes that decode and preprocess images (local).
    :param executor: ``local`` (this process) or ``ray`` (see :mod:`harness.scoring.ray`;
        ``ray_options`` is a :class:`~harness.scoring.ray.RayOptions`). Both read and write the
        same cache and give the same scores.
    :returns: a :class:`ScoreRun`; ``scores[i]`` is None for images in ``failed``.
    """
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    if executor not in ("local", "ray"):
        raise HarnessError(f"unknown executor '{executor}' (local or ray)")
    plan = ScorePlan(model, paths, prompts, cache)
    if plan.todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan.todo), unit="img", desc=plan.model_name, dynamic_ncols=True)
        try:
            if executor == "ray":
                from harness.scoring.ray import ray_batches

                batches = ray_batches(model, plan, batch_size, ray_options)
            else:
                batches = _local_batches(model, plan, batch_size, num_workers, pin_memory)
            for ids, results, bad in batches:
                plan.accept(ids, results, bad)
                if bar is not None:
                    bar.update(len(ids) + len(bad))
        finally:
            if bar is not None:
                bar.close()
    return plan.finish()


class ScorePlan:
    """What a scoring run must compute, and the bookkeeping shared by every executor.

    Hashes the images, takes what the cache already has, and leaves the rest in ``todo``;
    :meth:`accept` validates a batch of results (shape, finiteness), stores it in the run and the
    cache, so executors only produce ``(indices, score arrays, failures)`` batches.
    """

    def __init__(self, model: RewardModel, paths: Sequence[str | Path],
                 prompts: Sequence[Sequence[str]], cache: ScoreCache | None):
        import time

        self.start = time.perf_counter()
        self.paths = [str(p) for p in paths]
        self.prompts = [list(p) for p in prompts]
        self.cache = cache
        self.key = model_cache_key(model)
        self.model_name = getattr(model, "id", type(model).__name__)
        self.run = ScoreRun(scores=[None] * len(self.paths))
        self.hashes: list[str | None] = []
        for p in self.paths:
            try:
                self.hashes.append(file_sha256(p))
            except OSError as exc:
                self.hashes.append(None)
                self.run.failed[p] = f"{type(exc).__name__}: {exc.strerror or exc}"
        self.todo: list[int] = []
        self._accepted: set[int] = set()
        found = cache.get(self.key, [h for h in self.hashes if h is not None]) if cache else {}
        for i, h in enumerate(self.hashes):
            if h is None:
                continue
            got = [found.get((h, q)) for q in self.prompts[i]]
            if all(v is not None for v in got):
                self.run.scores[i] = np.asarray(got, dtype=np.float64)
                self.run.cached += len(got)
            else:
                self.todo.append(i)

    def accept(self, ids: Sequence[int], results: Sequence[np.ndarray],
               bad: Sequence[tuple[int, str]] = ()) -> None:
        """Record scores of images ``ids`` (indices into the run) and failures ``(index, why)``."""
        for i, err in bad:
            if i not in self._accepted:  # a retried task may deliver an image twice
                self.run.failed[self.paths[i]] = err
        rows = []
        for i, values in zip(ids, results, strict=True):
            if i in self._accepted:
                continue  # a retried batch delivered twice: keep the first
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if values.shape != (len(self.prompts[i]),):
                raise HarnessError(
                    f"reward model '{self.model_name}' returned {values.shape[0]} scores for "
                    f"{len(self.prompts[i])} prompts of image {self.paths[i]}"
                )
            bad_at = np.flatnonzero(~np.isfinite(values))
            if bad_at.size:
                k = int(bad_at[0])
                raise HarnessError(
                    f"reward model '{self.model_name}' returned a non-finite score "
                    f"({values[k]}) for image {self.paths[i]} and prompt {self.prompts[i][k]!r}"
                )
            self.run.scores[i] = values
            self._accepted.add(i)
            self.run.failed.pop(self.paths[i], None)
            rows.extend(zip([self.hashes[i]] * len(values), self.prompts[i], values.tolist(), strict=True))
            self.run.encoded_images += 1
        if self.cache is not None and rows:
            self.cache.put(self.key, rows)
        self.run.computed += len(rows)

    def finish(self) -> ScoreRun:
        import time

        self.run.seconds = time.perf_counter() - self.start
        return self.run


def _local_batches(model: RewardModel, plan: ScorePlan, batch_size: int, num_workers: int,
                   pin_memory: bool | None):
    """The local executor: a DataLoader decodes and preprocesses; this process scores."""
    from torch.utils.data import DataLoader

    if pin_memory is None:
        pin_memory = str(getattr(model, "device", "cpu")).startswith("cuda")
    loader = DataLoader(
        _Images([plan.paths[i] for i in plan.todo], model.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for local_ids, batch, bad in loader:
        ids = [plan.todo[j] for j in local_ids]
        results = _run_with_backoff(model, batch, [plan.prompts[i] for i in ids]) if ids else []
        yield ids, results, [(plan.todo[j], err) for j, err in bad]
