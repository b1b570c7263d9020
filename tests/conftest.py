"""Shared fixtures. Tests never load installed third-party plugins unless a test asks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HARNESS_LOAD_PLUGINS"] = ""  # no third-party plugins by default
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HARNESS_STRICT_PLUGINS", None)
os.environ.pop("HARNESS_BLOCK_PLUGINS", None)
# Pinned threads: on a busy 2-core machine, torch's default of one thread per core oversubscribes
# (a fine-tuning test once ran 25x slower under load); data-loader and Ray workers inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a dependency
    pass

REPO = Path(__file__).resolve().parents[1]
TIA2_DIR = Path(os.environ.get("TIA2_DATA", REPO.parent / "shared" / "tia2"))


@pytest.fixture(scope="session")
def tia2_dir() -> Path:
    if not (TIA2_DIR / "human_annotations").is_dir():
        pytest.fail(f"TIA2 annotations not found at {TIA2_DIR}: set TIA2_DATA or put shared/ beside the repo")
    return TIA2_DIR


@pytest.fixture(scope="session")
def tia2_data(tia2_dir):
    from harness_plugins.tia2 import TIA2

    return TIA2(tia2_dir).load()


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    from harness.plugins import reset_plugins

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    reset_plugins()
    yield
    reset_plugins()
