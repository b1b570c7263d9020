"""Scoring images with reward models: specs and loading, the plan and its cache key, the batch
runner, the score cache and the executors (local, Ray).

The public names are imported lazily, so ``import harness.scoring`` (and ``harness --help``)
never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelSpec": "harness.scoring.specs",
    "parse_model_spec": "harness.scoring.specs",
    "load_reward_model": "harness.scoring.specs",
    "check_unique_labels": "harness.scoring.specs",
    "ScoreRun": "harness.scoring.plan",
    "ScorePlan": "harness.scoring.plan",
    "model_cache_key": "harness.scoring.plan",
    "score_images": "harness.scoring.runner",
    "score_models": "harness.scoring.runner",
    "ModelScores": "harness.scoring.runner",
    "open_image": "harness.scoring.batches",
    "ScoreCache": "harness.scoring.cache",
    "open_score_cache": "harness.scoring.cache",
    "Executor": "harness.scoring.executors",
    "LocalExecutor": "harness.scoring.executors",
    "RayExecutor": "harness.scoring.ray",
    "RayOptions": "harness.scoring.ray",
}

__all__ = [
    "Executor",
    "LocalExecutor",
    "ModelScores",
    "ModelSpec",
    "RayExecutor",
    "RayOptions",
    "ScoreCache",
    "ScorePlan",
    "ScoreRun",
    "check_unique_labels",
    "load_reward_model",
    "model_cache_key",
    "open_image",
    "open_score_cache",
    "parse_model_spec",
    "score_images",
    "score_models",
]

if TYPE_CHECKING:
    from harness.scoring.batches import open_image
    from harness.scoring.cache import ScoreCache, open_score_cache
    from harness.scoring.executors import Executor, LocalExecutor
    from harness.scoring.plan import ScorePlan, ScoreRun, model_cache_key
    from harness.scoring.ray import RayExecutor, RayOptions
    from harness.scoring.runner import ModelScores, score_images, score_models
    from harness.scoring.specs import (
        ModelSpec,
        check_unique_labels,
        load_reward_model,
        parse_model_spec,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harness.scoring' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
