"""Declarative data shipped with t2i-harness: benchmark and model cards (YAML)."""

from __future__ import annotations

from importlib import resources
from typing import Any


def load_card(kind: str, name: str) -> dict[str, Any]:
    """Read ``registry/<kind>/<name>.yaml`` from the installed package."""
    import yaml

    text = resources.files(__name__).joinpath(kind, f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)
