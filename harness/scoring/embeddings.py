"""The embedding store: image embeddings of dual-encoder reward models (CLIP, PickScore, HPSv2).

A model that declares :attr:`~harness.types.RewardModel.embedding_kind` ``"dual"`` returns one
embedding row per image from ``embed_images`` and scores prompts against those rows alone. The
core keeps each row, keyed by (model cache key, image content hash), in an SQLite file beside the
score cache (``<cache>.embeddings.sqlite``). A new contrastive prompt set then costs text encodes
(kept in the model's in-memory text cache) and a product with the stored rows: no image is read,
decoded or encoded again. A dual encoder that hands out its text embeddings
(:meth:`~harness.types.RewardModel.text_rows`: CLIP, PickScore, HPSv2) has them kept too, keyed
by (model cache key, prompt), and loaded into it by the next run (another process), so prompts
scored before are not encoded again either. Rows are float32 (``embed_images``' own values: CLIP-family plugins
return float32 unit vectors), so scores from stored rows are the scores a fresh run computes.

Writes are buffered and committed a few thousand rows at a time by a writer thread, off the
scoring thread (WAL mode, a busy timeout); ``put`` and ``put_rows`` only copy the caller's
arrays (one copy per batch with ``put_rows``, the scorer's path), and the writer turns them
into blobs. A killed run keeps every row written before its last buffer (the scores themselves
are in the score cache); two processes may share the file; ``get`` sees every row ``put``
before it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError

_CREATE = ("CREATE TABLE IF NOT EXISTS image_embeddings (model TEXT NOT NULL, image TEXT NOT NULL, "
           "dim INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (model, image)) WITHOUT ROWID")
#: Text embeddings (added later: a store without the table gains it when opened).
_CREATE_TEXT = ("CREATE TABLE IF NOT EXISTS text_embeddings (model TEXT NOT NULL, text TEXT NOT "
                "NULL, dim INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (model, text)) "
                "WITHOUT ROWID")
#: table -> its key column
_KEYS = {"image_embeddings": "image", "text_embeddings": "text"}


class EmbeddingStore:
    """``(model key, image hash) -> float32 [D]`` and ``(model key, prompt) -> float32 [D]``
    (a dual encoder's text rows, :meth:`~harness.types.RewardModel.text_rows`) in one SQLite
    file."""

    flush_rows: int = 4096  #: rows buffered before a write

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        #: ``(table, model, image hashes or prompts, float32 rows [n, D] or n arrays [D])``,
        #: copies of the caller's
        self._buffer: list[tuple[str, str, list[str], Any]] = []
        self._rows = 0  # rows in the buffer
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(_CREATE)
            self.conn.execute(_CREATE_TEXT)
        except (OSError, sqlite3.Error) as exc:
            raise HarnessError(
                f"embedding store {self.path} cannot be opened ({exc}): delete it (it is rebuilt "
                "from the images) or use another score cache"
            ) from exc

    def get(self, model: str, image_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored rows of these images (absent ones are left out)."""
        self.flush()
        out: dict[str, np.ndarray] = {}
        with self._lock:
            return self._get(model, image_hashes, out)

    def get_texts(self, model: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored text rows of these prompts (absent ones are left out)."""
        self.flush()
        out: dict[str, np.ndarray] = {}
        with self._lock:
            return self._get(model, prompts, out, "text_embeddings")

    def _get(self, model: str, keys: Sequence[str], out: dict[str, np.ndarray],
             table: str = "image_embeddings") -> dict[str, np.ndarray]:
        column = _KEYS[table]
        hashes = list(dict.fromkeys(keys))
        for lo in range(0, len(hashes), 900):
            chunk = hashes[lo:lo + 900]
            marks = ",".join("?" * len(chunk))
            for image, dim, data in self.conn.execute(
                f"SELECT {column}, dim, data FROM {table} WHERE model = ? AND {column} IN ({marks})",
                [model, *chunk],
            ):
                row = np.frombuffer(data, dtype=np.float32)
                if row.shape == (dim,):
                    out[image] = row
        return out

    def put(self, model: str, rows: Iterable[tuple[str, Any]]) -> None:
        """Store ``(image hash, embedding [D])`` rows: buffered, written in one transaction per
        :attr:`flush_rows` rows and on :meth:`flush`/:meth:`close` (the rows are a cache of
        work the score cache already holds: a killed run loses at most one buffer of them)."""
        images, arrays = [], []
        for image, emb in rows:
            images.append(image)
            arrays.append(np.array(emb, dtype=np.float32).reshape(-1))  # a copy: caller may reuse
        self._add(model, images, arrays)

    def put_rows(self, model: str, image_hashes: Sequence[str], rows: Any) -> None:
        """:meth:`put` for one batch: ``rows`` is float32-able ``[len(image_hashes), D]``,
        copied here in one piece (the caller may reuse it) and turned into blobs by the writer."""
        block = np.array(rows, dtype=np.float32)
        if block.ndim != 2 or block.shape[0] != len(image_hashes):
            raise ValueError(f"{len(image_hashes)} image hashes for embedding rows of shape "
                             f"{list(block.shape)}")
        self._add(model, list(image_hashes), block)

    def put_texts(self, model: str, prompts: Sequence[str], rows: Any) -> None:
        """Store a dual encoder's text rows (float32-able ``[len(prompts), D]``), buffered and
        written as :meth:`put` writes image rows."""
        block = np.array(rows, dtype=np.float32)
        if block.ndim != 2 or block.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for text rows of shape {list(block.shape)}")
        self._add(model, list(prompts), block, "text_embeddings")

    def _add(self, model: str, images: list[str], rows: Any,
             table: str = "image_embeddings") -> None:
        if images:
            self._buffer.append((table, model, images, rows))
            self._rows += len(images)
        if self._rows >= self.flush_rows:
            self._submit()

    def _submit(self) -> None:
        """Hand the buffered rows to the writer thread (one transaction)."""
        chunks, self._buffer, self._rows = self._buffer, [], 0
        if not chunks:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="embedding store")
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._writer.submit(self._write_chunks, chunks))

    def _write_chunks(self, chunks: list[tuple[str, str, list[str], Any]]) -> None:
        """In the writer thread: the buffered rows as ``(model, key, dim, float32 blob)``, per
        table, in one transaction."""
        self._write({table: [(model, key, int(row.shape[0]), row.tobytes())
                             for t, model, keys, rows in chunks if t == table
                             for key, row in zip(keys, rows, strict=True)]
                     for table in dict.fromkeys(t for t, _, _, _ in chunks)})

    def _write(self, items: dict[str, list[tuple[str, str, int, bytes]]]) -> None:
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                for table, rows in items.items():
                    self.conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?)",
                                          rows)
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise HarnessError(f"embedding store {self.path}: write failed ({exc}): free "
                                   "disk space or use another score cache") from exc

    def flush(self) -> None:
        """Write the buffered rows and wait for every write; a failed write is raised here."""
        self._submit()
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def count(self, model: str | None = None, table: str = "image_embeddings") -> int:
        """Stored image rows (``table="text_embeddings"``: text rows), of ``model`` or all."""
        self.flush()
        if table not in _KEYS:
            raise ValueError(f"no table {table!r} in an embedding store")
        with self._lock:
            if model is None:
                return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            return int(self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE model = ?",
                                         (model,)).fetchone()[0])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self.conn.close()


def embedding_store_for(cache: Any) -> EmbeddingStore | None:
    """The store beside a score cache (``<cache file>.embeddings.sqlite``), or None without a
    file-backed cache."""
    path = getattr(cache, "path", None)
    if cache is None or path is None:
        return None
    path = Path(path)
    return EmbeddingStore(path.with_name(path.name + ".embeddings.sqlite"))


def features_to_rows(features: Any) -> np.ndarray:
    """``embed_images`` output (torch or numpy ``[B, D]``) -> float32 numpy ``[B, D]``."""
    if hasattr(features, "detach"):
        features = features.detach().float().cpu().numpy()
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim != 2:
        raise HarnessError(
            f"a dual-encoder reward model must return image embeddings [B, D] from embed_images; "
            f"got shape {list(arr.shape)}: set embedding_kind = None in the plugin"
        )
    return arr
