"""Shared loading helpers for reward models built on Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import HarnessError

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise HarnessError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device '{device}' requested but CUDA is not available")
    return device


def load_config(checkpoint: str, expected_types: tuple[str, ...], architecture: str,
                revision: str | None = None) -> Any:
    """Read a checkpoint's config and check its ``model_type`` before loading any weights."""
    from transformers import AutoConfig

    path = Path(checkpoint).expanduser()
    looks_local = path.exists() or checkpoint.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise HarnessError(
            f"checkpoint '{checkpoint}' not found or has no config.json "
            f"(expected a {architecture} checkpoint saved with save_pretrained)"
        )
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else checkpoint, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(
            f"cannot load checkpoint '{checkpoint}' (expected a {architecture} checkpoint): {first}"
        ) from exc
    if config.model_type not in expected_types:
        raise HarnessError(
            f"checkpoint '{checkpoint}' is a '{config.model_type}' model, expected a {architecture} "
            f"(model_type {' or '.join(repr(t) for t in expected_types)})"
        )
    return config


def commit_hash(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_commit_hash", None)


class quiet_transformers:
    """Silence transformers' info logs and progress bars while a checkpoint loads."""

    def __enter__(self) -> quiet_transformers:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()


def weights_fingerprint(checkpoint: str) -> str | None:
    """sha256 over a local checkpoint's weight files (None for hub ids: their revision is used)."""
    import hashlib

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return None
    files = sorted(
        p for p in path.iterdir()
        if p.suffix in {".safetensors", ".bin", ".pt", ".pth"} and p.is_file()
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_files(source: str | None, revision: str | None = None) -> list[Path]:
    """The files a checkpoint loads from: every file of a local folder (or the file itself), or,
    for a hub id, every file of its snapshot in the local Hugging Face cache (symlinks into
    ``blobs/``, whose names are content hashes). Hidden files and folders are left out."""
    if not source:
        return []
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=str(source), revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a hub id, or not in the local cache
        return []
    return checkpoint_files(folder)


class ImageProcessorCall:
    """Picklable ``PIL image -> float32 [3, H, W]`` through a transformers image processor."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> Any:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
