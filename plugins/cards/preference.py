"""Preference benchmark formats: ImageReward test, HPD v2 test and Pick-a-Pic v2.

Each format turns a card's files into :class:`harness.types.BenchmarkData` with one row per image
(``binary`` and ``graded`` NaN: these benchmarks have no per-image label) and one row per compared
pair of images of one prompt in ``pairs`` (``label`` 1.0: ``image_a`` preferred, 0.0:
``image_b``, 0.5: a tie).

- ``imagereward_test``: ``test.json``, a list of ``{id, prompt, generations: [path], ranking:
  [int]}``; lower rank is better, equal ranks are a tie. Every pair of images of an item is a pair
  (466 items, 2,720 images, 6,399 untied and 831 tied pairs in the released file).
- ``hpdv2_test``: ``test.json``, a list of ``{prompt, image_path: [str], rank: [number], ...}``
  (the same ranking convention); ``prompt_id`` is the item's position in the file.
- ``pickapic_v2``: the ``test_unique`` and ``validation_unique`` parquet files, one row per pair;
  ``label_0`` is 1 (``jpg_0`` preferred), 0 or 0.5 (a tie). The images stay inside the parquet
  files (``<file name>::<row>/jpg_0``, read by :mod:`harness.images` without unpacking), so the
  images folder is the folder holding the parquet files. Only the label columns are read here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.io import read_json
from harness.types import BenchmarkData
from harness_plugins.cards.card import Card, register_format, required_files

if TYPE_CHECKING:
    import pandas as pd

IMAGE_COLUMNS = ["subset", "prompt_id", "prompt", "image", "binary", "graded"]
PAIR_COLUMNS = ["subset", "prompt_id", "image_a", "image_b", "label"]
#: Columns a Pick-a-Pic parquet file must have (the upstream schema has more).
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def _malformed(path: Path, card: Card, what: str) -> HarnessError:
    return HarnessError(f"malformed annotation file {path}: {what} (re-download it with "
                        f"`harness data download {card.id}` or pass the original file)")


def _rank_label(rank_a: float, rank_b: float) -> float:
    """Lower rank is better: 1.0 when ``a`` is preferred, 0.0 when ``b`` is, 0.5 for a tie."""
    return 1.0 if rank_a < rank_b else 0.0 if rank_a > rank_b else 0.5


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def ranked_lists(items: Sequence[tuple[str, str, list[str], list[float]]], path: Path, card: Card,
                 subsets: Sequence[str]) -> BenchmarkData:
    """Images and all within-item pairs from ``(prompt_id, prompt, images, ranks)`` items (image
    paths as the file gives them, under the card's ``images.root``; rows in the card's first
    subset)."""
    import numpy as np
    import pandas as pd

    subset = card.subsets[0]
    wanted = subset in subsets if subsets else True
    image_rows: list[tuple[str, str, str, str]] = []
    pair_rows: list[tuple[str, str, str, str, float]] = []
    seen: dict[str, str] = {}
    for prompt_id, prompt, images, ranks in items if wanted else []:
        images = [card.image(image) for image in images]
        for image in images:
            if image in seen:
                raise _malformed(path, card, f"image '{image}' is listed twice (items "
                                             f"{seen[image]} and {prompt_id})")
            seen[image] = prompt_id
            image_rows.append((subset, prompt_id, prompt, image))
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                pair_rows.append((subset, prompt_id, images[i], images[j],
                                  _rank_label(ranks[i], ranks[j])))
    frame = pd.DataFrame(image_rows, columns=IMAGE_COLUMNS[:4])
    frame["binary"] = np.nan
    frame["graded"] = np.nan
    pairs = pd.DataFrame(pair_rows, columns=PAIR_COLUMNS)
    pairs["label"] = pairs["label"].astype(np.float64)
    return BenchmarkData(benchmark=card.id, images=frame, pairs=pairs, source=str(path))


@register_format("imagereward_test")
def imagereward_test(files: dict[str, Path], card: Card, subsets: Sequence[str]) -> BenchmarkData:
    """ImageReward's ``test.json`` (file ``annotations``) -> images and ranked pairs."""
    (path,) = required_files(files, card, "annotations")
    raw = read_json(path, "annotation file", "re-download it or pass the original --data folder")
    if not isinstance(raw, list) or not raw:
        raise _malformed(path, card, "expected a non-empty list of {id, prompt, generations, ranking}")
    items = []
    for n, entry in enumerate(raw):
        ok = (isinstance(entry, dict) and isinstance(entry.get("id"), (str, int))
              and isinstance(entry.get("prompt"), str)
              and isinstance(entry.get("generations"), list)
              and isinstance(entry.get("ranking"), list)
              and len(entry["generations"]) == len(entry["ranking"]) >= 2
              and all(isinstance(g, str) and g for g in entry["generations"])
              and all(_is_number(r) for r in entry["ranking"]))
        if not ok:
            raise _malformed(path, card, f"item {n} must be {{id, prompt, generations: [paths], "
                                         "ranking: [numbers]}} with at least 2 images and one "
                                         "rank per image")
        items.append((str(entry["id"]), entry["prompt"], list(entry["generations"]),
                      [float(r) for r in entry["ranking"]]))
    return ranked_lists(items, path, card, subsets)


@register_format("hpdv2_test")
def hpdv2_test(files: dict[str, Path], card: Card, subsets: Sequence[str]) -> BenchmarkData:
    """HPD v2's ``test.json`` (file ``annotations``) -> images and ranked pairs."""
    (path,) = required_files(files, card, "annotations")
    raw = read_json(path, "annotation file", "re-download it or pass the original --data folder")
    if not isinstance(raw, list) or not raw:
        raise _malformed(path, card, "expected a non-empty list of {prompt, image_path, rank}")
    items = []
    for n, entry in enumerate(raw):
        ok = (isinstance(entry, dict) and isinstance(entry.get("prompt"), str)
              and isinstance(entry.get("image_path"), list)
              and isinstance(entry.get("rank"), list)
              and len(entry["image_path"]) == len(entry["rank"]) >= 2
              and all(isinstance(p, str) and p for p in entry["image_path"])
              and all(_is_number(r) for r in entry["rank"]))
        if not ok:
            raise _malformed(path, card, f"item {n} must be {{prompt, image_path: [paths], rank: "
                                         "[numbers]}} with at least 2 images and one rank per image")
        items.append((str(n), entry["prompt"], list(entry["image_path"]),
                      [float(r) for r in entry["rank"]]))
    return ranked_lists(items, path, card, subsets)


def _pickapic_split(path: Path, split: str, card: Card, subset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise _malformed(path, card, f"not a readable parquet file ({exc})") from exc
    absent = [c for c in PICKAPIC_COLUMNS if c not in schema.names]
    if absent:
        raise _malformed(path, card, f"no column(s) {', '.join(absent)}; a Pick-a-Pic file has "
                                     f"{', '.join(PICKAPIC_COLUMNS)}")
    for column in ("jpg_0", "jpg_1"):
        kind = schema.field(column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise _malformed(path, card, f"column {column} is {kind}, expected binary image bytes")
    try:
        table = pq.read_table(path, columns=["caption", "label_0", "label_1"])
    except (OSError, pa.ArrowException) as exc:
        raise _malformed(path, card, f"not a readable parquet file ({exc})") from exc
    captions = table.column("caption").to_pylist()
    label_0 = np.asarray(table.column("label_0").to_pylist(), dtype=np.float64)
    label_1 = np.asarray(table.column("label_1").to_pylist(), dtype=np.float64)
    bad = ~np.isin(label_0, (0.0, 0.5, 1.0)) | (np.abs(label_0 + label_1 - 1.0) > 1e-9)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _malformed(path, card, f"row {row} has label_0={label_0[row]}, label_1={label_1[row]} "
                                     "(expected 1/0, 0/1 or 0.5/0.5)")
    if any(not isinstance(c, str) or not c for c in captions):
        row = next(i for i, c in enumerate(captions) if not isinstance(c, str) or not c)
        raise _malformed(path, card, f"row {row} has no caption")
    rows = np.arange(len(captions))
    image_a = [card.image(f"{path.name}::{r}/jpg_0") for r in rows]
    image_b = [card.image(f"{path.name}::{r}/jpg_1") for r in rows]
    prompt_id = [f"{split}/{r}" for r in rows]
    images = pd.DataFrame({
        "subset": subset,
        "prompt_id": prompt_id + prompt_id,
        "prompt": captions + captions,
        "image": image_a + image_b,
        "binary": np.nan,
        "graded": np.nan,
        "split": split,
    })
    pairs = pd.DataFrame({"subset": subset, "prompt_id": prompt_id, "image_a": image_a,
                          "image_b": image_b, "label": label_0, "split": split})
    return images, pairs


@register_format("pickapic_v2")
def pickapic_v2(files: dict[str, Path], card: Card, subsets: Sequence[str]) -> BenchmarkData:
    """Pick-a-Pic's ``test_unique`` (file ``test``) and ``validation_unique`` (file
    ``validation``) parquet files -> images (inside the parquet files) and one pair per row.

    ``prompt_id`` is ``<split>/<row>``: each row of a ``*_unique`` split is one prompt.
    """
    import pandas as pd

    subset = card.subsets[0]
    test, validation = required_files(files, card, "test", "validation")
    frames, pairs = [], []
    if not subsets or subset in subsets:
        for split, path in (("test", test), ("validation", validation)):
            f, p = _pickapic_split(path, split, card, subset)
            frames.append(f)
            pairs.append(p)
    images = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*IMAGE_COLUMNS, "split"])
    pair_frame = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(
        columns=[*PAIR_COLUMNS, "split"])
    return BenchmarkData(benchmark=card.id, images=images, pairs=pair_frame, source=str(test.parent))
