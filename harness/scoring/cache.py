"""A persistent score cache in SQLite (WAL mode), and the checked opening every SQLite cache shares.

Keyed by (model key, image content hash, prompt), where the model key is the core's
(:func:`harness.scoring.plan.model_cache_key`: resolved spec options, dtype, plugin distribution
and version, plugin source, content hashes of the model's files, preprocessing version). Rows are
committed after every batch, so a killed run keeps everything scored before it died and a re-run
computes only what is missing.

Trust in the file: opening a cache checks it before any work starts, and every problem is one
:class:`~harness.errors.HarnessError` line naming the file and the fix: a file that is not SQLite
or is damaged (random bytes, truncated), a foreign database (another application's id, other
tables, a table of ours with other columns), a schema version newer than this harness reads, a
read-only file or folder. A foreign file is only read, never changed. A write that fails (a full
disk) is rolled back whole: no row of the failed batch is stored and every earlier batch stays.
Several processes may write one cache at once: WAL mode and a busy timeout serialise them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

from harness.errors import HarnessError

#: ``PRAGMA application_id`` of every harness cache ("T2IH"): tells our files from foreign ones.
APPLICATION_ID = 0x54324948


class SQLiteCache:
    """One SQLite file holding one table of this harness, opened with every check.

    A subclass sets ``what`` (how errors name the file), ``table`` and ``create`` (its SQL),
    ``columns`` (``(name, declared type, primary-key position)`` as ``PRAGMA table_info``
    reports them), ``version`` (``PRAGMA user_version``; bump it on any schema change) and
    ``fix`` (how the user points at another cache, or none). A file of an older harness (the
    table alone, no application id) is adopted as it is.
    """

    what: ClassVar[str] = "cache"
    table: ClassVar[str] = ""
    create: ClassVar[str] = ""
    columns: ClassVar[tuple[tuple[str, str, int], ...]] = ()
    version: ClassVar[int] = 1
    fix: ClassVar[str] = "use another file, or no cache"
    timeout: ClassVar[float] = 60.0  #: seconds to wait for another process's write

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._check_path()
        try:
            self.conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self.error(exc) from exc
        try:
            self._schema()  # reads only, so a foreign file is refused untouched
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.transaction(" while setting it up"):
                # Again under the write lock: another process may have set it up meanwhile.
                if self._schema() != "current":
                    self.conn.execute(self.create)
                    self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self.conn.execute(f"PRAGMA user_version = {int(self.version)}")
        except sqlite3.Error as exc:
            self.conn.close()
            raise self.error(exc) from exc
        except BaseException:
            self.conn.close()
            raise

    def _check_path(self) -> None:
        where = self.path.parent
        if self.path.is_dir():
            raise HarnessError(f"{self.what} {self.path} is a folder, not a file: {self.fix}")
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"{self.what} {self.path}: cannot create its folder {where} "
                               f"({exc.strerror or exc}): {self.fix}") from exc
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise HarnessError(f"{self.what} {self.path} is read-only: make it writable, or "
                               f"{self.fix}")
        if not os.access(where, os.W_OK | os.X_OK):
            raise HarnessError(f"{self.what} {self.path} is in a read-only folder (SQLite writes "
                               f"its -wal and -shm files beside it): make {where} writable, or "
                               f"{self.fix}")

    def _schema(self) -> str:
        """``"empty"``, ``"older"`` (ours, unstamped) or ``"current"``; raises if foreign."""
        app = self.conn.execute("PRAGMA application_id").fetchone()[0]
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))
        if app not in (0, APPLICATION_ID):
            self._foreign(f"application id {app:#x}")
        if app == APPLICATION_ID and version > self.version:
            raise HarnessError(
                f"{self.what} {self.path} was written by a newer t2i-harness (schema version "
                f"{version}; this one reads {self.version}): upgrade t2i-harness, or {self.fix}")
        if not tables:
            return "empty"
        if self.table not in tables or (app == 0 and len(tables) > 1):
            self._foreign(f"tables {', '.join(tables)}")
        found = tuple((row[1], row[2].upper(), row[5]) for row in
                      self.conn.execute(f"PRAGMA table_info({self.table})"))
        if found != self.columns:
            names = ", ".join(f"{name} {kind}" for name, kind, _ in found)
            self._foreign(f"its table '{self.table}' has columns ({names})")
        return "current" if (app, version) == (APPLICATION_ID, self.version) else "older"

    def _foreign(self, detail: str) -> None:
        raise HarnessError(f"{self.what} {self.path} is not a {self.what} of this harness "
                           f"({detail}): {self.fix}")

    def error(self, exc: sqlite3.Error, doing: str = "") -> HarnessError:
        """One line naming the file, what went wrong (``doing``: where) and the fix."""
        name = getattr(exc, "sqlite_errorname", None) or ""
        text = str(exc)
        if name == "SQLITE_FULL" or "disk is full" in text:
            problem, fix = "ran out of disk space", f"free space, or {self.fix}"
        elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text \
                or "not a database" in text:
            problem = f"is damaged ({text})"
            fix = (f"delete it (with its -wal and -shm files) to start an empty cache, or "
                   f"{self.fix}")
        elif name.startswith("SQLITE_READONLY") or "readonly" in text:
            problem = f"is read-only ({text})"
            fix = f"make it and its folder writable, or {self.fix}"
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            problem = f"stayed locked by another process for {self.timeout:g} s"
            fix = f"retry when that process is done, or {self.fix}"
        elif name.startswith("SQLITE_CANTOPEN"):
            problem = f"cannot be opened ({text})"
            fix = f"check the path and permissions, or {self.fix}"
        else:
            problem, fix = f"is not usable ({text})", self.fix
        return HarnessError(f"{self.what} {self.path} {problem}{doing}: {fix}")

    @contextmanager
    def transaction(self, doing: str = "") -> Iterator[sqlite3.Connection]:
        """A write transaction: committed whole, or rolled back whole and raised as one line."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # SQLite already rolled back on some errors (SQLITE_FULL)
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.Error):
                raise self.error(exc, doing) from exc
            raise

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Rows of a query; a damaged file is one line naming it."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self.error(exc, " while reading") from exc

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScoreCache(SQLiteCache):
    """``ScoreCache(path)``; ``get(model, image_hashes)`` and ``put(model, rows)``."""

    what = "score cache"
    table = "scores"
    create = """
    CREATE TABLE IF NOT EXISTS scores (
        model TEXT NOT NULL,
        image TEXT NOT NULL,
        prompt TEXT NOT NULL,
        score REAL NOT NULL,
        PRIMARY KEY (model, image, prompt)
    ) WITHOUT ROWID
    """
    columns = (("model", "TEXT", 1), ("image", "TEXT", 2), ("prompt", "TEXT", 3),
               ("score", "REAL", 0))
    version = 1
    fix = "pass --cache with another file, or --no-cache"

    def get(self, model: str, image_hashes: Sequence[str]) -> dict[tuple[str, str], float]:
        """All cached ``{(image_hash, prompt): score}`` of ``model`` for these images."""
        out: dict[tuple[str, str], float] = {}
        unique = list(dict.fromkeys(image_hashes))
        for lo in range(0, len(unique), 500):
            chunk = unique[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            for image, prompt, score in self.read(
                f"SELECT image, prompt, score FROM scores WHERE model = ? AND image IN ({marks})",
                (model, *chunk),
            ):
                out[(image, prompt)] = score
        return out

    def put(self, model: str, rows: Iterable[tuple[str, str, float]]) -> None:
        """Store ``(image_hash, prompt, score)`` rows in one transaction: all of them or none."""
        doing = (" while storing a batch of scores (that batch was rolled back; scores stored "
                 "before it are kept)")
        with self.transaction(doing) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO scores (model, image, prompt, score) VALUES (?, ?, ?, ?)",
                ((model, image, prompt, float(score)) for image, prompt, score in rows),
            )

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self.read("SELECT COUNT(*) FROM scores")[0][0]
        return self.read("SELECT COUNT(*) FROM scores WHERE model = ?", (model,))[0][0]


def open_score_cache(cache: str | Path | None | bool) -> ScoreCache | None:
    """``True``: the default cache (``<user cache>/scores.sqlite``), a path, or ``False``/``None``.

    Every check of :class:`SQLiteCache` runs here, so call it before any work starts.
    """
    if cache is False or cache is None:
        return None
    if cache is True:
        from harness.io import cache_dir

        return ScoreCache(cache_dir() / "scores.sqlite")
    return ScoreCache(cache)
