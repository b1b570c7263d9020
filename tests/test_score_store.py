"""The compact score store (schema version 2): bytes per pair on the TIA2 TextNorm shape, exact
round trips, writes off the caller's thread, writer failures raised at the next call, and what a
killed or exiting process leaves in the file."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.scoring.cache import ScoreCache

FIX = "pass --cache with another file, or --no-cache"
KEY = "clip:" + "ab" * 32


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def tia2_rows(n_prompts: int, per_prompt: int = 50, contrastive: int = 32, seed: int = 0):
    """Batches of 16 images as ScorePlan.accept writes them: TIA2's prompts x 50 images, each image
    scored against its prompt and the prompt's 32 contrastive prompts."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        prompts = [f"a photo of {p} red apples on a wooden table"] + [
            f"a photo of {p} red apples on a wooden table, variant {k}" for k in range(contrastive)]
        for j in range(per_prompt):
            image = sha(p * per_prompt + j)
            rows.extend(zip([image] * len(prompts), prompts, rng.normal(size=len(prompts)).tolist(),
                            strict=True))
    step = 16 * (1 + contrastive)
    return [rows[lo : lo + step] for lo in range(0, len(rows), step)]


def on_disk(path: Path) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_tia2_shape_takes_under_40_bytes_per_pair_and_reads_back_exactly(tmp_path):
    path = tmp_path / "scores.sqlite"
    batches = tia2_rows(20)  # 1,000 images x 33 prompts
    with ScoreCache(path) as cache:
        for batch in batches:
            cache.put(KEY, batch)
            cache.put(KEY + "#std", [(i, p, abs(s)) for i, p, s in batch])
    pairs = 2 * sum(map(len, batches))
    assert pairs == 2 * 1000 * 33
    per_pair = on_disk(path) / pairs
    assert per_pair < 40, per_pair
    with ScoreCache(path) as cache:
        images = [sha(i) for i in range(1000)]
        expected = {(i, p): s for batch in batches for i, p, s in batch}
        assert cache.get(KEY, images) == expected  # float64: the very numbers stored
        assert cache.get(KEY + "#std", images) == {k: abs(v) for k, v in expected.items()}
        assert cache.count(KEY) == cache.count(KEY + "#std") == 33_000
        assert cache.count() == pairs
        # One row per (model, image); one prompt set per TIA2 prompt; hashes as 32 bytes.
        assert cache.read("SELECT COUNT(*) FROM scores")[0][0] == 2000
        assert cache.read("SELECT COUNT(*) FROM prompt_sets")[0][0] == 20
        assert cache.read("SELECT COUNT(*) FROM prompts")[0][0] == 20 * 33
        assert cache.read("SELECT DISTINCT typeof(image), length(image) FROM scores") == [("blob", 32)]


def test_image_keys_that_are_not_hex_digests_round_trip(tmp_path):
    keys = ["img00001", sha(1).upper(), sha(2), "ünïcode ✓"]
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        cache.put("m", [(k, "a cat", float(n)) for n, k in enumerate(keys)])
        assert cache.get("m", keys + ["missing"]) == {(k, "a cat"): float(n) for n, k in enumerate(keys)}
        assert sorted(cache.read("SELECT typeof(image) FROM scores")) == [("blob",), ("text",),
                                                                          ("text",), ("text",)]


def test_another_prompt_list_for_a_cached_image(tmp_path):
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        cache.put("m", [("img", "a", 1.0), ("img", "b", 2.0)])
        cache.put("m", [("img", "b", 2.5), ("img", "c", 3.0)])  # b again, in another prompt set
        cache.put("m", [("img", "a", 1.0), ("img", "b", 2.0)])  # the first set rewritten
        assert cache.get("m", ["img"]) == {("img", "a"): 1.0, ("img", "b"): 2.0, ("img", "c"): 3.0}
        assert cache.count("m") == 3 and cache.count() == 3
        cache.put("m", [("img", "a", 7.0), ("img", "a", 8.0)])  # one prompt twice in a batch
        assert cache.get("m", ["img"])[("img", "a")] == 8.0
        assert cache.count("m") == 3 and cache.count("other") == 0


def test_put_returns_while_the_writer_waits_and_flush_stores(tmp_path):
    path = tmp_path / "s.sqlite"
    cache = ScoreCache(path)
    cache.put("m", [("img0", "a", 0.5)])
    cache.flush()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    for b in range(1, 4):
        cache.put("m", [(f"img{b}", "a", b / 3)])  # queued: the caller does not wait for the lock
    assert other.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 1
    other.execute("COMMIT")
    other.close()
    cache.flush()
    assert cache.count() == 4
    assert cache.get("m", [f"img{b}" for b in range(4)]) == {
        (f"img{b}", "a"): 0.5 if b == 0 else b / 3 for b in range(4)}
    cache.close()


def test_a_writer_failure_is_raised_at_the_next_put_and_the_queue_behind_it_dropped(tmp_path):
    path = tmp_path / "s.sqlite"
    cache = ScoreCache(path)
    go = threading.Event()
    go.set()
    store = cache._w._store

    def waits_for_go(batches):
        go.wait(60)
        store(batches)

    cache._w._store = waits_for_go
    cache.put("m", [(f"img{i}", "a", float(i)) for i in range(100)])
    cache.flush()
    pages = cache.read("PRAGMA page_count")[0][0]
    cache.wconn.execute(f"PRAGMA max_page_count = {pages + 1}")
    go.clear()  # the batches below queue up behind the first
    big = [(sha(i), "a long prompt about a cat " * 5, float(i)) for i in range(3000)]
    cache.put("m", big)
    cache.put("m", [("img-after", "a", 1.0)])  # queued behind the failing batch
    go.set()
    cache._queue.join()
    with pytest.raises(HarnessError) as err:
        cache.put("m", [("img-next", "a", 1.0)])
    text = str(err.value)
    assert "\n" not in text
    assert text == (f"score cache {path} ran out of disk space while storing a batch of scores "
                    f"(that batch was rolled back; scores stored before it are kept): free space, "
                    f"or {FIX}")
    assert cache.count() == 100
    assert cache.get("m", ["img-after", "img-next"]) == {}
    cache.wconn.execute("PRAGMA max_page_count = 1073741823")
    cache.put("m", [("img-again", "a", 2.0)])
    assert cache.get("m", ["img-again"]) == {("img-again", "a"): 2.0}
    # A failure at close is raised too, after the file is closed.
    cache.flush()
    cache.wconn.execute(f"PRAGMA max_page_count = {cache.read('PRAGMA page_count')[0][0]}")
    cache.put("m", big)
    with pytest.raises(HarnessError, match="ran out of disk space"):
        cache.close()
    with pytest.raises(HarnessError, match=f"score cache {path} is closed"):
        cache.put("m", [("x", "a", 1.0)])
    with ScoreCache(path) as again:
        assert again.count() == 101
        assert again.read("PRAGMA integrity_check") == [("ok",)]


def killed_writer(path: str, batches: int, flushed: int) -> None:
    cache = ScoreCache(path)
    for b in range(batches):
        cache.put("m", [(sha(b * 10 + i), f"prompt {k}", b + i / 10 + k / 100)
                        for i in range(10) for k in range(5)])
        if b + 1 == flushed:
            cache.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # batches still queued or being written are lost


def test_a_killed_process_keeps_every_committed_batch_whole(tmp_path):
    path = tmp_path / "s.sqlite"
    proc = multiprocessing.get_context("spawn").Process(target=killed_writer,
                                                        args=(str(path), 200, 50))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    with ScoreCache(path) as cache:
        assert cache.read("PRAGMA integrity_check") == [("ok",)]
        stored = cache.count()
        assert stored % 50 == 0 and 50 * 50 <= stored <= 200 * 50  # whole batches only
        got = cache.get("m", [sha(i) for i in range(2000)])
        assert got == {(sha(b * 10 + i), f"prompt {k}"): b + i / 10 + k / 100
                       for b in range(stored // 50) for i in range(10) for k in range(5)}


def test_an_exiting_process_stores_what_it_queued_without_close(tmp_path):
    path = tmp_path / "s.sqlite"
    code = ("import sys; from harness.scoring.cache import ScoreCache\n"
            "cache = ScoreCache(sys.argv[1])\n"
            "for b in range(300):\n"
            "    cache.put('m', [(f'img{b}-{i}', 'a cat', b + i / 100) for i in range(50)])\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
    with ScoreCache(path) as cache:
        assert cache.count() == 300 * 50
        assert cache.get("m", ["img299-49"]) == {("img299-49", "a cat"): 299.49}


def test_a_dropped_unclosed_cache_stores_its_queue_and_its_writer_ends(tmp_path):
    path = tmp_path / "s.sqlite"
    cache = ScoreCache(path)
    for b in range(20):
        cache.put("m", [(f"img{b}-{i}", "a cat", b + i / 100) for i in range(50)])
    writer = cache._writer
    del cache  # as score_images does with a cache it opened from a path
    gc.collect()
    writer.join(30)
    assert not writer.is_alive()
    with ScoreCache(path) as again:
        assert again.count() == 20 * 50


def test_put_sets_stores_exactly_what_put_stores(tmp_path):
    """The scoring thread's per-image fast path and the per-pair API give the same cache."""
    import numpy as np

    from harness.scoring.cache import ScoreCache

    rng = np.random.default_rng(0)
    items = [(f"{i:064x}", [f"p{j}" for j in range(1 + i % 4)], rng.normal(size=1 + i % 4)) for i in range(40)]
    items.append((f"{3:064x}", ["p0", "other"], np.array([0.5, -1.25])))  # another prompt set, same image
    with ScoreCache(tmp_path / "a.sqlite") as a, ScoreCache(tmp_path / "b.sqlite") as b:
        a.put_sets("m", items)
        b.put("m", [(h, p, float(v)) for h, ps, vs in items for p, v in zip(ps, vs, strict=True)])
        a.flush()
        b.flush()
        hashes = sorted({h for h, _, _ in items})
        assert a.get("m", hashes) == b.get("m", hashes) and len(a.get("m", hashes)) == a.count("m")
        with pytest.raises(ValueError, match="1 scores for 2 prompts"):
            a.put_sets("m", [(f"{1:064x}", ["x", "y"], np.array([1.0]))])


def test_image_key_fast_path_maps_every_key_as_the_regex_did():
    """The hex-digest test without a regex stores exactly the keys the regex stored as bytes."""
    import re

    from harness.scoring.cache import _image_key

    def regex_key(image: str) -> str | bytes:  # the mapping before the fast path
        return bytes.fromhex(image) if len(image) == 64 and re.fullmatch(r"[0-9a-f]{64}", image) \
            else image

    digest = sha(7)
    keys = [digest, digest.upper(), digest[:-1] + "A", digest[:-1], digest + "0", "",
            digest[:30] + " " + digest[31:], digest[:30] + "\t" + digest[31:],
            digest[:62] + "  ", " " + digest[1:], digest[:62] + "\n0", "g" * 64, "0" * 64,
            "f" * 64, "F" * 64, "٣" * 64, digest[:63] + "٣", "img00001", "ünïcode ✓",
            "0x" + digest[2:], digest[:32] + "-" + digest[33:]]
    for key in keys:
        got, want = _image_key(key), regex_key(key)
        assert type(got) is type(want) and got == want, key
    assert _image_key(digest) == bytes.fromhex(digest) and len(_image_key(digest)) == 32


def test_put_sets_stores_the_values_given_and_copies_them(tmp_path):
    """The caller may change its arrays right after put_sets (float64, float32, lists and
    [P, 1] arrays are all accepted)."""
    rng = np.random.default_rng(1)
    given = [rng.normal(size=3), rng.normal(size=3).astype(np.float32), [0.25, -1.5, 2.0],
             rng.normal(size=(3, 1))]
    want = {(sha(i), p): float(v) for i, vs in enumerate(given)
            for p, v in zip("abc", np.asarray(vs, dtype=np.float64).reshape(-1), strict=True)}
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        cache.put_sets("m", [(sha(i), ("a", "b", "c"), vs) for i, vs in enumerate(given)])
        for vs in given:
            if isinstance(vs, np.ndarray):
                vs[...] = 99.0  # the cache took a copy
        assert cache.get("m", [sha(i) for i in range(len(given))]) == want


def test_put_sets_batches_the_fast_path_leaves_to_the_merge(tmp_path):
    """An image twice in one batch, a prompt twice in a set: stored as put stores them."""
    items = [(sha(1), ["a", "b"], np.array([1.0, 2.0])),
             (sha(2), ["a", "a", "b"], np.array([3.0, 4.0, 5.0])),  # a twice: the last wins
             (sha(1), ["b", "c"], np.array([6.0, 7.0])),  # sha(1) again in the batch
             (sha(3), ("a", "b"), np.array([8.0, 9.0]))]
    with ScoreCache(tmp_path / "a.sqlite") as a, ScoreCache(tmp_path / "b.sqlite") as b:
        a.put_sets("m", items)
        a.put_sets("m", [(sha(4), ["a", "b"], np.array([1.5, 2.5]))])  # the fast path after it
        b.put("m", [(h, p, float(v)) for h, ps, vs in items for p, v in zip(ps, vs, strict=True)])
        b.put("m", [(sha(4), "a", 1.5), (sha(4), "b", 2.5)])
        hashes = [sha(i) for i in range(1, 5)]
        assert a.get("m", hashes) == b.get("m", hashes)
        assert a.get("m", [sha(2)]) == {(sha(2), "a"): 4.0, (sha(2), "b"): 5.0}
        assert a.count("m") == b.count("m") == 3 + 2 + 2 + 2


def test_the_writer_gathers_batches_but_flush_does_not_wait_for_more(tmp_path, monkeypatch):
    """The writer waits up to ``linger`` for more batches to commit together; ``flush`` (and
    ``get``, ``count``, ``close``) asks it to commit at once, and batches still gathered are
    stored whole with the rest."""
    import time

    from harness.scoring import cache as cache_module

    monkeypatch.setattr(cache_module._Writer, "linger", 60.0)
    monkeypatch.setattr(cache_module._Writer, "gather", 1000)
    with ScoreCache(tmp_path / "s.sqlite") as cache:
        t0 = time.perf_counter()
        for b in range(5):
            cache.put_sets("m", [(sha(b), ["a", "b"], np.array([b, b + 0.5]))])
        assert cache.count("m") == 10
        cache.put_sets("m", [(sha(9), ["a"], np.array([9.0]))])
        assert cache.get("m", [sha(9)]) == {(sha(9), "a"): 9.0}
        assert time.perf_counter() - t0 < 30  # neither waited for the 60 s linger
    with ScoreCache(tmp_path / "s.sqlite") as again:
        assert again.count("m") == 11
