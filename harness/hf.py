"""Shared loading helpers for reward models built on Hugging Face checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
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
    """``device`` if this machine has it: CUDA (and the GPU index asked for) or MPS."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError(f"device '{device}' requested but CUDA is not available; use cpu")
        count = torch.cuda.device_count()
        if index.isdigit() and int(index) >= count:
            raise HarnessError(f"device '{device}' does not exist: this machine has {count} CUDA "
                               f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise HarnessError(f"device '{device}' requested but MPS is not available; use cpu")
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
    if looks_local:
        refuse_unsafe_pickles(path)
    return config


#: the pickled weight files transformers and diffusers load when a folder has no safetensors
PICKLED_WEIGHTS = ("pytorch_model*.bin", "diffusion_pytorch_model*.bin")


def unpickling_refusal(exc: BaseException) -> str | None:
    """What torch's safe loader (``weights_only=True``) refused, as a phrase ("a pickled file
    holding objects such as pathlib.PosixPath"), when ``exc`` or an exception it was raised from
    is that refusal; else None. Torch's own message advises unpickling the file anyway
    (``weights_only=False``, safe globals), which harness never passes on: unpickling runs
    whatever code the file names."""
    import re

    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and "Weights only load failed" not in str(seen):
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
        if seen is not None and id(seen) in visited:
            seen = None
    if seen is None:
        return None
    text = str(seen)
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if named:
        return f"a pickled file holding objects such as {named.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)",
                       text, re.S)
    why = " ".join(detail.group(1).split())[:200] if detail else "corrupt, or not a torch file"
    return f"a file torch's safe loader rejects ({why})"


def pickled_checkpoint_error(exc: BaseException, where: str | Path | None = None) -> HarnessError | None:
    """One line refusing a checkpoint file that torch's safe loader refused (see
    :func:`unpickling_refusal`), offering safetensors as the fix, or None for any other error."""
    phrase = unpickling_refusal(exc)
    if phrase is None:
        return None
    what = f"checkpoint '{where}'" if where is not None else "a checkpoint"
    return HarnessError(
        f"{what} is {phrase}, which harness does not unpickle (unpickling can run arbitrary "
        "code): convert it to safetensors where you trust it (load it, then save_pretrained(folder) "
        "or safetensors.torch.save_file) and pass the safetensors checkpoint"
    )


def refuse_unsafe_pickles(folder: Path) -> None:
    """Refuse, naming the file, a local checkpoint whose pickled weights hold more than tensors,
    before transformers tries (and fails with advice to unpickle it anyway). Reads only the
    pickle, not the tensors (memory-mapped onto the meta device)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    import torch

    for path in sorted(p for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern)):
        try:
            try:
                torch.load(path, map_location="meta", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(path, map_location="meta", weights_only=True)  # the legacy format
        except Exception as exc:  # noqa: BLE001 - not a torch file: transformers says so later
            error = pickled_checkpoint_error(exc, path)
            if error is not None:
                raise error from exc


def commit_hash(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_commit_hash", None)


class quiet_transformers:
    """Silence transformers' info logs and progress bars while a checkpoint loads, and turn a
    pickled checkpoint that torch refuses to unpickle into one line suggesting safetensors
    (transformers' own message suggests unpickling it anyway)."""

    def __enter__(self) -> quiet_transformers:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
        error = pickled_checkpoint_error(exc) if exc is not None else None
        if error is not None:
            raise error from exc


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


def held_text_rows(cache: Any, prompts: Sequence[str]) -> tuple[list[str], Any]:
    """:meth:`~harness.types.RewardModel.text_rows` for a plugin keeping its text embeddings in
    an ``OrderedDict`` of prompt -> 1-D torch tensor: the held ones, as float32 numpy rows."""
    import numpy as np
    import torch

    held = [p for p in dict.fromkeys(prompts) if p in cache]
    if not held:
        return [], None
    return held, torch.stack([cache[p] for p in held]).float().cpu().numpy().astype(np.float32)


def load_text_rows_into(cache: Any, prompts: Sequence[str], rows: Any, device: Any,
                        size: int) -> list[str]:
    """:meth:`~harness.types.RewardModel.load_text_rows` for such a plugin: the rows of prompts
    it does not hold go into ``cache`` (on ``device``; the oldest dropped past ``size``).
    Returns the prompts added (for the plugin's truncation count)."""
    import numpy as np
    import torch

    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but text rows of shape {list(rows.shape)}")
    new = [j for j, p in enumerate(prompts) if p not in cache]
    if not new:
        return []
    block = torch.from_numpy(np.ascontiguousarray(rows[new])).to(device)
    added = [prompts[j] for j in new]
    for p, row in zip(added, block, strict=True):
        cache[p] = row
    while len(cache) > size:
        cache.popitem(last=False)
    return added


class ImageProcessorCall:
    """Picklable ``PIL image -> float32 [3, H, W]`` through a transformers image processor."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> Any:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def local_tokenizer(folder: Path | None, markers: Sequence[str] = ("tokenizer.json", "tokenizer_config.json",
                                                                   "vocab.json", "vocab.txt")) -> str | None:
    """A tokenizer saved beside a checkpoint: ``folder/tokenizer/`` or ``folder`` itself when it
    holds one of ``markers``; None otherwise."""
    if folder is None:
        return None
    for candidate in (Path(folder) / "tokenizer", Path(folder)):
        if candidate.is_dir() and any((candidate / m).is_file() for m in markers):
            return str(candidate)
    return None


def load_tokenizer(source: str, what: str, fix: str) -> Any:
    """``AutoTokenizer.from_pretrained(source)``, quietly; a failure is one line naming ``what``
    (e.g. "the HPSv2 tokenizer"), the source, the cause and ``fix``."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - missing files, offline hub, bad folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"cannot load {what} '{source}' ({type(exc).__name__}: {first}); {fix}") from exc
