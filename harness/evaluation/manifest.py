"""The run manifest: everything needed to reproduce or audit a run."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from harness import __version__

#: Packages whose versions change numbers; recorded when installed.
TRACKED_PACKAGES = (
    "numpy", "pandas", "scipy", "pluggy", "click", "matplotlib", "pyarrow", "pillow",
    "torch", "transformers", "diffusers", "peft", "accelerate", "ray", "openai",
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """Commit (and dirtiness) of the git work tree holding ``path`` (the harness source)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def build_manifest(config: dict[str, Any], seed: int, data: dict[str, Any]) -> dict[str, Any]:
    from harness.plugins import get_plugins

    return {
        "harness_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "plugins": [p.as_json() for p in get_plugins().list()],
        "git": git_commit(),
        "seed": seed,
        "config": config,
        "data": data,
    }
