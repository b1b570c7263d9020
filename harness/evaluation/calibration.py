"""Calibration over any normalizer: its declared hyperparameters chosen without test labels.

Works for every registered :class:`~harness.types.Normalizer` through its contract alone: the
hyperparameters and grids it declares (TextNorm's per-model ``scale``, the UR ensemble's ``lam``;
none for ``identity`` and ``zscore``), and its ``batched`` fast path or, without one, its
per-prompt ``__call__``.

Scores are held as padded tensors over the prompts of one benchmark subset
(:class:`ContrastiveScores`): for each model ``[P, N, 1 + C]`` raw scores (prompt ``p``, image
``i``, column 0 the prompt itself, then its contrastive prompts), with masks for the images and
contrastive prompts each prompt really has, and for models that report uncertainty the standard
deviations they predict for those scores, in the same layout (handed to normalizers that declare
``uses_uncertainty``).

Selection (:func:`calibrate`):

- ``cv`` (default): k-fold cross-validation over prompts. For each fold, the hyperparameters that
  maximise the mean selection metric (AUROC by default) over the *other* folds' prompts are used
  to score the fold's own prompts; every prompt is therefore scored with values chosen without its
  labels. Per-model hyperparameters are chosen per model (each model alone: its own TextNorm
  scale), then the shared ones (``lam`` for ``ur``) given those.
Ties: grid points whose mean metric is equal within rounding are tied, and the simplest of them
wins (each hyperparameter declares its ``simplest`` value: 1 for TextNorm's scale, 0 for
``lam``), so rounding noise never picks a value.

- ``oracle``: per prompt, the best grid point against that prompt's own labels, which is what the
  released per-prompt TextNorm values appear to do. Rows tuned this way are labelled "oracle".

The chosen values of every fold are returned for the run manifest.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.evaluation.metrics import METRICS, batch_prompt_metrics
from harness.types import Hyperparameter, Normalizer


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
    #: model -> float64 [P, N, 1 + C] predicted standard deviations of ``raw``, for the models
    #: that report uncertainty (others are absent)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_long(cls, frame: pd.DataFrame, subset: str) -> ContrastiveScores:
        """From a long table with columns prompt, image, binary, graded, model, column, score
        (and ``uncertainty``, NaN for models without, when some model reports it)."""
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
        raw, spread = {}, {}
        for model, g in frame.groupby("model", sort=False):
            arr = np.zeros((P, N, K))
            p = np.array([index[x] for x in g["prompt"]], dtype=np.int64)  # categorical-safe
            i = np.array([image_pos[(a, b)] for a, b in zip(g["prompt"], g["image"], strict=True)])
            k = g["column"].to_numpy()
            arr[p, i, k] = g["score"].to_numpy(dtype=np.float64)
            column_mask[p, k] = True
            raw[str(model)] = arr
            if "uncertainty" in g and g["uncertainty"].notna().any():
                std = np.zeros((P, N, K))
                std[p, i, k] = g["uncertainty"].to_numpy(dtype=np.float64)
                spread[str(model)] = std
        return cls(subset, prompts, raw, image_mask, column_mask, binary, graded, per_prompt_images,
                   spread)

    @property
    def models(self) -> list[str]:
        return list(self.raw)

    def standardized(self) -> ContrastiveScores:
        """Each model's raw scores mapped to (r - mean) / std over all its valid entries (label-free)."""
        valid = self.image_mask[:, :, None] & self.column_mask[:, None, :]
        raw, spread = {}, {}
        for m, arr in self.raw.items():
            values = arr[valid]
            std = values.std()
            raw[m] = (arr - values.mean()) / (std if std > 0 else 1.0)
            if m in self.uncertainty:  # a standard deviation scales with the scores
                spread[m] = self.uncertainty[m] / (std if std > 0 else 1.0)
        return ContrastiveScores(self.subset, self.prompts, raw, self.image_mask, self.column_mask,
                                 self.binary, self.graded, self.images, spread)

    def uncertainty_of(self, models: Sequence[str]) -> dict[str, np.ndarray]:
        """``{model: [P, N, K]}`` predicted standard deviations, NaN for a model without."""
        return {m: self.uncertainty.get(m, np.full(self.raw[m].shape, np.nan)) for m in models}

    def standardization(self) -> dict[str, tuple[float, float]]:
        valid = self.image_mask[:, :, None] & self.column_mask[:, None, :]
        return {m: (float(a[valid].mean()), float(a[valid].std()) or 1.0) for m, a in self.raw.items()}


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
    #: float64 [P, N]: each image's normalized score under the values chosen for its prompt
    #: (its fold's for cv); padding 0
    scores: np.ndarray | None = None

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


#: grid points whose mean selection metric is within this of the best are tied
SELECTION_TOL = 1e-9


def _simplest_first(grid: Sequence[Mapping[str, float]], hypers: Sequence[Hyperparameter]) -> list[int]:
    """Grid indices from the simplest point to the most complex (declaration order decides)."""
    by_name = {h.name: h for h in hypers}
    return sorted(range(len(grid)), key=lambda i: tuple(
        by_name[k].complexity(v) for k, v in grid[i].items()))


def _best(values: np.ndarray, preference: Sequence[int]) -> int:
    """Index of the grid point with the best mean over training prompts (``[G, P]``).

    Means within :data:`SELECTION_TOL` of the best are ties, won by the earliest grid point in
    ``preference`` (simplest first); the simplest point when the metric is undefined on every
    training prompt.
    """
    with np.errstate(invalid="ignore"):
        ok = ~np.isnan(values)
        means = np.where(ok, values, 0.0).sum(1) / np.maximum(ok.sum(1), 1)
    means[ok.sum(1) == 0] = -np.inf
    top = means.max()
    if not np.isfinite(top):
        return int(preference[0])
    return next(int(i) for i in preference if means[i] >= top - SELECTION_TOL)


def _selection_index(metric: str) -> int:
    if metric not in METRICS:
        raise HarnessError(f"unknown selection metric '{metric}'; choose one of {', '.join(METRICS)}")
    return METRICS.index(metric)


def normalize(normalizer: Normalizer, data: ContrastiveScores, models: Sequence[str]) -> np.ndarray:
    """Apply ``normalizer`` to every prompt of ``data`` -> float64 ``[P, N]`` (padding: 0).

    Uses the normalizer's :meth:`~harness.types.Normalizer.batched` fast path when it has one,
    else calls it once per prompt with that prompt's real images and columns, as the contract
    says. A normalizer that declares ``uses_uncertainty`` also gets
    ``uncertainty={model: ...}`` in the same layout (NaN for models that report none). A wrong
    shape or a non-finite value is an error naming the normalizer.
    """
    scores = {m: data.raw[m] for m in models}
    P, N = data.image_mask.shape
    extra: dict[str, Any] = {}
    spread = data.uncertainty_of(models) if getattr(normalizer, "uses_uncertainty", False) else None
    if spread is not None:
        extra["uncertainty"] = spread
    out = normalizer.batched(scores, data.column_mask, data.image_mask, **extra)
    if out is None:
        out = np.zeros((P, N))
        for p in range(P):
            rows, cols = data.image_mask[p], data.column_mask[p]
            if spread is not None:
                extra = {"uncertainty": {m: u[p][rows][:, cols] for m, u in spread.items()}}
            value = np.asarray(normalizer({m: s[p][rows][:, cols] for m, s in scores.items()},
                                          **extra), dtype=np.float64)
            if value.shape != (int(rows.sum()),):
                raise HarnessError(
                    f"normalizer '{normalizer.id}' returned shape {value.shape} for "
                    f"{int(rows.sum())} images of prompt {data.prompts[p]!r}; expected [N]"
                )
            out[p, rows] = value
    out = np.asarray(out, dtype=np.float64)
    if out.shape != (P, N):
        raise HarnessError(f"normalizer '{normalizer.id}' returned shape {out.shape} from its "
                           f"batched path; expected {(P, N)}")
    bad = data.image_mask & ~np.isfinite(out)
    if bad.any():
        p, i = (int(x[0]) for x in np.nonzero(bad))
        raise HarnessError(
            f"normalizer '{normalizer.id}' gave a non-finite value ({out[p, i]}) for image "
            f"{data.images[p][i] if data.images else i} of prompt {data.prompts[p]!r}"
        )
    return np.where(data.image_mask, out, 0.0)


def model_count(normalizer: type[Normalizer]) -> str:
    """"one reward model", "at least 2 reward models", "2 to 4 reward models"."""
    lo, hi = normalizer.min_models, normalizer.max_models
    if hi == lo:
        return "one reward model" if lo == 1 else f"{lo} reward models"
    if hi is None:
        return f"at least {lo} reward models"
    return f"{lo} to {hi} reward models"


def _grid(hypers: Sequence[Hyperparameter]) -> list[dict[str, float]]:
    """The Cartesian product of the grids, in declaration order (the first varies slowest)."""
    return [dict(zip([h.name for h in hypers], values, strict=True))
            for values in itertools.product(*(h.grid for h in hypers))]


def calibrate(
    data: ContrastiveScores,
    normalizer: type[Normalizer] | str,
    models: Sequence[str],
    *,
    selection: str = "cv",
    k: int = 5,
    seed: int = 0,
    metric: str = "auroc",
) -> Calibrated:
    """Score ``data`` with a normalizer, choosing its declared hyperparameters by ``selection``.

    - No hyperparameters: applied as is (``fixed``).
    - ``cv``: per fold, each per-model hyperparameter is chosen for each model on the training
      prompts by running the normalizer on that model alone; then the shared ones, with those
      fixed; the fold's own prompts are scored with the chosen values.
    - ``oracle``: per prompt, the grid point (per-model values tied across models) that is best
      against that prompt's own labels.

    :param normalizer: a :class:`~harness.types.Normalizer` class, or a registered id.
    :param selection: ``cv`` (k-fold over prompts) or ``oracle`` (per prompt, against its labels).
    """
    if selection not in ("cv", "oracle"):
        raise HarnessError(f"unknown hyperparameter selection '{selection}' (cv or oracle)")
    if isinstance(normalizer, str):
        from harness.plugins import get_plugins

        normalizer = get_plugins().normalizers.get(normalizer)
    models = list(models)
    if len(models) < normalizer.min_models or (
            normalizer.max_models is not None and len(models) > normalizer.max_models):
        raise HarnessError(f"{normalizer.id} takes {model_count(normalizer)}, got {len(models)}")
    missing = [m for m in models if m not in data.raw]
    if missing:
        raise HarnessError(f"no scores for model(s) {', '.join(missing)}")
    name = normalizer.id
    if normalizer.needs_contrastive:
        if data.column_mask.shape[1] < 2:
            raise HarnessError(f"{name} needs contrastive prompts, but no prompt has any")
        no_set = ~data.column_mask[:, 1:].any(axis=1)
        if no_set.any():
            bad = data.prompts[int(np.flatnonzero(no_set)[0])]
            raise HarnessError(f"prompt {bad!r} has no contrastive prompts: {name} is undefined for it")
    sel = _selection_index(metric)
    frame = lambda values: pd.DataFrame(values, columns=list(METRICS)).assign(prompt=data.prompts)  # noqa: E731
    hypers = normalizer.hyperparameters

    def normalized(values: Mapping[str, Any], on: Sequence[str]) -> np.ndarray:
        return normalize(normalizer(**values), data, on)

    def evaluate(values: Mapping[str, Any], on: Sequence[str]) -> np.ndarray:
        return _metrics(data, normalized(values, on))

    if not hypers:
        fixed_scores = normalized({}, models)
        return Calibrated(name, models, frame(_metrics(data, fixed_scores)), "fixed", [], fixed_scores)

    if selection == "oracle":
        grid = _grid(hypers)
        table = np.stack([evaluate(point, models) for point in grid])  # [G, P, 7]
        order = _simplest_first(grid, hypers)
        best = np.array([_best(table[:, [p], sel], order) for p in range(len(data.prompts))])
        values = table[best, np.arange(len(data.prompts))]
        chosen = [{"prompt": p, **grid[b]} for p, b in zip(data.prompts, best, strict=True)]
        per_image = np.zeros(data.image_mask.shape)
        for b in np.unique(best):
            rows = best == b
            per_image[rows] = normalized(grid[int(b)], models)[rows]
        return Calibrated(name, models, frame(values), "oracle", chosen, per_image)

    per_model = [h for h in hypers if h.per_model]
    shared = [h for h in hypers if not h.per_model]
    shared_defaults = {h.name: h.default_value for h in shared}
    model_grid = _grid(per_model)
    model_order = _simplest_first(model_grid, per_model)
    # Each model alone, at every per-model grid point: [G, P, 7] per model.
    alone = {m: np.stack([evaluate({**point, **shared_defaults}, [m]) for point in model_grid])
             for m in models} if per_model else {}
    folds = make_folds(len(data.prompts), k, seed)
    values = np.full((len(data.prompts), len(METRICS)), np.nan)
    per_image = np.zeros(data.image_mask.shape)
    chosen = []
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(data.prompts)), test)
        picked = {m: model_grid[_best(alone[m][:, train, sel], model_order)] for m in alone}
        fixed = {h.name: {m: picked[m][h.name] for m in models} for h in per_model}
        entry: dict[str, Any] = {"fold": f, "n_test": int(len(test))}
        for h in per_model:
            if len(models) == 1:
                entry[h.name] = picked[models[0]][h.name]
            else:
                entry.update({f"{h.name}[{m}]": picked[m][h.name] for m in models})
        if shared:
            points = _grid(shared)
            table = [evaluate({**fixed, **point}, models) for point in points]
            j = _best(np.stack([t[train, sel] for t in table]), _simplest_first(points, shared))
            values[test] = table[j][test]
            entry.update(points[j])
            used = {**fixed, **points[j]}
        elif len(models) == 1 and per_model:
            values[test] = alone[models[0]][model_grid.index(picked[models[0]])][test]
            used = {**picked[models[0]], **shared_defaults}
        else:
            values[test] = evaluate(fixed, models)[test]
            used = fixed
        per_image[test] = normalized(used, models)[test]
        chosen.append(entry)
    return Calibrated(name, models, frame(values), "cv", chosen, per_image)
