"""The scoring engine: every image encoded once, scored against any number of prompts.

``score_images(model, paths, prompts)`` runs a :class:`harness.types.RewardModel` over image
files. N prompts per image cost one image encode plus N text (or head) passes. DataLoader workers
decode and preprocess; batches are pinned for fast host-to-GPU copies; a tqdm bar shows images/s.
With a :class:`~harness.score_cache.ScoreCache`, scores are looked up by (model key, image content
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
from harness.score_cache import ScoreCache
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
    """What identifies a model's numbers: id, checkpoint, revision, preprocessing, dtype, variant."""
    info = model.describe()
    keep = ("id", "checkpoint", "revision", "checkpoint_sha256", "preprocessing_version", "dtype",
            "variant")
    return json.dumps({k: info[k] for k in keep if info.get(k) is not None}, sort_keys=True)


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
    """Score a batch; on out-of-memory, split it in halves and retry (down to one image)."""
    try:
        return _embed_and_score(model, batch, prompts)
    except Exception as exc:
        n = len(prompts)
        if not _is_oom(exc) or n == 1:
            raise
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
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
) -> ScoreRun:
    """Score ``paths[i]`` against every prompt in ``prompts[i]``.

    :param batch_size: images per forward pass (each with all its prompts).
    :param num_workers: DataLoader worker processes that decode and preprocess images.
    :returns: a :class:`ScoreRun`; ``scores[i]`` is None for images in ``failed``.
    """
    import time

    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompt lists")
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    paths = [str(p) for p in paths]
    prompts = [list(p) for p in prompts]
    key = model_cache_key(model)
    model_name = getattr(model, "id", type(model).__name__)
    run = ScoreRun(scores=[None] * len(paths))

    hashes: list[str | None] = []
    for p in paths:
        try:
            hashes.append(file_sha256(p))
        except OSError as exc:
            hashes.append(None)
            run.failed[p] = f"{type(exc).__name__}: {exc.strerror or exc}"

    todo: list[int] = []
    cached = cache.get(key, [h for h in hashes if h is not None]) if cache is not None else {}
    for i, h in enumerate(hashes):
        if h is None:
            continue
        got = [cached.get((h, q)) for q in prompts[i]]
        if all(v is not None for v in got):
            run.scores[i] = np.asarray(got, dtype=np.float64)
            run.cached += len(got)
        else:
            todo.append(i)

    if todo:
        from torch.utils.data import DataLoader

        if pin_memory is None:
            pin_memory = str(getattr(model, "device", "cpu")).startswith("cuda")
        loader = DataLoader(
            _Images([paths[i] for i in todo], model.preprocess),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"{model_name}", dynamic_ncols=True)
        try:
            for local_ids, batch, bad in loader:
                for j, err in bad:
                    run.failed[paths[todo[j]]] = err
                if local_ids:
                    ids = [todo[j] for j in local_ids]
                    batch_prompts = [prompts[i] for i in ids]
                    results = _run_with_backoff(model, batch, batch_prompts)
                    rows = []
                    for i, values in zip(ids, results, strict=True):
                        if values.shape != (len(prompts[i]),):
                            raise HarnessError(
                                f"reward model '{model_name}' returned {values.shape[0]} scores for "
                                f"{len(prompts[i])} prompts of image {paths[i]}"
                            )
                        bad_at = np.flatnonzero(~np.isfinite(values))
                        if bad_at.size:
                            k = int(bad_at[0])
                            raise HarnessError(
                                f"reward model '{model_name}' returned a non-finite score "
                                f"({values[k]}) for image {paths[i]} and prompt {prompts[i][k]!r}"
                            )
                        run.scores[i] = values
                        rows.extend(zip([hashes[i]] * len(values), prompts[i], values.tolist(), strict=True))
                    if cache is not None:
                        cache.put(key, rows)
                    run.computed += len(rows)
                    run.encoded_images += len(ids)
                if bar is not None:
                    bar.update(len(local_ids) + len(bad))
        finally:
            if bar is not None:
                bar.close()
    run.seconds = time.perf_counter() - start
    return run
