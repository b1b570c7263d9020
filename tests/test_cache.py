"""The SQLite score cache: damaged, foreign, newer, older (version 1), read-only and full files are
one-line errors naming the file and the fix; a failed write loses no earlier row; concurrent
writers are safe."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.scoring.cache import APPLICATION_ID, ScoreCache, open_score_cache

FIX = "pass --cache with another file, or --no-cache"


def rows(start, n, prompt="a cat"):
    return [(f"img{i:05d}", prompt, i / 7) for i in range(start, start + n)]


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def real_cache(path: Path, n: int = 3000) -> bytes:
    with ScoreCache(path) as cache:
        for p in range(4):
            cache.put("m", rows(0, n, prompt=f"a rather long prompt {p} " * 4))
    return path.read_bytes()


def store(path: Path, batch) -> None:
    """Open, store one batch, close (the writer thread commits before ``close`` returns)."""
    with ScoreCache(path) as cache:
        cache.put("m", batch)


# -- damaged files --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["random bytes", "half", "page boundary", "header only"])
def test_a_damaged_file_is_one_line_naming_it_and_the_fix(tmp_path, damage):
    good = real_cache(tmp_path / "good.sqlite")
    assert len(good) > 40 * 4096  # many pages, so every cut below loses some
    data = {
        "random bytes": os.urandom(20000),
        "half": good[: len(good) // 2 + 123],
        "page boundary": good[: len(good) - 4096],
        "header only": good[:50],
    }[damage]
    path = tmp_path / "scores.sqlite"
    path.write_bytes(data)
    with pytest.raises(HarnessError) as err:
        ScoreCache(path)
    text = one_line(err)
    assert text.startswith(f"score cache {path} is damaged (")
    assert text.endswith(f": delete it (with its -wal and -shm files) to start an empty cache, or {FIX}")
    assert path.read_bytes() == data  # nothing written into it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.sqlite", "scores.sqlite"]


def test_a_folder_and_an_uncreatable_folder(tmp_path):
    with pytest.raises(HarnessError) as err:
        ScoreCache(tmp_path)
    assert one_line(err) == f"score cache {tmp_path} is a folder, not a file: {FIX}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HarnessError) as err:
        ScoreCache(tmp_path / "file" / "scores.sqlite")
    assert one_line(err) == (f"score cache {tmp_path}/file/scores.sqlite: cannot create its folder "
                             f"{tmp_path}/file (File exists): {FIX}")


# -- foreign and newer files ----------------------------------------------------------------------
def foreign(path: Path, *sql: str) -> bytes:
    conn = sqlite3.connect(path)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("case, sql, detail", [
    ("other tables", ["CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('ann')"],
     "(tables users)"),
    ("ours and others", ["CREATE TABLE users (name TEXT)",
                         "CREATE TABLE scores (model TEXT NOT NULL, image TEXT NOT NULL, prompt TEXT "
                         "NOT NULL, score REAL NOT NULL, PRIMARY KEY (model, image, prompt))"],
     "(tables scores, users)"),
    ("same name, other columns", ["CREATE TABLE scores (id INTEGER PRIMARY KEY, score REAL)"],
     "(its table 'scores' has columns (id INTEGER, score REAL))"),
    ("another application", ["PRAGMA application_id = 1234", "CREATE TABLE t (x)"],
     "(application id 0x4d2)"),
])
def test_a_foreign_database_is_refused_untouched(tmp_path, case, sql, detail):
    path = tmp_path / "other.db"
    before = foreign(path, *sql)
    with pytest.raises(HarnessError) as err:
        ScoreCache(path)
    assert one_line(err) == f"score cache {path} is not a score cache of this harness {detail}: {FIX}"
    assert path.read_bytes() == before  # not even switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_a_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "scores.sqlite"
    real_cache(path, 10)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with pytest.raises(HarnessError) as err:
        open_score_cache(path)
    assert one_line(err) == (f"score cache {path} was written by a newer t2i-harness (schema version 3; "
                             f"this one reads 2): upgrade t2i-harness, or {FIX}")


V1_TABLE = ("CREATE TABLE IF NOT EXISTS scores (model TEXT NOT NULL, image TEXT NOT NULL, prompt "
            "TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (model, image, prompt)) WITHOUT ROWID")


@pytest.mark.parametrize("stamp", [[], [f"PRAGMA application_id = {APPLICATION_ID}",
                                        "PRAGMA user_version = 1"]])
def test_a_version_1_cache_is_refused_untouched_naming_the_fix(tmp_path, stamp):
    # Version 1 (one row of strings per score), as the harness wrote it before and after caches
    # carried an application id and a schema version.
    path = tmp_path / "scores.sqlite"
    before = foreign(path, "PRAGMA journal_mode=WAL", V1_TABLE, *stamp,
                     "INSERT INTO scores VALUES ('m', 'img', 'a cat', 0.25)")
    with pytest.raises(HarnessError) as err:
        ScoreCache(path)
    assert one_line(err) == (
        f"score cache {path} was written by an older t2i-harness (schema version 1, one row of "
        f"text per score; this one reads 2): delete it (with its -wal and -shm files) to start a "
        f"compact cache, or {FIX}")
    assert path.read_bytes() == before
    path.unlink()  # the fix works
    with ScoreCache(path) as cache:
        cache.put("m", [("img", "a cat", 0.25)])
    with ScoreCache(path) as cache:
        assert cache.get("m", ["img"]) == {("img", "a cat"): 0.25}
        assert cache.read("PRAGMA application_id")[0][0] == APPLICATION_ID
        assert cache.read("PRAGMA user_version")[0][0] == 2


@pytest.mark.parametrize("case, sql, detail", [
    ("a table of ours dropped", ["DROP TABLE prompt_sets"],
     "(tables models, prompts, scores)"),
    ("a table of ours with other columns", ["DROP TABLE prompts", "CREATE TABLE prompts (x TEXT)"],
     "(its table 'prompts' has columns (x TEXT))"),
    ("our tables, unstamped", ["PRAGMA application_id = 0"],
     "(tables models, prompt_sets, prompts, scores)"),
])
def test_a_changed_cache_of_ours_is_refused_untouched(tmp_path, case, sql, detail):
    path = tmp_path / "scores.sqlite"
    store(path, rows(0, 10))
    before = foreign(path, *sql)
    with pytest.raises(HarnessError) as err:
        ScoreCache(path)
    assert one_line(err) == f"score cache {path} is not a score cache of this harness {detail}: {FIX}"
    assert path.read_bytes() == before


# -- read-only files and folders ------------------------------------------------------------------
def unprivileged(fn) -> str:
    """``fn()`` in a forked child that cannot bypass file modes (root can): 'ok' or the error."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child():
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            queue.put("ok")
        except HarnessError as exc:
            queue.put(str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
            queue.put(f"{type(exc).__name__}: {exc}")

    proc = ctx.Process(target=child)
    proc.start()
    out = queue.get(timeout=60)
    proc.join(60)
    if out.startswith("PermissionError: [Errno 1]"):
        pytest.skip("cannot drop root privileges here")
    return out


@pytest.fixture
def shared_dir():
    """A folder the unprivileged child can reach (pytest's tmp folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="harness-cache-"))
    path.chmod(0o777)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    shutil.rmtree(path)


def test_read_only_file_and_folder(shared_dir):
    ro_file = shared_dir / "ro" / "scores.sqlite"
    ro_file.parent.mkdir()
    ro_file.parent.chmod(0o777)
    before = real_cache(ro_file, 10)
    ro_file.chmod(0o444)
    assert unprivileged(lambda: ScoreCache(ro_file)) == (
        f"score cache {ro_file} is read-only: make it writable, or {FIX}")
    assert ro_file.read_bytes() == before

    locked = shared_dir / "locked"
    locked.mkdir()
    writable = locked / "old.sqlite"
    real_cache(writable, 10)
    writable.chmod(0o666)
    locked.chmod(0o555)
    for path in (locked / "new.sqlite", writable):  # a new file, and a writable one in it
        assert unprivileged(lambda p=path: ScoreCache(p)) == (
            f"score cache {path} is in a read-only folder (SQLite writes its -wal and -shm files "
            f"beside it): make {locked} writable, or {FIX}")
    nested = locked / "sub" / "scores.sqlite"
    assert unprivileged(lambda: ScoreCache(nested)) == (
        f"score cache {nested}: cannot create its folder {locked}/sub (Permission denied): {FIX}")
    # The same files, writable: they open and score.
    locked.chmod(0o777)
    ro_file.chmod(0o666)
    assert unprivileged(lambda: store(ro_file, rows(100, 5))) == "ok"
    assert unprivileged(lambda: store(writable, rows(100, 5))) == "ok"
    assert ScoreCache(ro_file).count() == ScoreCache(writable).count() == 4 * 10 + 5


# -- failed writes --------------------------------------------------------------------------------
def test_a_full_disk_rolls_back_the_batch_and_keeps_earlier_rows(tmp_path):
    path = tmp_path / "scores.sqlite"
    cache = ScoreCache(path)
    cache.put("m", rows(0, 200))
    cache.put("m", rows(200, 200))
    cache.flush()
    pages = cache.read("PRAGMA page_count")[0][0]
    # SQLite's own "database or disk is full" (SQLITE_FULL), as on a full disk: the file may grow
    # by one page, and the next batch needs several. The writer thread's connection writes.
    cache.wconn.execute(f"PRAGMA max_page_count = {pages + 1}")
    cache.put("m", rows(400, 2000, prompt="a long prompt about a cat " * 3))  # queued
    with pytest.raises(HarnessError) as err:
        cache.flush()  # the writer's failure, raised in the caller
    assert one_line(err) == (
        f"score cache {path} ran out of disk space while storing a batch of scores (that batch "
        f"was rolled back; scores stored before it are kept): free space, or {FIX}")
    assert cache.count() == 400
    kept = cache.get("m", [f"img{i:05d}" for i in range(2400)])
    assert kept == {(image, prompt): score for image, prompt, score in rows(0, 400)}
    # Space again: the same connection writes, and a fresh one sees everything.
    cache.wconn.execute("PRAGMA max_page_count = 1073741823")
    cache.put("m", rows(400, 10))
    cache.close()
    with ScoreCache(path) as again:
        assert again.count() == 410
        assert again.read("PRAGMA integrity_check") == [("ok",)]


def test_a_batch_failing_halfway_is_absent(tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    cache.put("m", rows(0, 5))

    def batch():
        yield from rows(5, 3)
        yield ("img99999", "a cat", "not a number")

    with pytest.raises(ValueError, match="could not convert string to float"):
        cache.put("m", batch())
    assert cache.count() == 5
    assert not cache.conn.in_transaction
    cache.put("m", rows(5, 3))
    assert cache.count() == 8


def test_sqlite_errors_become_one_line_naming_the_fix(tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    path = cache.path
    cases = {
        sqlite3.OperationalError("database or disk is full"): "ran out of disk space: free space",
        sqlite3.OperationalError("attempt to write a readonly database"):
            "is read-only (attempt to write a readonly database): make it and its folder writable",
        sqlite3.OperationalError("database is locked"):
            "stayed locked by another process for 60 s: retry when that process is done",
        sqlite3.DatabaseError("database disk image is malformed"):
            "is damaged (database disk image is malformed): delete it",
        sqlite3.OperationalError("disk I/O error"): f"is not usable (disk I/O error): {FIX}",
    }
    for exc, expected in cases.items():
        assert str(cache.error(exc)).startswith(f"score cache {path} {expected}")


# -- concurrent writers ---------------------------------------------------------------------------
def write_batches(path: str, worker: int, batches: int, start) -> None:
    start.wait(60)
    cache = ScoreCache(path)  # every process sets the fresh file up at the same moment
    for b in range(batches):
        cache.put(f"model{worker}", rows(b * 20, 20))
        cache.put("shared", [(f"img{b:05d}", f"prompt {worker}", float(worker))])
        cache.get("shared", [f"img{b:05d}"])
    cache.close()


def test_processes_writing_one_cache_at_once(tmp_path):
    path = tmp_path / "sub" / "scores.sqlite"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers, batches = 3, 40
    procs = [ctx.Process(target=write_batches, args=(str(path), w, batches, start))
             for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    with ScoreCache(path) as cache:
        assert cache.read("PRAGMA integrity_check") == [("ok",)]
        assert cache.count() == workers * batches * 20 + workers * batches
        for w in range(workers):
            got = cache.get(f"model{w}", [f"img{i:05d}" for i in range(batches * 20)])
            assert got == {(i, p): s for i, p, s in rows(0, batches * 20)}
        shared = cache.get("shared", [f"img{b:05d}" for b in range(batches)])
        assert shared == {(f"img{b:05d}", f"prompt {w}"): float(w)
                          for b in range(batches) for w in range(workers)}


# -- callers check the cache before any work ------------------------------------------------------
def test_commands_check_the_cache_before_loading_anything(tmp_path, tia2_dir, monkeypatch):
    from test_cli import harness, one_line_error

    from harness.plugins import get_plugins

    bad = tmp_path / "scores.sqlite"
    bad.write_bytes(b"<html>not a database</html>" * 100)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    expected = f"Error: score cache {bad} is damaged (file is not a database)"
    # The model's checkpoint does not exist: the cache error comes first, before any loading.
    one_line_error(harness("score", "--images", images, "--prompt", "a cat", "--cache", bad,
                           "--model", f"clip:checkpoint={tmp_path / 'none'}"), expected)

    def too_late(*args, **kwargs):
        raise AssertionError("the benchmark was loaded before the score cache was checked")

    monkeypatch.setattr(get_plugins().benchmarks.get("tia2"), "load", too_late)
    one_line_error(harness("leaderboard", "tia2", "--data", tia2_dir, "--out", tmp_path / "out",
                           "--images", images, "--model", f"clip:checkpoint={tmp_path / 'none'}", "--cache", bad), expected)
    assert not (tmp_path / "out").exists()
