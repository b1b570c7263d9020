"""TextNorm (Kim et al., ICLR 2024) and reward ensembles, as normalizers.

A normalizer turns one prompt's raw scores into one calibrated score per image. Input:
``{model_id: float [N, 1 + C]}`` for the ``N`` images of one prompt, column 0 the prompt itself
and columns ``1..C`` its contrastive prompts. Output: float64 ``[N]``.

- ``textnorm``: the model's confidence that the image matches its prompt rather than a contrastive
  one, ``exp(s r(x, y)) / sum_{y' in {y} U C(y)} exp(s r(x, y'))``, in (0, 1]. ``s`` (``scale``) is
  per model: raw rewards live on different scales (CLIP cosine ~0.2-0.4, ImageReward ~N(0, 1)).
  With ``standardize`` each model's raw scores are first mapped to ``(r - mean_m) / std_m`` using
  label-free statistics over the whole benchmark subset, so one scale suits every model.
- ``mean``: ``mean_m textnorm_m(x, y)`` over models.
- ``ur`` (uncertainty-regularised): ``mean_m textnorm_m - lambda * std_m textnorm_m`` (population
  standard deviation across models).
- ``identity``: the raw score of the image's own prompt (one model).
- ``zscore``: each model's own-prompt scores standardised over the prompt's images, averaged over
  models (an ensemble baseline without contrastive prompts).

Scales and lambda are chosen by :mod:`harness.evaluation.calibration` (cross-validation over prompts by
default, or per-prompt "oracle" tuning when asked for explicitly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.types import Normalizer


def _check(scores: Mapping[str, Any], need_contrastive: bool) -> dict[str, np.ndarray]:
    if not scores:
        raise HarnessError("a normalizer needs the scores of at least one reward model")
    out = {}
    for model, values in scores.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2:
            raise HarnessError(f"scores of '{model}' must be [images, 1 + contrastive], got {arr.shape}")
        if need_contrastive and arr.shape[1] < 2:
            raise HarnessError(
                f"TextNorm needs contrastive prompts, but the scores of '{model}' have none "
                "(a prompt set of size 0)"
            )
        out[model] = arr
    return out


def textnorm_confidence(raw: np.ndarray, scale: float) -> np.ndarray:
    """``[N, 1 + C]`` raw scores -> ``[N]`` softmax probability of column 0 at temperature 1/scale."""
    z = scale * raw
    z = z - z.max(axis=1, keepdims=True)  # stable log-sum-exp
    return np.exp(z[:, 0] - np.log(np.exp(z).sum(axis=1)))


def _per_model(value: float | Mapping[str, float], model: str, name: str) -> float:
    if isinstance(value, Mapping):
        if model not in value:
            raise HarnessError(f"no {name} given for model '{model}'")
        return float(value[model])
    return float(value)


class TextNorm(Normalizer):
    """Softmax confidence of the image's own prompt against its contrastive prompts (one model)."""

    id: ClassVar[str] = "textnorm"

    def __init__(
        self,
        scale: float | Mapping[str, float] = 1.0,
        standardize: Mapping[str, tuple[float, float]] | None = None,
    ):
        self.scale = scale
        self.standardize = dict(standardize or {})

    def calibrated(self, scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``{model: [N]}`` TextNorm confidence of every model."""
        out = {}
        for model, raw in _check(scores, need_contrastive=True).items():
            if model in self.standardize:
                mean, std = self.standardize[model]
                raw = (raw - mean) / (std if std > 0 else 1.0)
            out[model] = textnorm_confidence(raw, _per_model(self.scale, model, "scale"))
        return out

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        calibrated = self.calibrated(scores)
        if len(calibrated) != 1:
            raise HarnessError(
                f"textnorm takes one reward model, got {len(calibrated)}: use the 'mean' or 'ur' ensemble"
            )
        return next(iter(calibrated.values()))


class MeanEnsemble(TextNorm):
    """Mean over models of their TextNorm confidences."""

    id: ClassVar[str] = "mean"

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        return np.mean(np.stack(list(self.calibrated(scores).values())), axis=0)


class UREnsemble(TextNorm):
    """Mean minus ``lam`` times the standard deviation across models of TextNorm confidences."""

    id: ClassVar[str] = "ur"

    def __init__(
        self,
        scale: float | Mapping[str, float] = 1.0,
        lam: float = 0.5,
        standardize: Mapping[str, tuple[float, float]] | None = None,
    ):
        super().__init__(scale=scale, standardize=standardize)
        if lam < 0:
            raise HarnessError(f"lambda must be >= 0, got {lam}")
        self.lam = lam

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        stacked = np.stack(list(self.calibrated(scores).values()))
        return stacked.mean(axis=0) - self.lam * stacked.std(axis=0)


class Identity(Normalizer):
    """The raw score of the image's own prompt (column 0), for one model."""

    id: ClassVar[str] = "identity"

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        checked = _check(scores, need_contrastive=False)
        if len(checked) != 1:
            raise HarnessError("identity takes one reward model (raw scores of several models "
                               "are on different scales): use 'zscore' to combine them")
        return next(iter(checked.values()))[:, 0].copy()


class ZScore(Normalizer):
    """Own-prompt scores standardised over the prompt's images, averaged over models."""

    id: ClassVar[str] = "zscore"

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        out = []
        for raw in _check(scores, need_contrastive=False).values():
            own = raw[:, 0]
            std = own.std()
            out.append((own - own.mean()) / std if std > 0 else np.zeros_like(own))
        return np.mean(np.stack(out), axis=0)


@hookimpl
def register_normalizers(register):
    register(TextNorm)
    register(MeanEnsemble)
    register(UREnsemble)
    register(Identity)
    register(ZScore)
