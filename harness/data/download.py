"""Fetching benchmark files into a user cache, verified by sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from harness.atomic import atomic_path
from harness.errors import HarnessError


def cache_dir() -> Path:
    """``$HARNESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/t2i-harness``, else ``~/.cache/t2i-harness``."""
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "t2i-harness"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str | Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right checksum is already there.

    The download lands in a temporary file and is moved into place only once its checksum
    matches, so an interrupted or corrupted download never poisons the cache.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    try:
        with atomic_path(dest) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                    shutil.copyfileobj(resp, fh)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise HarnessError(f"could not download {url}: {reason}") from exc
            got = sha256_file(tmp)
            if sha256 is not None and got != sha256:
                raise HarnessError(
                    f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; "
                    "the file was not saved"
                )
    except OSError as exc:
        raise HarnessError(f"could not write {dest}: {exc}") from exc
    return dest
