"""A persistent score cache in SQLite (WAL mode).

Keyed by (model key, image content hash, prompt), where the model key is the core's
(:func:`harness.scoring.plan.model_cache_key`: resolved spec options, dtype, plugin distribution
and version, plugin source, content hashes of the model's files, preprocessing version). Rows are
committed after every batch, so a killed run keeps everything scored before it died and a re-run
computes only what is missing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.errors import HarnessError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    model TEXT NOT NULL,
    image TEXT NOT NULL,
    prompt TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (model, image, prompt)
) WITHOUT ROWID;
"""


class ScoreCache:
    """``ScoreCache(path)``; ``get(model, image_hashes)`` and ``put(model, rows)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise HarnessError(f"score cache {self.path} is not usable: {exc}") from exc

    def get(self, model: str, image_hashes: Sequence[str]) -> dict[tuple[str, str], float]:
        """All cached ``{(image_hash, prompt): score}`` of ``model`` for these images."""
        out: dict[tuple[str, str], float] = {}
        unique = list(dict.fromkeys(image_hashes))
        for lo in range(0, len(unique), 500):
            chunk = unique[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            for image, prompt, score in self.conn.execute(
                f"SELECT image, prompt, score FROM scores WHERE model = ? AND image IN ({marks})",
                (model, *chunk),
            ):
                out[(image, prompt)] = score
        return out

    def put(self, model: str, rows: Iterable[tuple[str, str, float]]) -> None:
        """Store ``(image_hash, prompt, score)`` rows and commit."""
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO scores (model, image, prompt, score) VALUES (?, ?, ?, ?)",
                ((model, image, prompt, float(score)) for image, prompt, score in rows),
            )

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self.conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM scores WHERE model = ?", (model,)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_score_cache(cache: str | Path | None | bool) -> ScoreCache | None:
    """``True``: the default cache (``<user cache>/scores.sqlite``); a path; ``False``/``None``: none."""
    if cache is False or cache is None:
        return None
    if cache is True:
        from harness.io import cache_dir

        return ScoreCache(cache_dir() / "scores.sqlite")
    return ScoreCache(cache)
