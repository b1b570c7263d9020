"""TextNorm (Kim et al., ICLR 2024) and reward ensembles, as normalizers.

A normalizer turns one prompt's raw scores into one calibrated score per image. Input:
``{model: float [N, 1 + C]}`` for the ``N`` images of one prompt, column 0 the prompt itself
and columns ``1..C`` its contrastive prompts. Output: float64 ``[N]``.

- ``textnorm``: the model's confidence that the image matches its prompt rather than a contrastive
  one, ``exp(s r(x, y)) / sum_{y' in {y} U C(y)} exp(s r(x, y'))``, in (0, 1]. ``s`` (``scale``) is
  per model: raw rewards live on different scales (CLIP cosine ~0.2-0.4, ImageReward ~N(0, 1)).
- ``mean``: ``mean_m textnorm_m(x, y)`` over models.
- ``ur`` (uncertainty-regularised): ``mean_m textnorm_m - lam * std_m textnorm_m`` (population
  standard deviation across models).
- ``ur_self`` (UR with each model's own uncertainty): for reward models that predict a standard
  deviation beside each score (HPSv3), ``mean_m c_m - lam * mean_m u_m`` where ``c_m`` is model
  ``m``'s TextNorm confidence and ``u_m`` the standard deviation of ``c_m`` that the model's own
  score deviations imply (:func:`confidence_std`, the delta method). One model is enough; a model
  that reports no uncertainty contributes ``u_m = 0`` (the leaderboard notes it).
- ``identity``: the raw score of the image's own prompt (one model).
- ``zscore``: each model's own-prompt scores standardised over the prompt's images, averaged over
  models (an ensemble baseline without contrastive prompts).

Each normalizer's math exists once, in its vectorised :meth:`batched` form over ``P`` prompts
(``[P, N, K]`` with a column mask); ``__call__`` on one prompt is the ``P = 1`` case. The
hyperparameters (``scale`` per model, ``lam``) and their grids are declared on the classes; the
leaderboard chooses them by cross-validation over prompts (:mod:`harness.evaluation.calibration`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.types import Hyperparameter, Normalizer

SCALES: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
LAMBDAS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def _one_prompt(scores: Mapping[str, Any], need_contrastive: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{model: [N, 1 + C]}`` -> ``{model: [1, N, 1 + C]}`` and an all-true ``[1, 1 + C]`` mask."""
    if not scores:
        raise HarnessError("a normalizer needs the scores of at least one reward model")
    out, width = {}, None
    for model, values in scores.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2:
            raise HarnessError(f"scores of '{model}' must be [images, 1 + contrastive], got {arr.shape}")
        if need_contrastive and arr.shape[1] < 2:
            raise HarnessError(
                f"TextNorm needs contrastive prompts, but the scores of '{model}' have none "
                "(a prompt set of size 0)"
            )
        if width is not None and arr.shape != next(iter(out.values())).shape[1:]:
            raise HarnessError("every model's scores must have the same shape for one prompt")
        width = arr.shape[1]
        out[str(model)] = arr[None]
    return out, np.ones((1, width), dtype=bool)


def stacked_shape(scores: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(P, N)`` of ``{model: [P, N, K]}``."""
    return next(iter(scores.values())).shape[:2]


def textnorm_confidence(raw: np.ndarray, column_mask: np.ndarray, scale: float) -> np.ndarray:
    """``[P, N, K]`` raw scores -> ``[P, N]`` softmax probability of column 0 at temperature
    ``1 / scale``, over the columns ``column_mask [P, K]`` marks.

    Computed as ``exp(z_0 - z_max) / sum_k exp(z_k - z_max)`` (stable, and exact where it can
    be: a reward that gives every column the same score gets exactly ``1 / K``, for every scale).
    """
    z = np.where(column_mask[:, None, :], scale * raw, -np.inf)
    e = np.exp(z - z.max(axis=2, keepdims=True))
    return e[:, :, 0] / e.sum(axis=2)


class _Vectorised(Normalizer):
    """A built-in whose math is :meth:`compute` over ``[P, N, K]``: the batched fast path is
    that, and ``__call__`` on one prompt is its ``P = 1`` case."""

    def compute(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batched(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray:
        return self.compute(scores, column_mask, image_mask)


class _Calibrated(_Vectorised):
    """Shared by TextNorm and its ensembles: each model's TextNorm confidence, then a reduction."""

    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("scale", SCALES, per_model=True, default=1.0),
    )
    needs_contrastive: ClassVar[bool] = True

    def confidences(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray) -> np.ndarray:
        """``{model: [P, N, K]}`` -> ``[M, P, N]`` TextNorm confidences."""
        if column_mask.shape[1] < 2 or not column_mask[:, 1:].any(axis=1).all():
            raise HarnessError("TextNorm needs contrastive prompts, but a prompt has none")
        return np.stack([textnorm_confidence(np.asarray(raw, dtype=np.float64), column_mask,
                                             self.value("scale", m)) for m, raw in scores.items()])

    def reduce(self, confidences: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def compute(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray:
        return self.reduce(self.confidences(scores, column_mask))

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        stacked, mask = _one_prompt(scores, need_contrastive=True)
        return self.compute(stacked, mask, np.ones(stacked_shape(stacked), dtype=bool))[0]


class TextNorm(_Calibrated):
    """Softmax confidence of the image's own prompt against its contrastive prompts (one model)."""

    id: ClassVar[str] = "textnorm"
    outputs_probability: ClassVar[bool] = True
    max_models: ClassVar[int | None] = 1

    def reduce(self, confidences: np.ndarray) -> np.ndarray:
        if len(confidences) != 1:
            raise HarnessError(
                f"textnorm takes one reward model, got {len(confidences)}: use the 'mean' or 'ur' ensemble"
            )
        return confidences[0]


class MeanEnsemble(_Calibrated):
    """Mean over models of their TextNorm confidences."""

    id: ClassVar[str] = "mean"
    outputs_probability: ClassVar[bool] = True
    min_models: ClassVar[int] = 2

    def reduce(self, confidences: np.ndarray) -> np.ndarray:
        return confidences.mean(axis=0)


class _Penalised(_Calibrated):
    """TextNorm confidences less ``lam`` (>= 0) times a spread: UR and ur_self."""

    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = (
        *_Calibrated.hyperparameters,
        Hyperparameter("lam", LAMBDAS, default=0.5, simplest=0.0),
    )

    def __init__(self, **values: Any):
        super().__init__(**values)
        if self.value("lam") < 0:
            raise HarnessError(f"lambda must be >= 0, got {self.value('lam')}")


class UREnsemble(_Penalised):
    """Mean minus ``lam`` times the standard deviation across models of TextNorm confidences."""

    id: ClassVar[str] = "ur"
    min_models: ClassVar[int] = 2

    def reduce(self, confidences: np.ndarray) -> np.ndarray:
        return confidences.mean(axis=0) - self.value("lam") * confidences.std(axis=0)


def confidence_std(raw: np.ndarray, sigma: np.ndarray, column_mask: np.ndarray,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """TextNorm confidence and its standard deviation implied by the scores' own deviations.

    ``raw``, ``sigma``: ``[P, N, K]`` scores and the standard deviations the reward model predicts
    for them (NaN read as 0); ``column_mask`` ``[P, K]``. Returns ``(c, u)``, each ``[P, N]``:
    ``c`` = :func:`textnorm_confidence`, and by the delta method (first order in the
    deviations) through the softmax's Jacobian, ``dc/dr_0 = s c (1 - c)`` and
    ``dc/dr_k = -s c p_k`` (``p_k``: the softmax weight of contrastive column ``k``)::

        u = s c sqrt((1 - c)^2 sigma_0^2 + sum_k p_k^2 sigma_k^2)

    treating the columns' errors as independent (the model gives no covariance; errors shared by
    every column of an image cancel in the softmax, so this is an upper estimate for them).
    Capped at 1/2, the largest standard deviation a quantity in [0, 1] can have, where the first
    order breaks down (``s * sigma`` of order 1 or more).
    """
    z = np.where(column_mask[:, None, :], scale * raw, -np.inf)
    e = np.exp(z - z.max(axis=2, keepdims=True))
    weights = e / e.sum(axis=2, keepdims=True)  # 0 in columns a prompt does not have
    c = weights[:, :, 0]
    sig = np.where(column_mask[:, None, :], np.nan_to_num(np.asarray(sigma, dtype=np.float64)), 0.0)
    var = (1.0 - c) ** 2 * sig[:, :, 0] ** 2 + (weights[:, :, 1:] ** 2 * sig[:, :, 1:] ** 2).sum(axis=2)
    return c, np.minimum(abs(scale) * c * np.sqrt(var), 0.5)


class URSelf(_Penalised):
    """UR with each model's own uncertainty: ``mean_m c_m - lam * mean_m u_m``.

    ``c_m``: model ``m``'s TextNorm confidence; ``u_m``: its standard deviation implied by the
    standard deviations the model predicts for its scores (:func:`confidence_std`); 0 for a model
    that reports none. Works on one model (a normalizer) or several (an ensemble).
    """

    id: ClassVar[str] = "ur_self"
    uses_uncertainty: ClassVar[bool] = True

    def compute(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray, uncertainty: Mapping[str, np.ndarray] | None = None
                ) -> np.ndarray:
        if column_mask.shape[1] < 2 or not column_mask[:, 1:].any(axis=1).all():
            raise HarnessError("TextNorm needs contrastive prompts, but a prompt has none")
        uncertainty = uncertainty or {}
        confidences, spreads = [], []
        for m, raw in scores.items():
            raw = np.asarray(raw, dtype=np.float64)
            sigma = uncertainty.get(m)
            sigma = np.zeros_like(raw) if sigma is None else np.asarray(sigma, dtype=np.float64)
            c, u = confidence_std(raw, sigma, column_mask, self.value("scale", m))
            confidences.append(c)
            spreads.append(u)
        return np.mean(confidences, axis=0) - self.value("lam") * np.mean(spreads, axis=0)

    def batched(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray, uncertainty: Mapping[str, np.ndarray] | None = None
                ) -> np.ndarray:
        return self.compute(scores, column_mask, image_mask, uncertainty)

    def __call__(self, scores: Mapping[str, Any],
                 uncertainty: Mapping[str, Any] | None = None) -> np.ndarray:
        stacked, mask = _one_prompt(scores, need_contrastive=True)
        spread = None
        if uncertainty is not None:
            spread = {}
            for m, values in uncertainty.items():
                arr = np.asarray(values, dtype=np.float64)
                if str(m) in stacked and arr.shape != stacked[str(m)].shape[1:]:
                    raise HarnessError(f"uncertainty of '{m}' has shape {arr.shape}, its scores "
                                       f"{stacked[str(m)].shape[1:]}")
                spread[str(m)] = arr[None]
        return self.compute(stacked, mask, np.ones(stacked_shape(stacked), dtype=bool), spread)[0]


class Identity(_Vectorised):
    """The raw score of the image's own prompt (column 0), for one model."""

    id: ClassVar[str] = "identity"
    max_models: ClassVar[int | None] = 1

    def compute(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray:
        if len(scores) != 1:
            raise HarnessError("identity takes one reward model (raw scores of several models "
                               "are on different scales): use 'zscore' to combine them")
        return np.asarray(next(iter(scores.values())), dtype=np.float64)[:, :, 0].copy()

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        stacked, mask = _one_prompt(scores, need_contrastive=False)
        return self.compute(stacked, mask, np.ones(stacked_shape(stacked), dtype=bool))[0]


class ZScore(_Vectorised):
    """Own-prompt scores standardised over the prompt's images, averaged over models.

    Needs the images of one prompt together (``min_images = 2``): on one image it is 0.
    """

    id: ClassVar[str] = "zscore"
    min_images: ClassVar[int] = 2

    @staticmethod
    def standardize(own: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
        """``[P, N]`` scores -> per-prompt z-scores over the images ``image_mask`` marks."""
        n = image_mask.sum(-1, keepdims=True)
        mean = np.where(image_mask, own, 0).sum(-1, keepdims=True) / np.maximum(n, 1)
        std = np.sqrt(np.where(image_mask, (own - mean) ** 2, 0).sum(-1, keepdims=True) / np.maximum(n, 1))
        return np.where(std > 0, (own - mean) / np.where(std > 0, std, 1), 0.0)

    def compute(self, scores: Mapping[str, np.ndarray], column_mask: np.ndarray,
                image_mask: np.ndarray) -> np.ndarray:
        own = [np.asarray(raw, dtype=np.float64)[:, :, 0] for raw in scores.values()]
        return np.mean(np.stack([self.standardize(o, image_mask) for o in own]), axis=0)

    def __call__(self, scores: Mapping[str, Any]) -> np.ndarray:
        stacked, mask = _one_prompt(scores, need_contrastive=False)
        return self.compute(stacked, mask, np.ones(stacked_shape(stacked), dtype=bool))[0]


@hookimpl
def register_normalizers(register):
    register(TextNorm)
    register(MeanEnsemble)
    register(UREnsemble)
    register(URSelf)
    register(Identity)
    register(ZScore)
