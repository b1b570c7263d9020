"""Per-image label formats: TIFA v1.0, DSG-TIFA160, SeeTRUE and GenAI-Bench annotation files.

Every parser returns one row per image (:class:`~harness.types.BenchmarkData`): ``binary`` 0/1
(NaN where the benchmark has none), ``graded`` a Likert mean mapped linearly onto [0, 1]
(``(x - 1) / 4`` for a 1-5 scale: correlations and pairwise orders are unchanged) and the
per-annotator ``label_0, label_1, ...`` mapped the same way (NaN where an annotator did not rate
that image). A file that is not shaped like the upstream one is a one-line error naming the file
and what is wrong.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.io import read_json
from harness.types import BenchmarkData
from harness_plugins.cards.card import Card, register_format, required_files

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("harness.cards")

#: Likert 1-5 -> [0, 1].
LIKERT_MIN, LIKERT_MAX = 1.0, 5.0


def _likert(x: float) -> float:
    return (x - LIKERT_MIN) / (LIKERT_MAX - LIKERT_MIN)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_rating(x: Any) -> bool:
    return _is_number(x) and LIKERT_MIN <= x <= LIKERT_MAX


def _bad(path: Path, what: str) -> HarnessError:
    return HarnessError(f"malformed annotation file {path}: {what} (re-download it or pass the "
                        "original --data folder)")


def _json(path: Path) -> Any:
    return read_json(path, "annotation file",
                     "truncated or not JSON; re-download it or pass the original --data folder")


def _csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={c: str for c in columns if c in ("image", "text")},
                            keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _bad(path, f"not a CSV table ({first})") from exc
    except OSError as exc:
        raise HarnessError(f"cannot read annotation file {path}: {exc.strerror or exc}") from exc
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise _bad(path, f"no column(s) {', '.join(absent)} (columns: "
                         f"{', '.join(map(str, frame.columns)) or 'none'})")
    if frame.empty:
        raise _bad(path, "no rows")
    return frame


def _numeric(frame: pd.DataFrame, column: str, path: Path) -> Any:
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    if values.isna().any():
        row = int(values.isna().to_numpy().argmax())
        raise _bad(path, f"column {column} row {row + 2} is {frame[column].iloc[row]!r}, not a number")
    return values.to_numpy(dtype="float64")


def _frame(rows: list[dict[str, Any]], n_labels: int) -> pd.DataFrame:
    """Rows -> the images frame with its dtypes (binary int8 when every row has one)."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame["binary"].notna().all():
        frame["binary"] = frame["binary"].astype(np.int8)
    else:
        frame["binary"] = frame["binary"].astype(np.float64)
    frame["graded"] = frame["graded"].astype(np.float64)
    for k in range(n_labels):
        frame[f"label_{k}"] = frame[f"label_{k}"].astype(np.float64)
    return frame


def _labels(ratings: list[float], n: int) -> dict[str, float]:
    return {f"label_{k}": (_likert(ratings[k]) if k < len(ratings) else float("nan"))
            for k in range(n)}


# -- TIFA v1.0 ----------------------------------------------------------------------------------
def _tifa_records(path: Path) -> dict[str, dict[str, Any]]:
    raw = _json(path)
    if not isinstance(raw, dict) or not raw:
        raise _bad(path, "expected a non-empty object {image key: record}")
    for key, rec in raw.items():
        if not (isinstance(rec, dict)
                and all(isinstance(rec.get(k), str) and rec.get(k) for k in ("text_id", "image_path", "text"))
                and isinstance(rec.get("human_scores"), list) and rec["human_scores"]
                and all(_is_rating(x) for x in rec["human_scores"])
                and _is_rating(rec.get("human_avg"))):
            raise _bad(path, f"entry {key!r} must be {{text_id, image_path, text: str, "
                             "human_scores: [Likert 1-5], human_avg: 1-5}")
    return raw


def tifa_reported(files: dict[str, Path], card: Card, subsets: list[str]) -> pd.DataFrame:
    """The authors' per-image scores: every numeric key of a record other than ``human_avg``
    (caption metrics, ``clipscore_vitb32``, the ``tifa_*`` VQA scores)."""
    import pandas as pd

    (path,) = required_files(files, card, "annotations")
    records = _tifa_records(path)
    first = next(iter(records.values()))
    methods = [k for k, v in first.items() if k != "human_avg" and _is_number(v)]
    rows = []
    for key, rec in records.items():
        for method in methods:
            if not _is_number(rec.get(method)):
                raise _bad(path, f"entry {key!r} has no numeric {method!r}")
            rows.append((card.subsets[0], card.image(rec["image_path"]), method, float(rec[method])))
    return pd.DataFrame(rows, columns=["subset", "image", "method", "score"])


@register_format("tifa_v1", reported=tifa_reported)
def tifa_v1(files: dict[str, Path], card: Card, subsets: list[str]) -> BenchmarkData:
    """``human_annotations_with_scores.json`` (or ``human_annotations.json``): ``{key: {text_id,
    image_path, text, human_scores: [2 Likert ratings], human_avg, <metric>: score ...}}``;
    graded = ``(human_avg - 1) / 4``, one subset, prompts = ``text_id``."""
    (path,) = required_files(files, card, "annotations")
    records = _tifa_records(path)
    n = max(len(r["human_scores"]) for r in records.values())
    rows = [{"subset": card.subsets[0], "prompt_id": rec["text_id"], "prompt": rec["text"],
             "image": card.image(rec["image_path"]), "binary": float("nan"),
             "graded": _likert(float(rec["human_avg"])), **_labels(rec["human_scores"], n)}
            for rec in records.values()]
    return BenchmarkData(benchmark=card.id, images=_frame(rows, n))


# -- DSG re-annotation of TIFA160 --------------------------------------------------------------------
#: dsg_tifa160_anns.csv ``model_type`` -> the generator names of tifa160.json's keys.
DSG_MODELS = {
    "mini-dalle": "mini_dalle", "vq-diffusion": "vq_diffusion", "sd1dot1": "stable_diffusion_v1_1",
    "sd1dot5": "stable_diffusion_v1_5", "sd2dot1": "stable_diffusion_v2_1",
}


@register_format("dsg_tifa160")
def dsg_tifa160(files: dict[str, Path], card: Card, subsets: list[str]) -> BenchmarkData:
    """``dsg_tifa160_anns.csv`` (one row per image and worker: model_type, source_id, worker_id,
    answer 1-5) and ``tifa160.json`` (``{key: {text_id, image_path, text}}``): graded = the mean
    of an image's answers (3-5 workers), mapped to [0, 1]; ``label_k`` = worker ``k``'s answer
    (workers in id order, NaN where they did not rate the image); rows in tifa160.json order."""
    import numpy as np

    csv_path, items_path = required_files(files, card, "annotations", "items")
    items = _json(items_path)
    if not isinstance(items, dict) or not items or not all(
            isinstance(v, dict) and all(isinstance(v.get(k), str) and v.get(k)
                                        for k in ("text_id", "image_path", "text"))
            for v in items.values()):
        raise _bad(items_path, "expected {image key: {text_id, image_path, text}}")
    anns = _csv(csv_path, ("model_type", "source_id", "worker_id", "answer"))
    answers = _numeric(anns, "answer", csv_path)
    bad = ~((answers >= LIKERT_MIN) & (answers <= LIKERT_MAX))
    if bad.any():
        raise _bad(csv_path, f"answer {answers[bad][0]:g} is not a Likert rating 1-5")
    unknown = sorted(set(anns["model_type"].astype(str)) - set(DSG_MODELS))
    if unknown:
        raise _bad(csv_path, f"model_type {unknown[0]!r} is not one of {', '.join(DSG_MODELS)}")
    keys = anns["source_id"].astype(str) + "_" + anns["model_type"].astype(str).map(DSG_MODELS)
    stray = sorted(set(keys) - set(items))
    if stray:
        raise _bad(csv_path, f"image {stray[0]!r} is not in {items_path.name}")
    unrated = [k for k in items if k not in set(keys)]
    if unrated:
        raise _bad(csv_path, f"image {unrated[0]!r} of {items_path.name} has no answers")
    workers = sorted(set(anns["worker_id"].astype(str)))
    frame = anns.assign(key=keys.to_numpy(), answer=answers, worker=anns["worker_id"].astype(str))
    if frame.duplicated(["key", "worker"]).any():
        row = frame[frame.duplicated(["key", "worker"])].iloc[0]
        raise _bad(csv_path, f"worker {row['worker']} rated image {row['key']!r} twice")
    table = frame.pivot(index="key", columns="worker", values="answer").reindex(
        index=list(items), columns=workers)
    ratings = table.to_numpy(np.float64)
    rows = []
    for key, row in zip(items, ratings, strict=True):
        rec = items[key]
        rows.append({"subset": card.subsets[0], "prompt_id": rec["text_id"], "prompt": rec["text"],
                     "image": card.image(rec["image_path"]), "binary": float("nan"),
                     "graded": _likert(float(np.nanmean(row))),
                     **{f"label_{k}": _likert(v) for k, v in enumerate(row)}})
    return BenchmarkData(benchmark=card.id, images=_frame(rows, len(workers)))


# -- SeeTRUE --------------------------------------------------------------------------------------
@register_format("seetrue")
def seetrue(files: dict[str, Path], card: Card, subsets: list[str]) -> BenchmarkData:
    """``SeeTRUE.csv`` (image, text, label 0/1, original_dataset_id, dataset_source): one subset
    per ``dataset_source``, binary = label, prompts = the text, images by file name."""
    import numpy as np

    (path,) = required_files(files, card, "annotations")
    frame = _csv(path, ("image", "text", "label", "dataset_source"))
    labels = _numeric(frame, "label", path)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise _bad(path, f"label {labels[~np.isin(labels, (0.0, 1.0))][0]:g} is not 0 or 1")
    empty = (frame["image"].astype(str) == "") | (frame["text"].astype(str) == "")
    if empty.any():
        raise _bad(path, f"row {int(empty.to_numpy().argmax()) + 2} has an empty image or text")
    rows = [{"subset": str(s), "prompt_id": str(t), "prompt": str(t), "image": card.image(str(i)),
             "binary": int(y), "graded": float("nan")}
            for s, t, i, y in zip(frame["dataset_source"], frame["text"], frame["image"], labels,
                                  strict=True)]
    return BenchmarkData(benchmark=card.id, images=_frame(rows, 0))


# -- GenAI-Bench (Lin et al.) --------------------------------------------------------------------------
@register_format("genai_bench")
def genai_bench(files: dict[str, Path], card: Card, subsets: list[str]) -> BenchmarkData:
    """``genai_image.json``: ``{prompt index: {prompt, models: {generator: [Likert 1-5 ratings]}}}``;
    images ``<generator>/<index>.jpeg`` (one zip per generator), graded = the mean rating mapped
    to [0, 1]; rows generator-major as upstream. A generator with no ratings for a prompt has no
    image row (as upstream skips a missing generator)."""
    (path,) = required_files(files, card, "annotations")
    raw = _json(path)
    if not isinstance(raw, dict) or not raw:
        raise _bad(path, "expected a non-empty object {prompt index: {prompt, models}}")
    generators: list[str] = []
    for idx, rec in raw.items():
        models = rec.get("models") if isinstance(rec, dict) else None
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"]
                and isinstance(models, dict)
                and all(isinstance(v, list) and all(_is_rating(x) for x in v) for v in models.values())):
            raise _bad(path, f"entry {idx!r} must be {{prompt: str, models: {{generator: "
                             "[Likert 1-5 ratings]}}}")
        generators += [g for g in models if g not in generators]
    rows, skipped = [], 0
    n = max((len(v) for rec in raw.values() for v in rec["models"].values()), default=0)
    for gen in generators:
        for idx, rec in raw.items():
            ratings = rec["models"].get(gen)
            if not ratings:
                skipped += ratings is not None
                continue
            rows.append({"subset": card.subsets[0], "prompt_id": str(idx), "prompt": rec["prompt"],
                         "image": card.image(f"{gen}/{idx}.jpeg"), "binary": float("nan"),
                         "graded": _likert(sum(ratings) / len(ratings)), **_labels(ratings, n)})
    if skipped:
        log.warning("%s: %d images of %s have an empty rating list and are left out",
                    card.id, skipped, path)
    if not rows:
        raise _bad(path, "no rated images")
    return BenchmarkData(benchmark=card.id, images=_frame(rows, n))
