"""``LeaderboardConfig``: every setting of a leaderboard run, grouped, typed and validated.

Built from CLI flags or from a YAML file (``harness leaderboard --config run.yaml``, same group and
key names as :meth:`LeaderboardConfig.asdict`); ``asdict()`` is what the run manifest records as
``config``. Errors name the parameter (``report.bootstrap``); the CLI names its flag instead.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, did_you_mean


class ConfigError(HarnessError):
    """A bad setting: ``param`` is its dotted name (``report.bootstrap``), ``problem`` the rest."""

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param} {problem}")


@dataclass
class DataSection:
    """Which benchmark, which part of it, and where its files are."""

    benchmark: str = "tia2"
    data: str | None = None  #: annotation folder; None: download into the user cache
    subsets: list[str] = field(default_factory=list)  #: empty: all
    images: str | None = None  #: image folder (needed to score models)
    skip_missing: bool = False
    include_reported: bool = True  #: the authors' released per-prompt metrics
    include_human: bool = True  #: leave-one-annotator-out human agreement


@dataclass
class ScoringSection:
    """Which reward models score the images, and how."""

    models: list[str] = field(default_factory=list)  #: specs: NAME or NAME:key=value,...
    device: str | None = None  #: None: cuda when available
    dtype: str = "auto"  #: auto, float32, float16, bfloat16
    batch_size: int = 16
    workers: int = 0  #: data-loader worker processes (local executor)
    cache: str | bool = True  #: a path, True (the user cache) or False (none)
    executor: str = "local"  #: local or ray
    address: str | None = None  #: Ray cluster address
    actors: int = 1  #: Ray model actors
    gpus_per_actor: float | None = None  #: Ray GPUs per actor; None: 1 each if there are enough, else shared
    #: every model in one pass over the images (each image decoded once); False: one model at
    #: a time (only one model's weights resident)
    one_pass: bool = True


@dataclass
class CalibrationSection:
    """Normalizers, ensembles and the contrastive prompt sets they read."""

    normalizers: list[str] = field(default_factory=list)  #: applied to each model alone
    ensembles: list[str] = field(default_factory=list)  #: applied to all models together
    prompts: str = "benchmark"  #: "benchmark" (its released sets), a generator id or a JSON file
    prompt_options: dict[str, Any] = field(default_factory=dict)  #: generator settings
    selection: str = "cv"  #: cv (k-fold over prompts) or oracle (per prompt, against its labels)
    folds: int = 5
    select_metric: str = "auroc"
    standardize: bool = False  #: z-score each model's raw scores (label-free) first


@dataclass
class ReportSection:
    """Confidence intervals and outputs."""

    bootstrap: int = 1000  #: resamples over prompts; 0: no intervals
    confidence: float = 0.95
    seed: int = 0
    plots: bool = True
    calibration_bins: int = 10  #: equal-mass bins of the ECE and the reliability diagram
    #: how raw scores become probabilities for calibration (cross-fitted over prompts)
    calibration_mapping: str = "platt"


@dataclass
class LeaderboardConfig:
    data: DataSection = field(default_factory=DataSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    report: ReportSection = field(default_factory=ReportSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LeaderboardConfig:
        """``{"data": {...}, "scoring": {...}, ...}`` -> a validated config."""
        if not isinstance(values, dict):
            raise ConfigError("config", f"must be a mapping of groups, got {type(values).__name__}")
        groups = {f.name: f for f in dataclasses.fields(cls)}
        sections = {}
        for name, value in values.items():
            if name not in groups:
                raise ConfigError(name, f"is not a config group.{did_you_mean(name, groups)} "
                                        f"Groups: {', '.join(groups)}")
            sections[name] = _section(groups[name].default_factory, value, name)
        config = cls(**sections)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> LeaderboardConfig:
        """Read a YAML file; ``overrides`` (same nesting) replace its values."""
        from harness.config import read_mapping

        loaded = read_mapping(path)
        for group, values in (overrides or {}).items():
            base = loaded.setdefault(group, {})
            if not isinstance(base, dict):
                raise ConfigError(group, "must be a mapping of settings")
            base.update(values)
        return cls.from_dict(loaded)

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every value that can be checked before any work starts."""
        from harness.config import type_problem

        for group in dataclasses.fields(self):
            section = getattr(self, group.name)
            hints = typing.get_type_hints(type(section))
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                problem = type_problem(value, hints[f.name])
                if problem is not None:
                    raise ConfigError(f"{group.name}.{f.name}", problem)
        d, s, c, r = self.data, self.scoring, self.calibration, self.report
        if r.bootstrap < 0:
            raise ConfigError("report.bootstrap", f"must be >= 0, got {r.bootstrap}")
        # Upper bounds: past them a value is a typo that would exhaust memory or crash numpy.
        for param, value, low, high in (
            ("report.bootstrap", r.bootstrap, 0, 1_000_000),
            ("report.seed", r.seed, 0, 2**32 - 1),
            ("scoring.batch_size", s.batch_size, 1, 1 << 16),
            ("scoring.workers", s.workers, 0, 1024),
            ("scoring.actors", s.actors, 1, 1024),
            ("calibration.folds", c.folds, 2, 10_000),
        ):
            if not low <= value <= high:
                raise ConfigError(param, f"must be between {low} and {high}, got {value}")
        if s.gpus_per_actor is not None and not 0 <= s.gpus_per_actor <= 1024:
            raise ConfigError("scoring.gpus_per_actor", f"must be between 0 and 1024, got {s.gpus_per_actor}")
        if not c.prompts.strip():
            raise ConfigError("calibration.prompts", "must not be empty: give benchmark, a generator id or a JSON file")
        if not 2 <= r.calibration_bins <= 1000:
            raise ConfigError("report.calibration_bins", f"must be between 2 and 1000, got {r.calibration_bins}")
        if r.calibration_mapping not in ("platt", "isotonic"):
            raise ConfigError("report.calibration_mapping",
                              f"must be platt or isotonic, got {r.calibration_mapping!r}")
        if not 0.0 < r.confidence < 1.0:
            raise ConfigError("report.confidence", f"must be between 0 and 1, got {r.confidence}")
        if s.batch_size < 1:
            raise ConfigError("scoring.batch_size", f"must be >= 1, got {s.batch_size}")
        if s.workers < 0:
            raise ConfigError("scoring.workers", f"must be >= 0, got {s.workers}")
        if s.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError("scoring.dtype", f"must be auto, float32, float16 or bfloat16, got {s.dtype!r}")
        if s.executor not in ("local", "ray"):
            raise ConfigError("scoring.executor", f"must be local or ray, got {s.executor!r}")
        if s.executor != "ray" and (s.address is not None or s.actors != 1 or s.gpus_per_actor is not None):
            raise ConfigError("scoring.executor", "must be ray for address, actors and gpus_per_actor")
        if s.actors < 1:
            raise ConfigError("scoring.actors", f"must be >= 1, got {s.actors}")
        if s.gpus_per_actor is not None and s.gpus_per_actor < 0:
            raise ConfigError("scoring.gpus_per_actor", f"must be >= 0, got {s.gpus_per_actor}")
        if c.selection not in ("cv", "oracle"):
            raise ConfigError("calibration.selection", f"must be cv or oracle, got {c.selection!r}")
        if c.folds < 2:
            raise ConfigError("calibration.folds", f"must be >= 2, got {c.folds}")
        from harness.evaluation.metrics import METRICS

        if c.select_metric not in METRICS:
            raise ConfigError("calibration.select_metric",
                              f"must be one of {', '.join(METRICS)}, got {c.select_metric!r}")
        if s.models and d.images is None:
            raise ConfigError("data.images", "is needed to score reward models: give the image folder")
        if (c.normalizers or c.ensembles) and not s.models:
            raise ConfigError("scoring.models", "is empty, but normalizers and ensembles need reward models")


def _section(factory: Any, values: Any, group: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(group, f"must be a mapping of settings, got {values!r}")
    cls = type(factory())
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{group}.{key}", f"is not a setting.{did_you_mean(key, known)} "
                                                 f"Settings of {group}: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        converted[key] = value
    return cls(**converted)
