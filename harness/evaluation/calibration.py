"""Choosing TextNorm's scales and the UR ensemble's lambda without peeking at test labels.

Scores are held as padded tensors over the prompts of one benchmark subset
(:class:`ContrastiveScores`): for each model ``[P, N, 1 + C]`` raw scores (prompt ``p``, image
``i``, column 0 the prompt itself, then its contrastive prompts), with masks for the images and
contrastive prompts each prompt really has.

Selection (:func:`calibrate`):

- ``cv`` (default): k-fold cross-validation over prompts. For each fold, the hyperparameters that
  maximise the mean selection metric (AUROC by default) over the *other* folds' prompts are used
  to score the fold's own prompts; every prompt is therefore scored with values chosen without its
  labels. A scale is chosen per model (each model's own TextNorm), then lambda for ``ur`` given
  those scales.
- ``oracle``: per prompt, the best grid point against that prompt's own labels, which is what the
  released per-prompt TextNorm values appear to do. Rows tuned this way are labelled "oracle".

The chosen values of every fold are returned for the run manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.evaluation.metrics import METRICS, batch_prompt_metrics

SCALES: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LAMBDAS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
METHODS = ("textnorm", "mean", "ur", "identity", "zscore")


@dataclass
class ContrastiveScores:
    """Raw scores of several models on the prompts of one subset, padded to rectangles."""

    subset: str
    prompts: list[str]
    raw: dict[str, np.ndarray]  #: model -> float64 [P, N, 1 + C]
    image_mask: np.ndarray  #: bool [P, N]
    column_mask: np.ndarray  #: bool [P, 1 + C]
    binary: np.ndarray  #: [P, N] 0/1
    graded: np.ndarray  #: float [P, N]
    images: list[list[str]] = field(default_factory=list)  #: image names per prompt

    @classmethod
    def from_long(cls, frame: pd.DataFrame, subset: str) -> ContrastiveScores:
        """From a long table with columns prompt, image, binary, graded, model, column, score."""
        prompts = list(dict.fromkeys(frame["prompt"]))
        index = {p: i for i, p in enumerate(prompts)}
        per_prompt_images: list[list[str]] = [[] for _ in prompts]
        image_pos: dict[tuple[str, str], int] = {}
        labels = frame.drop_duplicates(["prompt", "image"])
        for prompt, image in zip(labels["prompt"], labels["image"], strict=True):
            images = per_prompt_images[index[prompt]]
            image_pos[(prompt, image)] = len(images)
            images.append(image)
        P = len(prompts)
        N = max(len(x) for x in per_prompt_images)
        K = int(frame["column"].max()) + 1
        image_mask = np.zeros((P, N), dtype=bool)
        binary = np.zeros((P, N))
        graded = np.zeros((P, N))
        for prompt, image, b, g in zip(labels["prompt"], labels["image"], labels["binary"],
                                       labels["graded"], strict=True):
            p, i = index[prompt], image_pos[(prompt, image)]
            image_mask[p, i] = True
            binary[p, i] = b
            graded[p, i] = g
        column_mask = np.zeros((P, K), dtype=bool)
        raw = {}
        for model, g in frame.groupby("model", sort=False):
            arr = np.zeros((P, N, K))
            p = g["prompt"].map(index).to_numpy()
            i = np.array([image_pos[(a, b)] for a, b in zip(g["prompt"], g["image"], strict=True)])
            k = g["column"].to_numpy()
            arr[p, i, k] = g["score"].to_numpy(dtype=np.float64)
            column_mask[p, k] = True
            raw[str(model)] = arr
        return cls(subset, prompts, raw, image_mask, column_mask, binary, graded, per_prompt_images)

    @property
    def models(self) -> list[str]:
        return list(self.raw)

    def standardized(self) -> ContrastiveScores:
        """Each model's raw scores mapped to (r - mean) / std over all its valid entries (label-free)."""
        valid = self.image_mask[:, :, None] & self.column_mask[:, None, :]
        raw = {}
        for m, arr in self.raw.items():
            values = arr[valid]
            std = values.std()
            raw[m] = (arr - values.mean()) / (std if std > 0 else 1.0)
        return ContrastiveScores(self.subset, self.prompts, raw, self.image_mask, self.column_mask,
                                 self.binary, self.graded, self.images)

    def standardization(self) -> dict[str, tuple[float, float]]:
        valid = self.image_mask[:, :, None] & self.column_mask[:, None, :]
        return {m: (float(a[valid].mean()), float(a[valid].std()) or 1.0) for m, a in self.raw.items()}


def textnorm_tensor(raw: np.ndarray, column_mask: np.ndarray, scale: float) -> np.ndarray:
    """``[P, N, K]`` raw scores -> ``[P, N]`` TextNorm confidence (masked softmax, column 0)."""
    z = np.where(column_mask[:, None, :], scale * raw, -np.inf)
    zmax = z.max(axis=2, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=2)) + zmax[:, :, 0]
    return np.exp(z[:, :, 0] - lse)


def _metrics(data: ContrastiveScores, scores: np.ndarray) -> np.ndarray:
    """``[P, N]`` scores -> ``[P, 7]`` metrics (METRICS order)."""
    safe = np.where(data.image_mask, scores, 0.0)
    out = batch_prompt_metrics(safe, data.binary, data.graded, data.image_mask)
    return np.stack([out[m] for m in METRICS], axis=1)


def make_folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint folds of ``range(n)`` (a seeded permutation)."""
    if n < 2:
        raise HarnessError(f"cross-validation needs at least 2 prompts, got {n}")
    k = max(2, min(k, n))
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(perm, k)]


@dataclass
class Calibrated:
    """Per-prompt metrics of one calibrated method, and how its hyperparameters were chosen."""

    method: str
    models: list[str]
    per_prompt: pd.DataFrame  #: prompt + METRICS
    selection: str  #: "cv" | "oracle" | "fixed"
    chosen: list[dict[str, Any]]  #: per fold (cv) or per prompt (oracle)

    def summary(self) -> str:
        if self.selection == "oracle":
            return "oracle: tuned per prompt against its labels"
        if self.selection == "fixed":
            return "no hyperparameters"
        keys = sorted({k for c in self.chosen for k in c if k not in {"fold", "n_test"}})
        parts = []
        for k in keys:
            values = sorted({c[k] for c in self.chosen if k in c})
            parts.append(f"{k}={'/'.join(f'{v:g}' for v in values)}")
        return f"{len(self.chosen)}-fold cv: " + ", ".join(parts)


def _best(values: np.ndarray) -> int:
    """Index of the grid point with the best mean over training prompts (``[G, P]``); the
    first one when the metric is undefined on every training prompt."""
    with np.errstate(invalid="ignore"):
        ok = ~np.isnan(values)
        means = np.where(ok, values, 0.0).sum(1) / np.maximum(ok.sum(1), 1)
    means[ok.sum(1) == 0] = -np.inf
    return int(np.argmax(means))


def _selection_index(metric: str) -> int:
    if metric not in METRICS:
        raise HarnessError(f"unknown selection metric '{metric}'; choose one of {', '.join(METRICS)}")
    return METRICS.index(metric)


def calibrate(
    data: ContrastiveScores,
    method: str,
    models: Sequence[str],
    *,
    selection: str = "cv",
    k: int = 5,
    seed: int = 0,
    metric: str = "auroc",
    scales: Sequence[float] = SCALES,
    lambdas: Sequence[float] = LAMBDAS,
) -> Calibrated:
    """Score ``data`` with a normalizer, choosing its hyperparameters by ``selection``.

    :param method: ``textnorm`` (one model), ``mean``, ``ur``, ``identity`` (one model), ``zscore``.
    :param selection: ``cv`` (k-fold over prompts) or ``oracle`` (per prompt, against its labels).
    """
    if method not in METHODS:
        raise HarnessError(f"unknown normalizer '{method}'; choose one of {', '.join(METHODS)}")
    if selection not in ("cv", "oracle"):
        raise HarnessError(f"unknown hyperparameter selection '{selection}' (cv or oracle)")
    models = list(models)
    missing = [m for m in models if m not in data.raw]
    if missing:
        raise HarnessError(f"no scores for model(s) {', '.join(missing)}")
    if method in ("textnorm", "identity") and len(models) != 1:
        raise HarnessError(f"{method} takes one reward model, got {len(models)}")
    if method in ("textnorm", "mean", "ur") and data.column_mask.shape[1] < 2:
        raise HarnessError("TextNorm needs contrastive prompts, but no prompt has any")
    no_set = ~data.column_mask[:, 1:].any(axis=1)
    if method in ("textnorm", "mean", "ur") and no_set.any():
        bad = data.prompts[int(np.flatnonzero(no_set)[0])]
        raise HarnessError(f"prompt {bad!r} has no contrastive prompts: TextNorm is undefined for it")
    sel = _selection_index(metric)
    frame = lambda values: pd.DataFrame(values, columns=list(METRICS)).assign(prompt=data.prompts)  # noqa: E731

    if method in ("identity", "zscore"):
        own = np.stack([data.raw[m][:, :, 0] for m in models])  # [M, P, N]
        if method == "zscore":
            mask = data.image_mask[None]
            n = mask.sum(-1, keepdims=True)
            mean = np.where(mask, own, 0).sum(-1, keepdims=True) / n
            std = np.sqrt(np.where(mask, (own - mean) ** 2, 0).sum(-1, keepdims=True) / n)
            own = np.where(std > 0, (own - mean) / np.where(std > 0, std, 1), 0.0)
        values = _metrics(data, own.mean(0))
        return Calibrated(method, models, frame(values), "fixed", [])

    # Per-model TextNorm confidence and metrics for every scale: [S, P, N] and [S, P, 7].
    conf = {m: np.stack([textnorm_tensor(data.raw[m], data.column_mask, s) for s in scales]) for m in models}
    single = {m: np.stack([_metrics(data, c) for c in conf[m]]) for m in models}

    def combine(scale_idx: Mapping[str, int], lam: float) -> np.ndarray:
        stacked = np.stack([conf[m][scale_idx[m]] for m in models])
        if method == "mean":
            return stacked.mean(0)
        return stacked.mean(0) - lam * stacked.std(0)

    lam_grid = list(lambdas) if method == "ur" else [0.0]

    if selection == "oracle":
        if method == "textnorm":
            m = models[0]
            best = np.nanargmax(np.nan_to_num(single[m][:, :, sel], nan=-np.inf), axis=0)  # [P]
            values = single[m][best, np.arange(len(data.prompts))]
            chosen = [{"prompt": p, "scale": scales[b]} for p, b in zip(data.prompts, best, strict=True)]
            return Calibrated(method, models, frame(values), "oracle", chosen)
        # Ensembles: one shared scale for all models (the released rows carry one per prompt).
        grid = [(s, lam) for s in range(len(scales)) for lam in lam_grid]
        table = np.stack([_metrics(data, combine(dict.fromkeys(models, s), lam)) for s, lam in grid])
        best = np.nanargmax(np.nan_to_num(table[:, :, sel], nan=-np.inf), axis=0)
        values = table[best, np.arange(len(data.prompts))]
        chosen = []
        for p, b in zip(data.prompts, best, strict=True):
            entry = {"prompt": p, "scale": scales[grid[b][0]]}
            if method == "ur":
                entry["lambda"] = grid[b][1]
            chosen.append(entry)
        return Calibrated(method, models, frame(values), "oracle", chosen)

    folds = make_folds(len(data.prompts), k, seed)
    values = np.full((len(data.prompts), len(METRICS)), np.nan)
    chosen = []
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(data.prompts)), test)
        # Each model's scale from its own TextNorm on the training prompts only.
        scale_idx = {m: _best(single[m][:, train, sel]) for m in models}
        entry: dict[str, Any] = {"fold": f, "n_test": int(len(test))}
        if method == "textnorm":
            m = models[0]
            values[test] = single[m][scale_idx[m]][test]
            entry["scale"] = scales[scale_idx[m]]
        else:
            table = [_metrics(data, combine(scale_idx, lam)) for lam in lam_grid]
            j = _best(np.stack([t[train, sel] for t in table]))
            values[test] = table[j][test]
            for m in models:
                entry[f"scale[{m}]"] = scales[scale_idx[m]]
            if method == "ur":
                entry["lambda"] = lam_grid[j]
        chosen.append(entry)
    return Calibrated(method, models, frame(values), "cv", chosen)
