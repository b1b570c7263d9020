"""Rewards for fine-tuning: a reward model, optionally calibrated by TextNorm, as a callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harness.errors import HarnessError


class RewardFunction:
    """``reward(images, prompts) -> float64 [B]`` from a reward-model spec.

    With ``normalizer="textnorm"`` each image is also scored against its prompt's contrastive
    prompts (from ``contrastive``: a generator id such as ``rules``/``llm``/``tia2``, a JSON file,
    or a dict) and the reward is the TextNorm confidence at ``scale``.
    """

    def __init__(self, spec: str, normalizer: str | None = None, scale: float = 1.0,
                 contrastive: str | dict[str, list[str]] = "rules", device: str | None = None,
                 prompts: Sequence[str] = ()):
        from harness.scoring.specs import load_reward_model

        self.name = spec if normalizer is None else f"{normalizer}({spec})"
        self.model = load_reward_model(spec, device=device)
        self.normalizer = None
        self.sets: dict[str, list[str]] = {}
        if normalizer is not None:
            from harness.plugins import get_plugins

            cls = get_plugins().normalizers.get(normalizer)
            self.normalizer = cls(scale=scale) if normalizer in ("textnorm", "mean", "ur") else cls()
            self.contrastive = contrastive
            self._add_sets(prompts)

    def _add_sets(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.sets]
        if not missing or self.normalizer is None:
            return
        source = self.contrastive
        if isinstance(source, dict):
            found = {p: list(source.get(p, [])) for p in missing}
        elif str(source).endswith(".json"):
            import json
            from pathlib import Path

            data = json.loads(Path(source).read_text(encoding="utf-8"))
            found = {p: list(data.get(p, [])) for p in missing}
        else:
            from harness.plugins import get_plugins

            found = get_plugins().prompt_generators.get(str(source))().generate(missing)
        empty = [p for p, v in found.items() if not v]
        if empty:
            raise HarnessError(f"no contrastive prompts for training prompt {empty[0]!r} in '{source}'")
        self.sets.update(found)

    def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        import torch

        from harness.scoring.runner import _collate

        batch = _collate([(i, self.model.preprocess(im), None) for i, im in enumerate(images)])[1]
        with torch.no_grad():
            features = self.model.embed_images(batch)
            if self.normalizer is None:
                scores = self.model.score(features, [[p] for p in prompts])
                return np.array([float(np.asarray(s)[0]) for s in scores])
            self._add_sets(prompts)
            scores = self.model.score(features, [[p, *self.sets[p]] for p in prompts])
        return np.array([float(self.normalizer({"m": np.asarray(s, dtype=np.float64)[None]})[0])
                         for s in scores])


def as_reward(reward: str | Callable[..., Any], **kwargs: Any) -> tuple[str, Callable[..., Any]]:
    """``(name, callable)`` from a spec or a callable ``(images, prompts) -> [B]``."""
    if callable(reward):
        return getattr(reward, "name", getattr(reward, "__name__", type(reward).__name__)), reward
    fn = RewardFunction(reward, **kwargs)
    return fn.name, fn
