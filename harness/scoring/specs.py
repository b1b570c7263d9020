"""Building reward models from user-facing specs.

A spec is ``NAME`` or ``NAME:key=value,key=value`` (e.g. ``blip2:mode=itc`` or
``clip:checkpoint=/models/clip-l``). Keys are the model class's constructor arguments (unknown
keys are rejected with the list of accepted ones), plus ``label=`` to name the leaderboard row.
``device`` and ``dtype`` given separately apply to every model that does not set its own.

A :class:`ModelSpec` is a plain value: it is what the score cache keys on (with the constructor's
defaults filled in) and what a Ray actor receives to build the same model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError, did_you_mean
from harness.plugins import get_plugins
from harness.types import RewardModel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The leaderboard's method name: ``label=`` if given, else the id plus any option other
        than where it runs and which weights it loads."""
        if "label" in self.options:
            return str(self.options["label"])
        shown = {k: v for k, v in self.options.items()
                 if k not in {"checkpoint", "device", "dtype", "batch_size", "revision"}}
        if not shown:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in sorted(shown.items()))}]"

    @property
    def text(self) -> str:
        """The spec written back as ``NAME:key=value,...``."""
        if not self.options:
            return self.name
        return f"{self.name}:{','.join(f'{k}={v}' for k, v in self.options.items())}"


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in {"true", "false"}:
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def check_unique_labels(specs: list[ModelSpec]) -> None:
    """Two models under one name would be mixed together in tables and ensembles."""
    seen: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.label in seen:
            raise HarnessError(
                f"two --model specs are both named '{spec.label}'; add label=NAME to one of them "
                f"(e.g. {spec.name}:...,label={spec.name}-2)"
            )
        seen[spec.label] = spec


def parse_model_spec(text: str) -> ModelSpec:
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise HarnessError(f"empty reward model name in '{text}'")
    options: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise HarnessError(f"bad option '{part}' in model spec '{text}': expected key=value")
            options[key.strip()] = _coerce(value.strip())
    return ModelSpec(name, options)


def _typed_option(cls: type, spec: ModelSpec, key: str, value: Any) -> Any:
    """``value`` checked against the constructor's annotation of ``key`` (a number given where
    the constructor takes text, e.g. a checkpoint folder named ``2024``, stays text)."""
    import typing

    from harness.config import type_problem

    try:
        hint = typing.get_type_hints(cls.__init__).get(key)
    except Exception:  # noqa: BLE001 - annotations that cannot be evaluated are not checked
        return value
    if hint is None:
        return value
    if not isinstance(value, str) and type_problem(value, hint) is not None and type_problem(str(value), hint) is None:
        return str(value)
    problem = type_problem(value, hint)
    if problem is not None:
        raise HarnessError(f"reward model '{spec.name}' option '{key}' {problem}")
    return value


#: torch device types a spec or ``--device`` may name (with an optional ``:index``)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "mtia")


def check_device_name(device: str) -> str:
    """``device`` if it is written like a torch device (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import re

    text = str(device).strip()
    if not re.fullmatch(rf"({'|'.join(DEVICE_TYPES)})(:\d+)?", text):
        raise HarnessError(f"'{device}' is not a device: use cpu, cuda, cuda:N or mps")
    return text


def check_model_spec(spec: str | ModelSpec) -> ModelSpec:
    """The spec, refused unless :func:`load_reward_model` would take it (a registered id, options
    its constructor accepts, of the types it declares), without loading anything."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    cls = get_plugins().reward_models.get(spec.name)
    options = {k: v for k, v in spec.options.items() if k != "label"}
    if "label" in spec.options and not str(spec.options["label"]).strip():
        raise HarnessError(f"empty label= in model spec '{spec.text}'")
    if "device" in options:
        check_device_name(options.pop("device"))
    if "dtype" in options and options.pop("dtype") not in ("auto", "float32", "float16", "bfloat16"):
        raise HarnessError(f"dtype of model spec '{spec.text}' must be auto, float32, float16 or "
                           "bfloat16")
    kwargs = _constructor_kwargs(cls, spec, options)
    size = kwargs.get("batch_size")  # a runtime option every model may take: how many at once
    if isinstance(size, int) and not isinstance(size, bool) and size < 1:
        raise HarnessError(f"batch_size of model spec '{spec.text}' must be >= 1, got {size}")
    return spec


def _constructor_kwargs(cls: type, spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the constructor of ``cls``: known names, declared types."""
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n in params if n != "self"]
    for key in options:
        if key not in params and not accepts_any:
            raise HarnessError(
                f"reward model '{spec.name}' has no option '{key}'.{did_you_mean(key, accepted)} "
                f"Options: {', '.join(accepted)}"
            )
    return {key: _typed_option(cls, spec, key, value) for key, value in options.items()}


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def load_reward_model(
    spec: str | ModelSpec, device: str | None = None, dtype: str | None = None, **overrides: Any
) -> RewardModel:
    """Instantiate a registered reward model from a spec (loads its checkpoint)."""
    spec = check_model_spec(spec)
    cls = get_plugins().reward_models.get(spec.name)
    options = {k: v for k, v in {**overrides, **spec.options}.items() if k != "label"}
    device = options.pop("device", None) or device or default_device()
    dtype = options.pop("dtype", None) or dtype or "auto"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    kwargs = _constructor_kwargs(cls, spec, options)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "device" in params or accepts_any:
        kwargs["device"] = device
    if "dtype" in params or accepts_any:
        kwargs["dtype"] = dtype
    return cls(**kwargs)
