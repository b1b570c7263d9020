"""A compact persistent score store in SQLite (WAL mode), and the checked opening every SQLite
cache shares.

Keyed by (model key, image content hash, prompt), where the model key is the core's
(:func:`harness.scoring.plan.model_cache_key`: resolved spec options, dtype, plugin distribution
and version, plugin source, content hashes of the model's files, preprocessing version); the
standard deviations of a model that reports uncertainty are stored under ``<key>#std``.

Layout (schema version 2). Integer ids stand for the repeated strings: ``models`` (key text),
``prompts`` (text) and ``prompt_sets`` (the little-endian int32 prompt ids of one ordered prompt
list). ``scores`` holds one row per (model, image, prompt set): the image's sha256 as its 32 raw
bytes (a key that is not a hex digest as its text) and the set's scores as a float64 blob. Why a
row per prompt set and not per prompt: the scorer scores each image against its whole prompt
list at once, so the row overhead and the image hash are paid once per image instead of once per
pair (about 11 bytes per
pair for TIA2 TextNorm's 33 prompts per image, plus the prompt texts shared by its 50 images,
against 521 for version 1's row of strings per pair and about 20 for a row of integer ids per
pair), and one insert stores 33 scores. Why the hash in the row and not an image id table: an id
table costs a second insert, a read-back and an index per new image, and would halve the insert
rate, while the 32 bytes are about one byte per pair. Why float64 and not float32: a cached score
is then exactly the number the model returned, so a resumed run gives bit-identical results to an
uninterrupted one (float32 would save 4 bytes per pair and break that). A prompt stored for one
image under two prompt sets (a later run with another prompt list) reads as its later value and
counts once.

Writing happens off the scoring thread: :meth:`ScoreCache.put` (or
:meth:`~ScoreCache.put_sets`, one item per image: the scorer's path, no object per score)
checks the rows and queues them
(at most ``queue_batches`` batches wait; then ``put`` waits), and a writer thread with its own
connection commits them, the batches waiting at that moment in one transaction (should it fail,
they are written again one transaction each, so only the failing batch is lost). When fewer than
16 batches wait, the writer waits up to half a second for more before it commits (a commit per
batch about doubled the writer thread's CPU on the scorer's small batches).
:meth:`~ScoreCache.get`, :meth:`~ScoreCache.count`, :meth:`~ScoreCache.flush` and
:meth:`~ScoreCache.close` wait for the queue first (and have the writer commit at once); a
failed write is raised as one :class:`~harness.errors.HarnessError` line naming the file at the
next ``put``, ``flush`` or ``close`` (the batches queued behind it are dropped). A killed run loses at most the batches
queued or in flight; the rest is committed, so a re-run computes only what is missing. At
interpreter exit, or when an unclosed cache is collected, the writer stores what is queued first.

Trust in the file: opening a cache checks it before any work starts, and every problem is one
:class:`~harness.errors.HarnessError` line naming the file and the fix: a file that is not SQLite
or is damaged (random bytes, truncated), a foreign database (another application's id, other
tables, a table of ours with other columns), a schema version newer than this harness reads, a
score cache of version 1 (written by an older harness: delete it, or use another file), a
read-only file or folder. A foreign file is only read, never changed. A write that fails (a full
disk) is rolled back whole: no row of the failed batch is stored and every earlier batch stays.
Several processes may write one cache at once: WAL mode and a busy timeout serialise them, and the
id tables are filled with INSERT OR IGNORE and read back, so two writers agree on every id.
"""

from __future__ import annotations

import itertools
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from harness.errors import HarnessError

#: The default score cache's file name in the user cache folder (version 2 of the schema).
DEFAULT_CACHE_NAME = "scores-v2.sqlite"
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
    create: ClassVar[str | tuple[str, ...]] = ""  #: one statement, or several
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
                    for statement in (self.create,) if isinstance(self.create, str) else self.create:
                        self.conn.execute(statement)
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

    def _stamp(self) -> tuple[int, int, list[str]]:
        """The file's application id, schema version and tables; refuses a foreign application
        id or a newer schema version."""
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
        return app, version, tables

    def _schema(self) -> str:
        """``"empty"``, ``"older"`` (ours, unstamped) or ``"current"``; raises if foreign."""
        app, version, tables = self._stamp()
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
    """``ScoreCache(path)``; ``get(model, image_hashes)``, ``put(model, rows)``, ``count(model)``,
    ``flush()`` and ``close()`` (or ``with``). Layout, writer thread and guarantees: see the module
    docstring."""

    what = "score cache"
    table = "scores"
    create = (
        "CREATE TABLE IF NOT EXISTS models (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE)",
        "CREATE TABLE IF NOT EXISTS prompts (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE)",
        "CREATE TABLE IF NOT EXISTS prompt_sets (id INTEGER PRIMARY KEY, prompts BLOB NOT NULL UNIQUE)",
        "CREATE TABLE IF NOT EXISTS scores (model INTEGER NOT NULL, image BLOB NOT NULL, "
        "prompt_set INTEGER NOT NULL, scores BLOB NOT NULL, UNIQUE (model, image, prompt_set))",
    )
    #: ``{table: columns}`` as ``PRAGMA table_info`` reports them.
    tables: ClassVar[dict[str, tuple[tuple[str, str, int], ...]]] = {
        "models": (("id", "INTEGER", 1), ("key", "TEXT", 0)),
        "prompt_sets": (("id", "INTEGER", 1), ("prompts", "BLOB", 0)),
        "prompts": (("id", "INTEGER", 1), ("text", "TEXT", 0)),
        "scores": (("model", "INTEGER", 0), ("image", "BLOB", 0), ("prompt_set", "INTEGER", 0),
                   ("scores", "BLOB", 0)),
    }
    #: The version-1 layout (one row of strings per score), refused with its own message.
    v1_columns = (("model", "TEXT", 1), ("image", "TEXT", 2), ("prompt", "TEXT", 3),
                  ("score", "REAL", 0))
    version = 2
    fix = "pass --cache with another file, or --no-cache"
    queue_batches: ClassVar[int] = 64  #: batches ``put`` may queue before it waits for the writer

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._queue: queue.Queue[tuple[str, Any, bool] | None] = queue.Queue(
            self.queue_batches)
        self._errors: list[BaseException] = []
        self._writer: threading.Thread | None = None
        self._closed = False
        self._sets: dict[int, tuple[str, ...]] = {}  # reader's prompt-set id -> prompt texts
        self._prompts: dict[int, str] = {}
        try:
            wconn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                    check_same_thread=False)
            wconn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            self.conn.close()
            raise self.error(exc) from exc
        #: What the writer thread holds (not the cache, so an unclosed cache can be collected).
        self._w = _Writer(wconn, self.what, self.path, self.fix, self.timeout)

    @property
    def wconn(self) -> sqlite3.Connection:
        """The writer thread's connection (its own; SQLite connections are per thread)."""
        return self._w.wconn

    # -- opening -----------------------------------------------------------------------------
    def _schema(self) -> str:
        app, version, tables = self._stamp()
        if not tables:
            return "empty"
        if tables == ["scores"] and self._columns("scores") == self.v1_columns \
                and (app == 0 or version <= 1):
            raise HarnessError(
                f"{self.what} {self.path} was written by an older t2i-harness (schema version 1, "
                f"one row of text per score; this one reads {self.version}): delete it (with its "
                f"-wal and -shm files) to start a compact cache, or {self.fix}")
        if not set(tables) <= set(self.tables):
            self._foreign(f"tables {', '.join(tables)}")
        for name in tables:
            found = self._columns(name)
            if found != self.tables[name]:
                names = ", ".join(f"{col} {kind}" for col, kind, _ in found)
                self._foreign(f"its table '{name}' has columns ({names})")
        if app == 0 or len(tables) < len(self.tables):  # unstamped, or a table of ours dropped
            self._foreign(f"tables {', '.join(tables)}")
        return "current"

    def _columns(self, table: str) -> tuple[tuple[str, str, int], ...]:
        return tuple((row[1], row[2].upper(), row[5]) for row in
                     self.conn.execute(f"PRAGMA table_info({table})"))

    # -- writing (the writer thread) -------------------------------------------------------
    def put(self, model: str, rows: Iterable[tuple[str, str, float]]) -> None:
        """Queue ``(image_hash, prompt, score)`` rows for the writer thread, which stores them in
        one transaction: all of them or none. Returns at once unless ``queue_batches`` batches
        are waiting; a failure of an earlier batch is raised here (that batch was rolled back)."""
        self._raise_pending()
        if self._closed:
            raise HarnessError(f"{self.what} {self.path} is closed: open it again to store scores")
        batch = rows if isinstance(rows, list) else list(rows)
        if not batch:
            return
        images, prompts, values = zip(*batch, strict=True)
        scores = np.array(values, dtype=np.float64)  # a non-number fails here, in the caller
        self._start_writer()
        self._queue.put((model, (images, prompts, scores), False))

    def put_sets(self, model: str,
                 items: Iterable[tuple[str, Sequence[str], np.ndarray | Sequence[float]]]) -> None:
        """Queue one image's scores per item, ``(image_hash, prompts, scores [P])``, as the scorer
        produces them: the same rows, storage and guarantees as :meth:`put`, with no Python object
        per score (the writer turns each array into its float64 blob). The scores are copied, so
        the caller may change its arrays afterwards."""
        self._raise_pending()
        if self._closed:
            raise HarnessError(f"{self.what} {self.path} is closed: open it again to store scores")
        batch = []
        for image, prompts, values in items:
            texts = prompts if type(prompts) is tuple else tuple(prompts)
            # a copy (the caller may change its array), and a non-number fails here, in the caller
            arr = np.array(values, dtype=_F8)
            if arr.ndim != 1:
                arr = arr.reshape(-1)
            if arr.shape[0] != len(texts):
                raise ValueError(f"{arr.shape[0]} scores for {len(texts)} prompts of image {image}")
            if texts:
                batch.append((image, texts, arr))
        if not batch:
            return
        self._start_writer()
        self._queue.put((model, batch, True))

    def _start_writer(self) -> None:
        """Start the writer thread on the first put (again in a forked child, where it is gone)."""
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=_write_loop, name=f"score cache {self.path}",
                                            args=(self._queue, self._w, self._errors,
                                                  weakref.ref(self)), daemon=False)
            self._writer.start()

    def flush(self) -> None:
        """Wait until every queued batch is stored; raise the first failure as one line."""
        if self._writer is not None:
            if self._queue.unfinished_tasks:
                self._start_writer()
                self._queue.put(_FLUSH)  # the writer commits at once instead of gathering more
            self._queue.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._errors:
            exc = self._errors.pop(0)
            self._errors.clear()
            raise exc

    # -- reading ------------------------------------------------------------------------------
    def get(self, model: str, image_hashes: Sequence[str]) -> dict[tuple[str, str], float]:
        """All cached ``{(image_hash, prompt): score}`` of ``model`` for these images (queued
        batches are stored first). A prompt stored twice for an image: the later value."""
        self.flush()
        out: dict[tuple[str, str], float] = {}
        found = self.read("SELECT id FROM models WHERE key = ?", (model,))
        if not found:
            return out
        model_id = found[0][0]
        unique = [_image_key(h) for h in dict.fromkeys(image_hashes)]
        for lo in range(0, len(unique), 500):
            chunk = unique[lo : lo + 500]
            marks = ",".join("?" * len(chunk))
            for key, set_id, blob in self.read(
                f"SELECT image, prompt_set, scores FROM scores WHERE model = ? AND image IN ({marks}) "
                f"ORDER BY rowid",
                (model_id, *chunk),
            ):
                image = key.hex() if isinstance(key, bytes) else key
                texts = self._sets.get(set_id) or self._prompt_set(set_id)
                out.update(zip(zip(itertools.repeat(image), texts),
                               np.frombuffer(blob, "<f8").tolist(), strict=True))
        return out

    def _prompt_set(self, set_id: int) -> tuple[str, ...]:
        blob = self.read("SELECT prompts FROM prompt_sets WHERE id = ?", (set_id,))[0][0]
        ids = np.frombuffer(blob, "<i4").tolist()
        missing = [i for i in dict.fromkeys(ids) if i not in self._prompts]
        for lo in range(0, len(missing), 500):
            chunk = missing[lo : lo + 500]
            self._prompts.update(self.read(
                f"SELECT id, text FROM prompts WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        self._sets[set_id] = texts = tuple(self._prompts[i] for i in ids)
        return texts

    def count(self, model: str | None = None) -> int:
        """Stored ``(image, prompt)`` scores (of ``model``, or of every model key)."""
        self.flush()
        where, params = ("WHERE model = (SELECT id FROM models WHERE key = ?)", (model,)) \
            if model is not None else ("", ())
        total = self.read(f"SELECT COALESCE(SUM(length(scores)), 0) / 8 FROM scores {where}",
                          params)[0][0]
        # A prompt stored for one image under two prompt sets counts once.
        for model_id, image in self.read(
                f"SELECT model, image FROM scores {where} GROUP BY model, image HAVING COUNT(*) > 1",
                params):
            sets = [self._sets.get(s) or self._prompt_set(s) for (s,) in self.read(
                "SELECT prompt_set FROM scores WHERE model = ? AND image = ?", (model_id, image))]
            total -= sum(map(len, sets)) - len(set().union(*sets))
        return total

    def close(self) -> None:
        """Store every queued batch, stop the writer, close the file; raise a pending failure."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._writer is not None:
                self._queue.put(None)
                self._writer.join()
            self._w.wconn.close()
            self.conn.close()


class _Writer:
    """The writer thread's side of a :class:`ScoreCache`: its connection, the ids it has
    committed (model keys, prompt texts, prompt-set blobs), and how its errors name the file."""

    error = SQLiteCache.error
    gather: int = 16  #: batches committed together before the writer stops waiting for more
    linger: float = 0.5  #: seconds the writer waits for ``gather`` batches (0: never waits)

    def __init__(self, conn: sqlite3.Connection, what: str, path: Path, fix: str, timeout: float):
        self.wconn, self.what, self.path, self.fix, self.timeout = conn, what, path, fix, timeout
        # ids by table, and "sets": a prompt set's texts (a tuple) -> its id
        self._known: dict[str, dict] = {"models": {}, "prompts": {}, "prompt_sets": {}, "sets": {}}

    def store_batches(self, jobs: list[tuple[str, Any, bool]]) -> None:
        """In the writer thread: the batches waiting in the queue, in one transaction. If it
        fails, they are stored again one per transaction, so that only the failing batch is
        rolled back (and raised) and the batches before it are kept."""
        try:
            self._store(jobs)
        except HarnessError:
            if len(jobs) == 1:
                raise
            for job in jobs:
                self._store([job])

    def _store(self, jobs: list[tuple[str, Any, bool]]) -> None:
        """Batches in one transaction: ids resolved, one row per (model, image, prompt set)."""
        doing = (" while storing a batch of scores (that batch was rolled back; scores stored "
                 "before it are kept)")
        conn = self.wconn
        try:
            conn.execute("BEGIN IMMEDIATE")
            learned: dict[str, dict] = {"models": {}, "prompts": {}, "prompt_sets": {}, "sets": {}}
            for model, payload, per_image in jobs:
                if per_image:
                    self._store_sets(conn, learned, model, payload)
                else:
                    self._store_one(conn, learned, model, _group_rows(*payload))
            conn.execute("COMMIT")
            for table, ids in learned.items():  # committed: ids never change or go away
                self._known[table].update(ids)
        except BaseException as exc:
            if conn.in_transaction:  # SQLite already rolled back on some errors (SQLITE_FULL)
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.Error):
                raise self.error(exc, doing) from exc
            raise HarnessError(f"{self.what} {self.path} could not store a batch of scores "
                               f"({type(exc).__name__}: {exc}){doing}: {self.fix}") from exc

    def _store_one(self, conn: sqlite3.Connection, learned: dict[str, dict], model: str,
                   groups: dict[str, tuple[tuple[str, ...], np.ndarray]]) -> None:
        """One row per image of ``groups`` (image -> (distinct prompt texts, float64 scores))."""
        model_id = self._model_id(conn, learned, model)
        ids = self._set_ids(conn, learned, dict.fromkeys(texts for texts, _ in groups.values()))
        conn.executemany(_INSERT, [
            (model_id, _image_key(image), ids[texts], values.astype(_F8, copy=False).tobytes())
            for image, (texts, values) in groups.items()])

    def _store_sets(self, conn: sqlite3.Connection, learned: dict[str, dict], model: str,
                    items: list[tuple[str, tuple[str, ...], np.ndarray]]) -> None:
        """``put_sets``' items (float64 ``<f8`` arrays) as rows, with no grouping when each image
        is once in the batch and each prompt set new to this writer has distinct prompts (the
        scorer's case; the sets it has stored are distinct); otherwise as :func:`_merge_sets`."""
        known_sets, new_sets = self._known["sets"], learned["sets"]
        here = dict.fromkeys([texts for _, texts, _ in items])
        if any(len(set(s)) != len(s) for s in here if s not in known_sets and s not in new_sets) \
                or len({image for image, _, _ in items}) != len(items):
            self._store_one(conn, learned, model, _merge_sets(items))
            return
        model_id = self._model_id(conn, learned, model)
        ids = self._set_ids(conn, learned, here)
        key = _image_key
        conn.executemany(_INSERT, [(model_id, key(image), ids[texts], values.tobytes())
                                   for image, texts, values in items])

    def _model_id(self, conn: sqlite3.Connection, learned: dict[str, dict], model: str) -> int:
        known = self._known["models"]
        if model in known:
            return known[model]
        return _ids(conn, "models", "key", [model], known, learned["models"])[model]

    def _set_ids(self, conn: sqlite3.Connection, learned: dict[str, dict],
                 here: dict[tuple[str, ...], None]) -> dict[tuple[str, ...], int]:
        """``{prompt texts: prompt-set id}`` of the (distinct) sets ``here``, new ones stored."""
        known_sets, new_sets = self._known["sets"], learned["sets"]
        wanted = [s for s in here if s not in known_sets and s not in new_sets]
        if wanted:
            texts = list(dict.fromkeys(t for s in wanted for t in s))
            prompt_ids = _ids(conn, "prompts", "text", texts, self._known["prompts"],
                              learned["prompts"])
            blobs = {s: np.array([prompt_ids[t] for t in s], "<i4").tobytes() for s in wanted}
            set_ids = _ids(conn, "prompt_sets", "prompts", list(blobs.values()),
                           self._known["prompt_sets"], learned["prompt_sets"])
            new_sets.update((s, set_ids[blob]) for s, blob in blobs.items())
        return {s: known_sets[s] if s in known_sets else new_sets[s] for s in here}


_INSERT = "INSERT OR REPLACE INTO scores (model, image, prompt_set, scores) VALUES (?, ?, ?, ?)"
#: Scores are stored as little-endian float64 (the machine's float64 on x86 and ARM).
_F8 = np.dtype("<f8")
#: Queued by :meth:`ScoreCache.flush`: the writer commits what it holds without waiting for more.
_FLUSH: Any = ("flush", None, False)


def _group_rows(images: tuple, prompts: tuple, scores: np.ndarray
                ) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """``put``'s rows -> image -> (distinct prompts, scores): runs of one image (as the scorer
    writes them) sliced without a loop per score; a prompt twice for an image: the last wins."""
    groups: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    lo = 0
    for image, run in itertools.groupby(images):
        hi = lo + len(list(run))
        texts, values = prompts[lo:hi], scores[lo:hi]
        if image in groups or len(set(texts)) != hi - lo:  # rare: merge, the last one wins
            merged = dict(zip(*groups[image], strict=True)) if image in groups else {}
            merged.update(zip(texts, values.tolist(), strict=True))
            texts, values = tuple(merged), np.array(list(merged.values()), dtype=np.float64)
        groups[image] = (texts, values)
        lo = hi
    return groups


def _merge_sets(items: list[tuple[str, tuple[str, ...], np.ndarray]]
                ) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """``put_sets``' items -> image -> (distinct prompts, scores), as :func:`_group_rows`; each
    prompt set is checked for repeated prompts once per batch, not once per image."""
    groups: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    distinct: dict[tuple[str, ...], bool] = {}
    for image, texts, values in items:
        ok = distinct.get(texts)
        if ok is None:
            ok = distinct[texts] = len(set(texts)) == len(texts)
        if image in groups or not ok:  # rare: merge, the last one wins
            merged = dict(zip(*groups[image], strict=True)) if image in groups else {}
            merged.update(zip(texts, values.tolist(), strict=True))
            texts, values = tuple(merged), np.array(list(merged.values()), dtype=_F8)
        groups[image] = (texts, values)
    return groups


def _write_loop(jobs: queue.Queue, writer: _Writer, errors: list[BaseException],
                owner: weakref.ref, most: int = 64) -> None:
    """The writer thread: stores queued batches in order, those waiting together (up to
    ``most``) in one transaction. When fewer than ``writer.gather`` wait, it waits up to
    ``writer.linger`` seconds for more (fewer commits: less CPU and less I/O per batch), unless
    :meth:`ScoreCache.flush` (or ``close``) asks for them. After a failure the batches queued
    behind it are dropped until the owner has raised it. Ends on ``None``, or once the queue is
    empty and the owner is gone or the interpreter is exiting (so no queued batch is left
    unwritten)."""
    while True:
        try:
            group = [jobs.get(timeout=0.2)]
        except queue.Empty:
            if not threading.main_thread().is_alive():
                return
            if owner() is None:  # collected unclosed: everything queued is stored
                writer.wconn.close()
                return
            continue
        deadline = None
        while group[-1] is not None and group[-1] is not _FLUSH and len(group) < most:
            try:
                group.append(jobs.get_nowait())
                continue
            except queue.Empty:
                pass
            if len(group) >= writer.gather or writer.linger <= 0:
                break
            now = time.monotonic()
            if deadline is None:
                deadline = now + writer.linger
            if now >= deadline:
                break
            try:
                group.append(jobs.get(timeout=deadline - now))
            except queue.Empty:
                break
        stop = group[-1] is None
        batches = [job for job in group if job is not None and job is not _FLUSH]
        try:
            if batches and not errors:
                writer.store_batches(batches)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller at its next call
            errors.append(exc)
        finally:
            for _ in group:
                jobs.task_done()
        if stop:
            return


def _image_key(image: str) -> str | bytes:
    """A sha256 hex digest (64 lowercase hex digits) is stored as its 32 bytes; any other image
    key (uppercase, spaces, another length) as its text. No regex: ``bytes.fromhex`` and the
    round trip through ``hex()`` accept exactly the lowercase digests."""
    if len(image) == 64:
        try:
            key = bytes.fromhex(image)
        except ValueError:
            return image
        if key.hex() == image:  # not uppercase, and no whitespace bytes.fromhex skipped
            return key
    return image


def _ids(conn: sqlite3.Connection, table: str, column: str, values: list,
         known: dict | None = None, learned: dict | None = None) -> dict:
    """``{value: id}`` in an id table, inserting the missing values (another process may insert
    the same value meanwhile: INSERT OR IGNORE, then select). Ids in ``known`` (committed) are
    not looked up; new ones also go to ``learned`` (kept once the transaction commits)."""
    out = {}
    if known is not None:  # committed ids, and those of this transaction
        both = (known, learned or {})
        out = {v: d[v] for v in values for d in both if v in d}
        values = [v for v in values if v not in out]
    for lo in range(0, len(values), 500):
        chunk = values[lo : lo + 500]
        conn.executemany(f"INSERT OR IGNORE INTO {table} ({column}) VALUES (?)", [(v,) for v in chunk])
        marks = ",".join("?" * len(chunk))
        found = dict((v, i) for i, v in conn.execute(
            f"SELECT id, {column} FROM {table} WHERE {column} IN ({marks})", chunk))
        out.update(found)
        if learned is not None:
            learned.update(found)
    return out


def open_score_cache(cache: str | Path | None | bool) -> ScoreCache | None:
    """``True``: the default cache (``<user cache>/scores-v2.sqlite``: a new name, so an old cache
    of the version-1 schema beside it is never in the way), a path, or ``False``/``None``.

    Every check of :class:`SQLiteCache` runs here, so call it before any work starts.
    """
    if cache is False or cache is None:
        return None
    if cache is True:
        from harness.io import cache_dir

        return ScoreCache(cache_dir() / DEFAULT_CACHE_NAME)
    return ScoreCache(cache)
