"""File input and output: atomic writes, content hashes, the user cache and checked downloads.

Atomic writes: a reader sees the old file or the new one, never half of one. Downloads land in a
temporary file and are moved into place only once their sha256 matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from harness.errors import HarnessError


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where /proc shows it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename,
    with the permissions a plain ``open`` would have given it (the user's umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path, what: str, hint: str = "") -> Any:
    """Parse a JSON file, or raise one line naming ``what`` it is, the file and the problem.

    :param hint: the fix, appended to a malformed-file message (e.g. "re-download it").
    """
    path = Path(path).expanduser()
    fix = f" ({hint})" if hint else ""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"malformed {what} {path}: {exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}{fix}") from exc
    except UnicodeDecodeError as exc:
        raise HarnessError(f"malformed {what} {path}: not UTF-8 text{fix}") from exc
    except OSError as exc:
        raise HarnessError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


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
