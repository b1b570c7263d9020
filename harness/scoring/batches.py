"""The batch runner's pieces: the one image decoder, collation and the OOM backoff.

Shared by every executor (local DataLoader workers, Ray's read stage and model actors) and by the
fine-tuning reward, so images are decoded and batches scored the same way everywhere. Images reach
:meth:`~harness.types.RewardModel.preprocess` as opened (:func:`harness.images.open_image`: no
conversion, except that samples wider than 8 bits are scaled to 8), so each model converts
palette, RGBA, CMYK, ... images the way its original does. An image that cannot be decoded is
that image's failure, named by its path (:func:`decode_and_preprocess`). A GPU out-of-memory
error halves the batch and retries (:func:`run_with_backoff`). Scores come back as float64
``[P]`` per image, or ``[P, 2]`` (score, standard deviation) from a model that reports
uncertainty.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import harness.images as _images
from harness.images import open_image
from harness.types import ImageFailure, RewardModel

__all__ = ["ImageDataset", "MultiImageDataset", "collate", "collate_items", "collate_multi",
           "decode_and_preprocess", "open_image", "run_with_backoff"]

log = logging.getLogger("harness.scoring")


def decode_and_preprocess(path: str | Path, preprocess: Any) -> tuple[Any, str | None]:
    """``(preprocessed input, None)`` or ``(None, "ErrorType: message")`` for one image file."""
    try:
        return preprocess(_images.open_image(path)), None
    except Exception as exc:  # noqa: BLE001 - any decode failure names the file
        return None, f"{type(exc).__name__}: {exc}"


def decode_for_models(path: str | Path, preprocessors: Sequence[Any | None]
                      ) -> tuple[list[Any], list[str | None]]:
    """Decode one image file once and apply each model's preprocessing to it (None: that model
    does not need this image). Returns the inputs and, per model, None or ``"ErrorType: message"``
    (a decode failure is every needing model's failure; a preprocessing failure only its own)."""
    need = [k for k, pre in enumerate(preprocessors) if pre is not None]
    inputs: list[Any] = [None] * len(preprocessors)
    errors: list[str | None] = [None] * len(preprocessors)
    if not need:
        return inputs, errors
    try:
        image = _images.open_image(path)
    except Exception as exc:  # noqa: BLE001 - any decode failure names the file
        why = f"{type(exc).__name__}: {exc}"
        for k in need:
            errors[k] = why
        return inputs, errors
    for k in need:
        try:
            inputs[k] = preprocessors[k](image)
        except Exception as exc:  # noqa: BLE001
            errors[k] = f"{type(exc).__name__}: {exc}"
    return inputs, errors


class MultiImageDataset:
    """Map-style dataset for one pass of several models: index -> (index, inputs per model,
    errors per model); ``needs[k]`` is the set of indices model ``k`` must score."""

    def __init__(self, paths: Sequence[str], preprocessors: Sequence[Any],
                 needs: Sequence[set[int]]):
        self.paths = list(paths)
        self.preprocessors = list(preprocessors)
        self.needs = [set(n) for n in needs]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, list[Any], list[str | None]]:
        pres = [pre if i in need else None for pre, need in zip(self.preprocessors, self.needs,
                                                                strict=True)]
        inputs, errors = decode_for_models(self.paths[i], pres)
        return i, inputs, errors


def collate_multi(items: list[tuple[int, list[Any], list[str | None]]], models: int
                  ) -> list[tuple[list[int], Any, list[tuple[int, str]]]]:
    """Items of :class:`MultiImageDataset` -> per model ``(indices, batch, failures)`` (indices
    of the images that model needed)."""
    out = []
    for k in range(models):
        ok = [(i, xs[k]) for i, xs, errs in items if xs[k] is not None and errs[k] is None]
        bad = [(i, errs[k]) for i, _, errs in items if errs[k] is not None]
        out.append(([i for i, _ in ok], collate([x for _, x in ok]) if ok else None, bad))
    return out


class ImageDataset:
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


def collate_items(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
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


def _embed_and_score(model: RewardModel, batch: Any, prompts: list[list[str]],
                     on_features: Any = None, offset: int = 0
                     ) -> list[np.ndarray | ImageFailure]:
    features = model.embed_images(batch)
    if on_features is not None:  # a dual encoder's image embeddings, for the embedding store
        on_features(offset, features)
    return score_features(model, features, prompts)


def score_features(model: RewardModel, features: Any, prompts: list[list[str]]
                   ) -> list[np.ndarray | ImageFailure]:
    """``model.score`` on image features -> float64 ``[P]`` (or ``[P, 2]``) per image."""
    # A model that reports uncertainty gives [P, 2] (score, standard deviation): kept as is, and
    # checked by the plan; others are flattened to [P].
    keep = bool(getattr(type(model), "reports_uncertainty", False))
    return [s if isinstance(s, ImageFailure)
            else np.asarray(_to_numpy(s), dtype=np.float64) if keep
            else np.asarray(_to_numpy(s), dtype=np.float64).reshape(-1)
            for s in model.score(features, prompts)]


def run_with_backoff(model: RewardModel, batch: Any, prompts: list[list[str]],
                     on_features: Any = None, offset: int = 0
                     ) -> list[np.ndarray | ImageFailure]:
    """Score a batch; on out-of-memory, split it in halves and retry (down to one image).
    ``on_features(offset, features)``, if given, receives the image features of rows
    ``offset..offset+len(features)`` of the original batch (the embedding store's hook).

    An image the model could not score comes back as its :class:`~harness.types.ImageFailure`.

    The retry happens after the ``except`` block: inside it, the traceback would keep the failed
    forward pass's tensors alive and the smaller batches would run out of memory too.
    """
    try:
        return _embed_and_score(model, batch, prompts, on_features, offset)
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
    return (run_with_backoff(model, _slice(batch, 0, half), prompts[:half], on_features, offset)
            + run_with_backoff(model, _slice(batch, half, n), prompts[half:], on_features,
                               offset + half))
