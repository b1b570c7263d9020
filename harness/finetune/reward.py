"""The fine-tuning reward: reward model(s), a Normalizer and contrastive prompts, through contracts.

``RewardFunction(specs, normalizer=..., normalizer_options=..., contrastive=...)`` is a callable
``(images, prompts) -> float64 [B]``:

- without a normalizer, the raw score of one reward model for each image's own prompt;
- with one, every image is also scored against its prompt's contrastive prompts, the images are
  grouped by prompt, and the normalizer is called once per prompt with
  ``{label: float64 [n_p, 1 + C]}`` (the contract's "N images of one prompt"; ``label`` is each
  spec's :attr:`~harness.scoring.specs.ModelSpec.label`), the results going back in input order.

A reward model that reports uncertainty (``reports_uncertainty``: a score and its standard
deviation per prompt) gives its score, the predicted mean, as the reward; its standard deviations
go only to a normalizer that declares ``uses_uncertainty`` (as ``uncertainty={label: [n_p, 1 + C]}``,
NaN for models that report none), e.g. ``ur_self``, which penalises uncertain images.

Everything that would make the reward meaningless is refused at construction, before training
starts: an unknown normalizer or hyperparameter, a normalizer that needs several images of a
prompt (``min_images > 1``: a per-prompt z-score of one image is 0), a number of reward models
outside the normalizer's ``[min_models, max_models]``, several reward models without a normalizer
to combine them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.errors import HarnessError
from harness.types import FineTuneSettings, Normalizer


def _specs(reward: str | Sequence[str]) -> list[Any]:
    from harness.scoring.specs import check_unique_labels, parse_model_spec

    texts = [reward] if isinstance(reward, str) else list(reward)
    if not texts:
        raise HarnessError("config 'reward' is empty: give a reward-model spec or a list of them")
    specs = [parse_model_spec(str(t)) for t in texts]
    check_unique_labels(specs)
    return specs


def reward_name(specs: str | Sequence[str], normalizer: str | None = None) -> str:
    """``pickscore``, ``textnorm(clip:checkpoint=/m)``, ``mean(a, b)``: the reward's name in logs."""
    texts = [specs] if isinstance(specs, str) else list(specs)
    inner = ", ".join(str(t) for t in texts)
    return inner if normalizer is None else f"{normalizer}({inner})"


def make_normalizer(name: str, n_models: int, options: Mapping[str, Any] | None = None) -> Normalizer:
    """The normalizer ``name`` for fine-tuning ``n_models`` reward models, or a one-line refusal."""
    from harness.plugins import get_plugins

    cls = get_plugins().normalizers.get(name)
    if cls.min_images > 1:
        raise HarnessError(
            f"normalizer '{name}' needs {cls.min_images} or more images of a prompt to mean "
            "anything, but a fine-tuning reward scores each image on its own: use one that works "
            "per image (e.g. textnorm, mean, ur)"
        )
    high = cls.max_models
    if n_models < cls.min_models or (high is not None and n_models > high):
        wanted = (f"exactly {cls.min_models}" if high == cls.min_models
                  else f"{cls.min_models} to {high}" if high is not None
                  else f"at least {cls.min_models}")
        raise HarnessError(
            f"normalizer '{name}' combines {wanted} reward models, but config 'reward' gives "
            f"{n_models}: list {'more' if n_models < cls.min_models else 'fewer'} reward specs "
            "or choose another normalizer"
        )
    return cls(**dict(options or {}))


def normalizer_options(settings: FineTuneSettings) -> dict[str, Any]:
    """``normalizer_options`` with the ``normalizer_scale`` shorthand folded in (checked)."""
    options = dict(settings.normalizer_options or {})
    scale = settings.normalizer_scale
    if scale is None:
        return options
    if settings.normalizer is None:
        raise HarnessError("config 'normalizer_scale' is set but no 'normalizer': set "
                           "normalizer (e.g. textnorm) or remove normalizer_scale")
    from harness.plugins import get_plugins

    cls = get_plugins().normalizers.get(settings.normalizer)
    if "scale" not in {h.name for h in cls.hyperparameters}:
        raise HarnessError(f"config 'normalizer_scale': normalizer '{settings.normalizer}' has no "
                           "'scale' hyperparameter; remove normalizer_scale")
    if "scale" in options and options["scale"] != scale:
        raise HarnessError("config sets the scale twice ('normalizer_scale' and "
                           "'normalizer_options: {scale: ...}'): keep one")
    options["scale"] = scale
    return options


def check_reward_settings(settings: FineTuneSettings) -> None:
    """Every refusal :class:`RewardFunction` would make, without loading any model."""
    specs = _specs(settings.reward)
    if settings.normalizer is None:
        if len(specs) > 1:
            raise HarnessError(f"config 'reward' lists {len(specs)} reward models but no "
                               "'normalizer' combines them: set normalizer (e.g. mean or ur)")
        return
    make_normalizer(settings.normalizer, len(specs), normalizer_options(settings))


def reward_from_settings(settings: FineTuneSettings, device: str | None = None) -> RewardFunction:
    """The reward a fine-tuner's config asks for (``reward``, ``normalizer``, ...)."""
    check_reward_settings(settings)  # refusals that name the config keys
    return RewardFunction(
        settings.reward, normalizer=settings.normalizer,
        normalizer_options=normalizer_options(settings),
        contrastive=settings.contrastive_prompts, prompts=settings.training_prompts(),
        device=device or settings.device,
    )


class RewardFunction:
    """``reward(images, prompts) -> float64 [B]`` from one reward-model spec or a list of them.

    :param reward: a spec (``pickscore``, ``clip:checkpoint=/m``) or a list of specs (an
        ensemble: each model is keyed by its label, ``label=`` in the spec to rename it).
    :param normalizer: a registered normalizer id, or None for the raw score of one model.
    :param normalizer_options: the normalizer's hyperparameters (its constructor checks them).
    :param contrastive: where contrastive prompts come from: a prompt-set generator id (with
        ``:key=value`` options), a JSON file ``{prompt: [contrastive prompts]}`` or such a dict.
        None: no contrastive prompts (refused when the normalizer needs them).
    :param prompts: training prompts whose contrastive prompts are fetched now (others are
        fetched when first seen).
    """

    def __init__(self, reward: str | Sequence[str], normalizer: str | None = None,
                 normalizer_options: Mapping[str, Any] | None = None,
                 contrastive: str | Mapping[str, Sequence[str]] | None = "rules",
                 device: str | None = None, prompts: Sequence[str] = ()):
        from harness.scoring.specs import load_reward_model

        specs = _specs(reward)
        self.name = reward_name(reward, normalizer)
        self.normalizer: Normalizer | None = None
        if normalizer is None:
            if len(specs) > 1:
                raise HarnessError(f"{len(specs)} reward models but no normalizer combines them: "
                                   "set normalizer (e.g. mean or ur)")
        else:
            self.normalizer = make_normalizer(normalizer, len(specs), normalizer_options)
        self.contrastive = contrastive
        self.uses_contrastive = self.normalizer is not None and contrastive is not None
        if self.normalizer is not None and self.normalizer.needs_contrastive and contrastive is None:
            raise HarnessError(f"normalizer '{normalizer}' needs contrastive prompts: set "
                               "contrastive_prompts (a generator id such as rules, or a JSON file)")
        self.sets: dict[str, list[str]] = {}
        if self.uses_contrastive:
            self._add_sets(prompts)  # before loading models: a bad source fails fast
        self.models = {spec.label: load_reward_model(spec, device=device) for spec in specs}

    def _add_sets(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.sets]
        if not missing:
            return
        source = self.contrastive
        if isinstance(source, Mapping):
            found = {p: list(source.get(p, [])) for p in missing}
        elif str(source).endswith(".json"):
            from harness.evaluation.contrastive import read_sets

            data = read_sets(str(source))
            found = {p: list(data.get(p, [])) for p in missing}
        else:
            from harness.evaluation.contrastive import generate
            from harness.scoring.specs import parse_model_spec

            spec = parse_model_spec(str(source))  # id or id:key=value,... (declared settings only)
            found = generate(spec.name, missing, spec.options)
        empty = [p for p, v in found.items() if not v]
        if empty:
            raise HarnessError(f"no contrastive prompts for training prompt {empty[0]!r} in '{source}'")
        self.sets.update(found)

    def raw_scores(self, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, list[np.ndarray]]:
        """``{label: B arrays}``: each image's scores against its prompt (then its contrastive ones);
        for a model that reports uncertainty, the scores (its predicted means)."""
        return self.scores_and_uncertainty(images, prompts)[0]

    def scores_and_uncertainty(self, images: Sequence[Any], prompts: Sequence[str]
                               ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
        """:meth:`raw_scores` and ``{label: B arrays}`` of the standard deviations each model
        predicts for them (NaN for a model that reports none)."""
        import torch

        from harness.scoring.batches import collate, run_with_backoff
        from harness.types import ImageFailure

        if self.uses_contrastive:
            self._add_sets(prompts)
            columns = [[p, *self.sets[p]] for p in prompts]
        else:
            columns = [[p] for p in prompts]
        out, spreads = {}, {}
        for label, model in self.models.items():
            batch = collate([model.preprocess(image) for image in images])
            with torch.no_grad():
                out[label] = run_with_backoff(model, batch, columns)
            uncertain = bool(getattr(type(model), "reports_uncertainty", False))
            spreads[label] = []
            for i, (scores, cols) in enumerate(zip(out[label], columns, strict=True)):
                if isinstance(scores, ImageFailure):  # no number to train on: never a made-up one
                    raise HarnessError(f"reward model '{label}' could not score image {i} of the "
                                       f"batch against {cols[0]!r}: {scores.reason}")
                if uncertain:
                    arr = np.asarray(scores, dtype=np.float64)
                    if arr.shape != (len(cols), 2):
                        raise HarnessError(
                            f"reward model '{label}' reports uncertainty but returned shape "
                            f"{list(arr.shape)} for {len(cols)} prompts (expected [prompts, 2])")
                    scores = out[label][i] = arr[:, 0]
                    spreads[label].append(arr[:, 1])
                else:
                    spreads[label].append(np.full(len(cols), np.nan))
                bad = np.flatnonzero(~np.isfinite(np.asarray(scores, dtype=np.float64)))
                if bad.size:
                    j = int(bad[0])
                    which = "its prompt" if j == 0 else f"contrastive prompt {cols[j]!r} of"
                    raise HarnessError(
                        f"reward model '{label}' returned {scores[j]} for image {i} of the batch "
                        f"against {which} {cols[0]!r}: check its checkpoint and dtype (float32 "
                        "avoids float16 overflow)")
        return out, spreads

    def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise HarnessError(f"reward got {len(images)} images but {len(prompts)} prompts")
        raw, spreads = self.scores_and_uncertainty(images, prompts)
        if self.normalizer is None:
            return np.array([s[0] for s in next(iter(raw.values()))], dtype=np.float64)
        extra: dict[str, Any] = {}
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        out = np.empty(len(prompts), dtype=np.float64)
        for prompt, index in groups.items():
            scores = {label: np.stack([rows[i] for i in index]) for label, rows in raw.items()}
            if self.normalizer.uses_uncertainty:
                extra = {"uncertainty": {label: np.stack([rows[i] for i in index])
                                         for label, rows in spreads.items()}}
            values = np.asarray(self.normalizer(scores, **extra), dtype=np.float64).reshape(-1)
            if values.shape != (len(index),):
                raise HarnessError(
                    f"normalizer '{self.normalizer.id}' returned {values.size} values for the "
                    f"{len(index)} images of prompt {prompt!r}; it must return one per image"
                )
            if not np.isfinite(values).all():
                raise HarnessError(
                    f"normalizer '{self.normalizer.id}' returned "
                    f"{values[~np.isfinite(values)][0]} for prompt {prompt!r} from finite scores: "
                    "check its options (normalizer_options)")
            out[index] = values
        return out


def reward_label(reward: Callable[..., Any]) -> str:
    """A reward callable's name for logs: its ``name``, else its function or class name."""
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None)
               or type(reward).__name__)
