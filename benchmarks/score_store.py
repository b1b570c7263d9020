"""The compact score store against the store it replaced, side by side in one run.

Writes the scores of one model on the TIA2 TextNorm shape (550 prompts x 50 images = 27,500
images, each scored against its prompt and 32 contrastive prompts: 907,500 (image, prompt) pairs;
``--fraction`` takes a slice of the prompts) through :class:`LegacyScoreCache` (a copy of the
version-1 store: one row of strings per pair, written on the caller's thread) and through
:class:`harness.scoring.cache.ScoreCache` (one row of ids and a float64 blob per image and prompt
set, written by a writer thread), in batches of 16 images as the scorer writes them, each store in
a fresh file. Prints per store: bytes per pair (the file and its -wal after a checkpoint, over the
pairs), inserts/s (pairs over the seconds from the first put until everything is committed), the
seconds the caller's thread spent in ``put``, and the seconds to read every score back
(``get`` over all images from a fresh open); then the new store's ratios to the old one. Both stores
must read back the same numbers.

    python benchmarks/score_store.py [--fraction 0.1] [--batch 16]
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.scoring.cache import ScoreCache, SQLiteCache  # noqa: E402

PROMPTS, PER_PROMPT, CONTRASTIVE = 550, 50, 32


class LegacyScoreCache(SQLiteCache):
    """Today's store before issue 14 (schema version 1), kept here only to measure against:
    one SQLite row of strings per (model, image, prompt) score, written on the caller's thread."""

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


def workload(fraction: float, batch: int, seed: int = 0):
    """``(model key, image hashes, batches of (image hash, prompt, score) rows)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_prompts = max(1, round(PROMPTS * fraction))
    rows, images = [], []
    for p in range(n_prompts):
        own = f"a photo of {p % 10 + 1} red apples and a green pear on a wooden kitchen table ({p})"
        prompts = [own] + [f"{own}, contrastive variant {k}" for k in range(CONTRASTIVE)]
        for j in range(PER_PROMPT):
            image = hashlib.sha256(f"tia2 image {p} {j}".encode()).hexdigest()
            images.append(image)
            rows.extend(zip([image] * len(prompts), prompts,
                            rng.normal(0.25, 0.05, len(prompts)).tolist(), strict=True))
    key = "clip:" + hashlib.sha256(b"model key parts").hexdigest()
    step = batch * (1 + CONTRASTIVE)
    return key, images, [rows[lo : lo + step] for lo in range(0, len(rows), step)]


def on_disk(path: Path) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def measure(cls: type, path: Path, key: str, images: Sequence[str],
            batches: Iterable[list]) -> tuple[dict, dict]:
    pairs = 0
    in_put = 0.0
    start = time.perf_counter()
    with cls(path) as store:
        for rows in batches:
            t0 = time.perf_counter()
            store.put(key, rows)
            in_put += time.perf_counter() - t0
            pairs += len(rows)
    write = time.perf_counter() - start  # close() returns once everything is committed
    t0 = time.perf_counter()
    with cls(path) as store:
        got = store.get(key, images)
    read = time.perf_counter() - t0
    return {"pairs": pairs, "bytes_per_pair": on_disk(path) / pairs, "inserts_per_s": pairs / write,
            "caller_s": in_put, "write_s": write, "read_s": read}, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="slice of TIA2's 550 prompts")
    parser.add_argument("--batch", type=int, default=16, help="images per put (the scorer's batch)")
    args = parser.parse_args()
    key, images, batches = workload(args.fraction, args.batch)
    print(f"workload: {len(images)} images x {1 + CONTRASTIVE} prompts = "
          f"{sum(map(len, batches))} pairs, 1 model, {len(batches)} batches of {args.batch} images")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("old", LegacyScoreCache), ("new", ScoreCache)):
            out[name], got = measure(cls, Path(tmp) / f"{name}.sqlite", key, images, batches)
            if name == "old":
                reference = got
            elif got != reference:
                raise SystemExit("the two stores read back different scores")
            del got
    print(f"{'store':<6}{'bytes/pair':>12}{'inserts/s':>12}{'put s':>9}{'write s':>9}{'read s':>9}")
    for name, r in out.items():
        print(f"{name:<6}{r['bytes_per_pair']:>12.1f}{r['inserts_per_s']:>12,.0f}{r['caller_s']:>9.2f}"
              f"{r['write_s']:>9.2f}{r['read_s']:>9.2f}")
    old, new = out["old"], out["new"]
    print(f"new/old: bytes per pair x{new['bytes_per_pair'] / old['bytes_per_pair']:.3f} "
          f"(target <= 40 bytes: {new['bytes_per_pair']:.1f}), inserts/s "
          f"x{new['inserts_per_s'] / old['inserts_per_s']:.1f} (target >= 10), caller's time in put "
          f"x{new['caller_s'] / old['caller_s']:.3f}, read-back time x{new['read_s'] / old['read_s']:.2f}")


if __name__ == "__main__":
    main()
