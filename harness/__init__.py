"""t2i-harness: a plugin-based benchmark harness for text-to-image reward models.

The public API for plugin authors and library users::

    from harness import hookimpl, RewardModel, Normalizer, PromptSetGenerator, FineTuner, Benchmark
    from harness import load_reward_model, score_models, run_leaderboard, LeaderboardConfig

Heavy dependencies (torch, transformers, diffusers, ray) are imported only by the code that
needs them, so ``import harness`` and ``harness --help`` stay fast: the library functions below
are loaded on first use.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("t2i-harness")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from harness.errors import HarnessError  # noqa: E402
from harness.hookspecs import hookimpl  # noqa: E402
from harness.types import (  # noqa: E402
    Benchmark,
    BenchmarkData,
    FineTuner,
    FineTuneResult,
    FineTuneSettings,
    Hyperparameter,
    ImageFailure,
    ModelCard,
    Normalizer,
    PairRewardModel,
    PromptSetGenerator,
    Protocol,
    RewardModel,
)

#: name -> module of the library API, imported on first access
_LAZY = {
    "get_plugins": "harness.plugins",
    "load_reward_model": "harness.scoring",
    "score_images": "harness.scoring",
    "score_models": "harness.scoring",
    "run_leaderboard": "harness.evaluation.leaderboard",
    "LeaderboardConfig": "harness.evaluation.config",
    "LeaderboardResult": "harness.evaluation.leaderboard",
    "run_leaderboards": "harness.evaluation.multi",
}

__all__ = [
    "Benchmark", "BenchmarkData", "FineTuneResult", "FineTuneSettings", "FineTuner", "HarnessError",
    "Hyperparameter", "ImageFailure", "ModelCard", "Normalizer", "PairRewardModel",
    "PromptSetGenerator", "Protocol", "RewardModel",
    "__version__", "hookimpl", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
