"""The HTML report of a run folder: ``<run>/report/index.html`` and its pages.

Rendered from the run folder's files alone, so ``harness report RUN`` rebuilds it: the
leaderboard (``leaderboard.json``, ``manifest.json``), the per-prompt metrics
(``per_prompt.csv``), the plots (``plots/*.png``, linked, not copied) and, for runs that scored
reward models, the scores (``scores.parquet``) and the evaluated images' human labels and paths
(``labels.parquet``, written by :func:`harness.evaluation.report.write_run`; for older runs the
labels are read again from the benchmark the manifest names). The report opens from the file
system with no server and no network: plain HTML, one stylesheet and one script beside it, and
thumbnails (``report/thumbs/<hash>.jpg``, at most :data:`THUMB_PX` pixels a side) made from the
run's images.

Pages:

- ``index.html``: the protocol, one sortable table per subset (every metric with its interval;
  ECE and Brier score when the rows carry calibration), the plots, the reliability diagrams and,
  with scores, every prompt with its per-prompt headline metric per scored method;
- ``prompts/<subset>-<n>.html`` (with scores): the prompt's images ordered by a scored method's
  score, each marked with its human labels;
- ``disagreements.html`` (with scores): per method, the images whose rank within their prompt
  most contradicts the human label.

A card's border says how the model's ranking and the humans relate: green (aligned by the
majority of annotators), green dashed (aligned, ranked in the model's bottom half), red (not
aligned, ranked in the model's top half: the model is wrong where it matters), grey (not
aligned, bottom half). Disagreement is ``|percentile rank of the score within the prompt -
human score|``, the human score being the graded label (the annotators' mean) where the
benchmark has one, else the binary label.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.io import current_umask, read_json, write_text

REPORT_DIR = "report"
LABELS_FILE = "labels.parquet"
THUMB_PX = 160  #: longest side of a thumbnail, in pixels
TOP_DISAGREEMENTS = 60  #: images per method on the disagreements page

#: metric -> (column heading, what the number means)
METRIC_TEXT = {
    "auroc": ("AUROC", "area under the ROC curve of the score against the binary human label: the "
                       "chance an aligned image outscores a misaligned one of the same prompt"),
    "auprc": ("AUPRC", "area under the precision-recall curve (average precision) of the score "
                       "against the binary human label"),
    "ap5": ("AP@5", "average precision among the 5 highest-scored images"),
    "ap10": ("AP@10", "average precision among the 10 highest-scored images"),
    "ap25": ("AP@25", "average precision among the 25 highest-scored images"),
    "spearman": ("Spearman", "rank correlation of the score with the graded human label"),
    "kendall": ("Kendall", "Kendall tau-b of the score with the graded human label"),
    "pearson": ("Pearson", "linear correlation of the score with the human rating"),
    "pairwise_acc": ("Pairwise acc", "tie-optimised pairwise accuracy against the human rating"),
    "accuracy": ("Accuracy", "share of human-judged pairs whose preferred image the model scores "
                             "higher"),
    "accuracy_ties_dropped": ("Acc (no ties)", "accuracy with tied human pairs dropped; a model "
                                               "tie counts as wrong"),
    "ece": ("ECE", "expected calibration error of the method's probabilities against the binary "
                   "human label (equal-mass bins; lower is better)"),
    "brier": ("Brier", "mean squared error of the method's probabilities against the binary human "
                       "label (lower is better)"),
}
LOWER_IS_BETTER = ("ece", "brier")
SOURCE_TEXT = {
    "reported": "the per-prompt numbers the benchmark's authors released",
    "scored": "computed by this run from the model's scores",
    "oracle": "hyperparameters tuned on the test labels (an upper bound, not a fair comparison)",
    "human": "leave-one-annotator-out agreement: one annotator against the others",
}
#: card class -> (legend text, what it means)
BORDERS = {
    "pos": "aligned (human majority), in the model's top half",
    "pos-low": "aligned, but ranked in the model's bottom half",
    "neg-high": "not aligned, but ranked in the model's top half",
    "neg": "not aligned, in the model's bottom half",
    "unk": "no binary human label",
}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def level(confidence: float) -> str:
    return f"{100 * confidence:.10g}%"


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _fmt(value: Any, digits: int = 4) -> str:
    v = _num(value)
    return "–" if v is None else f"{v:.{digits}f}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def thumb_name(subset: str, image: str) -> str:
    """The thumbnail file of an image: ``<sha1(subset/image)[:16]>.jpg``."""
    return hashlib.sha1(f"{subset}/{image}".encode()).hexdigest()[:16] + ".jpg"


# -- the images' labels and paths ----------------------------------------------------------------
def image_labels(manifest: dict[str, Any], keys: pd.DataFrame) -> pd.DataFrame:
    """The human labels of the images in ``keys`` (``subset, prompt, image``), read from the
    benchmark the run's manifest names: ``subset, prompt, image, binary, graded, label_*`` and,
    when the run had an images folder, ``path`` (where the image was read) and ``relpath`` (the
    same under that folder)."""
    from harness.evaluation.contrastive import construct
    from harness.plugins import get_plugins

    data = manifest.get("data") or {}
    given = (manifest.get("config") or {}).get("data") or {}
    bench = construct(get_plugins().benchmarks.get(data.get("benchmark") or given.get("benchmark")),
                      {}, {"data_dir": given.get("data")})
    frame = bench.load(list(data.get("subsets") or given.get("subsets") or bench.subsets)).images
    columns = ["subset", "prompt", "image", "binary", "graded",
               *sorted((c for c in frame.columns if re.fullmatch(r"label_\d+", str(c))),
                       key=lambda c: int(str(c)[6:]))]
    frame = frame[[c for c in columns if c in frame.columns]].astype({"subset": str})
    keys = keys[["subset", "prompt", "image"]].drop_duplicates().astype({"subset": str})
    frame = frame.merge(keys, on=["subset", "prompt", "image"], how="inner")
    if given.get("images"):
        root = Path(given["images"]).expanduser()
        frame["path"] = [str(bench.image_path(root, s, i))
                         for s, i in zip(frame["subset"], frame["image"], strict=True)]
        frame["relpath"] = [_relative(p, root) for p in frame["path"]]
    return frame.reset_index(drop=True)


def _relative(path: str, root: Path) -> str:
    with contextlib.suppress(ValueError):
        return Path(path).relative_to(root).as_posix()
    return ""


def _thumbnail(source: str, dest: Path) -> bool:
    """Write a JPEG thumbnail of ``source`` to ``dest``; False when it cannot be read.

    Decoded here rather than by :func:`harness.images.open_image`, which is not thread-safe (it
    swaps the process's warning filters), and at reduced scale where the format allows (JPEG's
    draft mode); wide samples are scaled to 8 bits as for scoring. Thumbnails change no number.
    """
    import io

    from PIL import Image

    from harness.images import as_8bit, read_image_bytes, split_member
    from harness.types import to_rgb

    try:
        with Image.open(io.BytesIO(read_image_bytes(source)) if split_member(source) else source) as img:
            img.draft("RGB", (THUMB_PX, THUMB_PX))  # never below THUMB_PX a side
            img.load()
            image = to_rgb(as_8bit(img)).copy()
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
        image.save(dest, format="JPEG", quality=82)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        return False
    return True


def _write_thumbnails(paths: dict[str, str], folder: Path) -> set[str]:
    """``{thumbnail name: image path}`` -> the names written (readable images)."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(paths)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(lambda n: _thumbnail(paths[n], folder / n), names))
    return {n for n, good in zip(names, ok, strict=True) if good}


# -- reading the run folder -----------------------------------------------------------------------
class _Run:
    """What the report shows of a run folder."""

    def __init__(self, run_dir: Path, images_root: Path | None, method: str | None):
        self.dir = run_dir
        self.manifest = read_json(run_dir / "manifest.json", "run file",
                                  "give a folder written by harness leaderboard")
        self.rows: list[dict[str, Any]] = read_json(run_dir / "leaderboard.json", "run file",
                                                    "give a folder written by harness leaderboard")
        report = self.manifest.get("report") or {}
        self.title = report.get("title") or "leaderboard"
        self.notes = [str(n) for n in report.get("notes", [])]
        self.confidence = float(report.get("confidence", 0.95))
        protocol = (self.manifest.get("data") or {}).get("protocol") or {}
        self.protocol_text = report.get("protocol") or protocol.get("text") or next(
            (n[len("protocol: "):] for n in self.notes if n.startswith("protocol: ")), "")
        self.headline = report.get("headline") or protocol.get("headline")
        self.preference = protocol.get("family") == "preference"
        self.metrics = self._metrics(protocol.get("metrics") or [])
        self.per_prompt = _read_csv(run_dir / "per_prompt.csv")
        self.images: pd.DataFrame | None = None
        self.methods: list[str] = []
        self.image_note = ""
        self._load_images(images_root, method)

    def _metrics(self, declared: Sequence[str]) -> list[str]:
        keys = {k for row in self.rows for k in row}
        known = [m for m in declared if m in keys]
        extra = [k for k in dict.fromkeys(k for row in self.rows for k in row)
                 if f"{k}_ci" in keys and k not in known and k not in LOWER_IS_BETTER]
        metrics = known + extra
        if self.headline in metrics:  # the headline first
            metrics.remove(self.headline)
            metrics.insert(0, self.headline)
        return metrics + [m for m in LOWER_IS_BETTER if m in keys]

    @property
    def subsets(self) -> list[str]:
        return list(dict.fromkeys(str(r["subset"]) for r in self.rows))

    def _load_images(self, images_root: Path | None, method: str | None) -> None:
        path = self.dir / "scores.parquet"
        if not path.is_file():
            self.image_note = ("No reward model was scored in this run (no scores.parquet), so "
                               "there are no image pages.")
            for flag, given in (("--method", method), ("--images", images_root)):
                if given is not None:
                    raise HarnessError(f"{flag} '{given}': this run scored no reward model, so it has "
                                       f"no image pages; drop {flag}")
            return
        scores = pd.read_parquet(path)
        if "column" in scores:
            scores = scores[scores["column"] == 0]
        scores = scores[["subset", "prompt", "image", "method", "score"]].astype({"subset": str})
        self.methods = list(dict.fromkeys(scores["method"].astype(str)))
        if method is not None:
            if method not in self.methods:
                raise HarnessError(f"--method '{method}' is not a scored method of this run; "
                                   f"choose one of {', '.join(self.methods)}")
            self.methods.remove(method)
            self.methods.insert(0, method)
        labels_path = self.dir / LABELS_FILE
        if labels_path.is_file():
            labels = pd.read_parquet(labels_path).astype({"subset": str})
        else:
            try:
                labels = image_labels(self.manifest, scores)
            except HarnessError as exc:
                self.image_note = (f"The images' human labels could not be read ({exc}), so there "
                                   "are no image pages.")
                return
        graded = labels["graded"] if "graded" in labels else pd.Series(dtype=float)
        if "binary" not in labels or (labels["binary"].isna().all() and graded.isna().all()):
            self.image_note = ("This benchmark has no per-image human labels (it judges pairs), so "
                               "there are no image pages.")
            return
        if images_root is not None:
            root = Path(images_root).expanduser()
            if "relpath" in labels:
                labels["path"] = [str(root / r) if r else p
                                  for r, p in zip(labels["relpath"], labels["path"], strict=True)]
            else:
                labels["path"] = [str(root / s / i) if (root / s).is_dir() else str(root / i)
                                  for s, i in zip(labels["subset"], labels["image"], strict=True)]
            from harness.images import unreadable_images

            if len(labels) and len(unreadable_images(labels["path"])) == len(labels):
                first = labels["relpath"].iloc[0] if "relpath" in labels else labels["image"].iloc[0]
                raise HarnessError(f"--images '{root}' holds none of the run's {len(labels)} images "
                                   f"(e.g. {first}); give the folder the run read its images from")
        self.images = _rank(scores, labels, self.methods)


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    return None if frame.empty else frame.astype({"subset": str})


def _rank(scores: pd.DataFrame, labels: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """One row per (image, method) with its rank within the prompt and how it relates to humans.

    Columns: the label columns, ``method, score, position`` (1 = the prompt's highest score),
    ``n`` (images of the prompt), ``pct`` (percentile rank of the score within the prompt in
    [0, 1], average rank for ties; 0.5 for a prompt's only image), ``human`` (graded label, else
    binary), ``aligned`` (binary label; graded > 0.5 where the benchmark has no binary label),
    ``card`` (a key of :data:`BORDERS`) and ``disagreement`` (``|pct - human|``).
    """
    frame = scores.merge(labels, on=["subset", "prompt", "image"], how="inner")
    frame["method"] = frame["method"].astype(str)
    frame = frame[frame["method"].isin(methods)].copy()
    group = frame.groupby(["method", "subset", "prompt"], sort=False)["score"]
    frame["n"] = group.transform("size")
    rank = group.rank(method="average")
    frame["pct"] = ((rank - 1) / (frame["n"] - 1).where(frame["n"] > 1)).fillna(0.5)
    frame["position"] = group.rank(method="first", ascending=False).astype(int)
    graded = frame["graded"] if "graded" in frame else pd.Series(float("nan"), index=frame.index)
    frame["human"] = graded.where(graded.notna(), frame["binary"]).astype(float)
    aligned = frame["binary"].astype(float)
    aligned = aligned.where(aligned.notna(), (graded > 0.5).astype(float).where(graded.notna()))
    frame["aligned"] = aligned
    top = frame["pct"] > 0.5
    frame["card"] = "unk"
    frame.loc[(aligned == 1) & top, "card"] = "pos"
    frame.loc[(aligned == 1) & ~top, "card"] = "pos-low"
    frame.loc[(aligned == 0) & top, "card"] = "neg-high"
    frame.loc[(aligned == 0) & ~top, "card"] = "neg"
    frame["disagreement"] = (frame["pct"] - frame["human"]).abs()
    return frame.reset_index(drop=True)


# -- page pieces -----------------------------------------------------------------------------------
def _page(title: str, body: str, depth: int = 0, methods: Sequence[str] = ()) -> str:
    up = "../" * depth
    data = f" data-methods='{_esc(json.dumps(list(methods)))}'" if methods else ""
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><link rel='icon' href='data:,'>"
        f"<link rel='stylesheet' href='{up}report.css'></head>\n"
        f"<body{data}><main>\n{body}\n</main>\n<script src='{up}report.js'></script>\n"
        "</body></html>\n"
    )


def _ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(_num(v) is None for v in ci):
        return ""
    return f"<span class='ci'>{float(ci[0]):.3f} – {float(ci[1]):.3f}</span>"


def _th(label: str, kind: str, title: str = "", cls: str = "", low: bool = False) -> str:
    """A sortable column heading; ``low``: lower is better, so the first click sorts ascending."""
    attrs = f" data-type='{kind}'" + (f" title='{_esc(title)}'" if title else "")
    attrs += (f" class='{cls}'" if cls else "") + (" data-low='1'" if low else "")
    return f"<th{attrs}>{_esc(label).replace(chr(10), '<br>')}</th>"


def _metric_label(metric: str) -> tuple[str, str]:
    return METRIC_TEXT.get(metric, (metric, metric))


def _leaderboard_table(run: _Run, subset: str) -> str:
    rows = [r for r in run.rows if str(r["subset"]) == subset]
    counts = [c for c in ("n_prompts", "n_items") if any(c in r for r in rows)]
    extra = ["uncertainty_mean"] if any(_num(r.get("uncertainty_mean")) is not None for r in rows) else []
    head = [_th("method", "text"), _th("source", "text", "where the row's numbers come from")]
    head += [_th({"n_prompts": "prompts", "n_items": "images"}[c], "num",
                 "prompts (or images) the row is computed on") for c in counts]
    for m in run.metrics:
        label, text = _metric_label(m)
        arrow = " ↓" if m in LOWER_IS_BETTER else ""
        head.append(_th(label + arrow, "num", text, "headline" if m == run.headline else "",
                        low=m in LOWER_IS_BETTER))
    head += [_th("σ mean", "num", "mean standard deviation the model predicts for its scores")
             for _ in extra]
    body = []
    for r in rows:
        mapping = (r.get("calibration") or {}).get("mapping") if isinstance(r.get("calibration"), dict) else None
        cells = [f"<td class='text' data-v='{_esc(r['method'])}'><b>{_esc(r['method'])}</b></td>",
                 f"<td class='text' data-v='{_esc(r['source'])}'><span class='src src-{_slug(r['source'])}'>"
                 f"{_esc(r['source'])}</span></td>"]
        cells += [f"<td data-v='{_esc(r.get(c, ''))}'>{_esc(r.get(c, '')) if r.get(c) is not None else '–'}</td>"
                  for c in counts]
        for m in run.metrics:
            v = _num(r.get(m))
            note = (f"<span class='ci'>via {_esc(mapping)}</span>" if m == "ece" and mapping and v is not None
                    else "")
            cls = " class='headline'" if m == run.headline else ""
            cells.append(f"<td{cls} data-v='{'' if v is None else repr(v)}'>{_fmt(v)}"
                         f"{_ci(r.get(f'{m}_ci'))}{note}</td>")
        for c in extra:
            v = _num(r.get(c))
            cells.append(f"<td data-v='{'' if v is None else repr(v)}'>{_fmt(v, 3)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h3 id='subset-{_slug(subset)}'>{_esc(subset)}</h3>"
            f"<div class='scroll'><table class='sortable board'><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _reliability_svg(subset: str, rows: list[dict[str, Any]], observed: str) -> str:
    """A reliability diagram of the rows that carry calibration bins ``[[mean p, mean y, n], ...]``."""
    series = []
    for r in rows:
        cal = r.get("calibration")
        bins = cal.get("bins") if isinstance(cal, dict) else None
        points = []
        for b in bins or []:
            if isinstance(b, dict):
                b = [b.get("p", b.get("confidence")), b.get("y", b.get("accuracy")), b.get("n", b.get("count", 1))]
            if isinstance(b, (list, tuple)) and len(b) >= 2 and _num(b[0]) is not None and _num(b[1]) is not None:
                points.append((float(b[0]), float(b[1]), _num(b[2]) if len(b) > 2 else 1.0))
        if points:
            series.append((f"{r['method']} ({r['source']})", cal.get("mapping", ""), points))
    if not series:
        return ""
    size, pad = 300, 44
    def x(v: float) -> float:
        return pad + v * size

    def y(v: float) -> float:
        return pad + (1 - v) * size
    parts = [f"<svg class='reliability' viewBox='0 0 {size + 2 * pad + 10} {size + 2 * pad}' "
             f"role='img' aria-label='reliability diagram, {_esc(subset)}'>",
             f"<rect x='{pad}' y='{pad}' width='{size}' height='{size}' class='frame'/>"]
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f"<line x1='{x(t)}' y1='{y(0)}' x2='{x(t)}' y2='{y(1)}' class='grid'/>"
                     f"<line x1='{x(0)}' y1='{y(t)}' x2='{x(1)}' y2='{y(t)}' class='grid'/>"
                     f"<text x='{x(t)}' y='{y(0) + 16}' class='tick' text-anchor='middle'>{t:g}</text>"
                     f"<text x='{x(0) - 6}' y='{y(t) + 4}' class='tick' text-anchor='end'>{t:g}</text>")
    parts.append(f"<line x1='{x(0)}' y1='{y(0)}' x2='{x(1)}' y2='{y(1)}' class='diagonal'/>")
    parts.append(f"<text x='{x(0.5)}' y='{y(0) + 34}' class='axis' text-anchor='middle'>"
                 "predicted probability (bin mean)</text>"
                 f"<text transform='translate({pad - 32},{y(0.5)}) rotate(-90)' class='axis' "
                 f"text-anchor='middle'>{_esc(observed)}</text>")
    legend = []
    for i, (name, mapping, points) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        total = sum(n for _, _, n in points) or 1.0
        path = " ".join(f"{x(p):.1f},{y(q):.1f}" for p, q, _ in points)
        parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='1.6'/>")
        for p, q, n in points:
            radius = 2.5 + 5 * math.sqrt(n / total)
            parts.append(f"<circle cx='{x(p):.1f}' cy='{y(q):.1f}' r='{radius:.1f}' fill='{colour}' "
                         f"fill-opacity='0.75'><title>{_esc(name)}: predicted {p:.3f}, observed "
                         f"{q:.3f}, {n:g} images</title></circle>")
        legend.append(f"<li><span class='swatch' style='background:{colour}'></span>{_esc(name)}"
                      + (f" <span class='muted'>· {_esc(mapping)}</span>" if mapping else "") + "</li>")
    parts.append("</svg>")
    return (f"<figure class='diagram'><figcaption><b>{_esc(subset)}</b></figcaption>{''.join(parts)}"
            f"<ul class='legend'>{''.join(legend)}<li><span class='swatch diag'></span>perfect "
            "calibration</li></ul></figure>")


def _calibration_section(run: _Run) -> str:
    pngs = sorted((run.dir / "plots").glob("reliability*.png")) if (run.dir / "plots").is_dir() else []
    # The run's own diagrams when it drew them; else drawn here from the rows' bins.
    observed = "share the humans preferred" if run.preference else "share labelled aligned by humans"
    svgs = [] if pngs else [_reliability_svg(s, [r for r in run.rows if str(r["subset"]) == s], observed)
                            for s in run.subsets]
    svgs = [s for s in svgs if s]
    has_numbers = "ece" in run.metrics or "brier" in run.metrics
    if not (pngs or svgs or has_numbers):
        return ""
    mappings = sorted({str(r["calibration"]["mapping"]) for r in run.rows
                       if isinstance(r.get("calibration"), dict) and r["calibration"].get("mapping")})
    what = ("pairs with similar predicted probability that the first image wins: its x is the mean "
            "predicted probability, its y the share of those pairs whose first image the humans "
            "preferred (tied pairs left out)" if run.preference else
            "images with similar predicted probability that the image matches its prompt: its x is the "
            "mean predicted probability, its y the share of those images the human majority labelled "
            "aligned")
    parts = ["<section id='calibration'><h2>Calibration: do the confidences mean what they say?</h2>",
             f"<p class='lead'>Each point is a bin of {what}. A calibrated method lies on the dashed "
             "diagonal; below it the method is over-confident, above it under-confident. ECE is the "
             "bins' mean distance to the diagonal weighted by their size (lower is better); point size "
             "shows how much a bin holds.</p>"]
    if mappings:
        parts.append("<p class='muted'>Where each method's probabilities come from is named under its ECE "
                     f"in the table ({', '.join(_esc(m) for m in mappings)}): the method's own probability "
                     "(e.g. TextNorm's confidence), or a mapping of its raw score (Platt, isotonic) fitted "
                     "by cross-validation over prompts, never on the prompts it is evaluated on.</p>")
    if svgs:
        parts.append(f"<div class='diagrams'>{''.join(svgs)}</div>")
    for png in pngs:
        parts.append(f"<figure class='plot'><img src='../plots/{_esc(png.name)}' alt='{_esc(png.stem)}'>"
                     f"<figcaption>{_esc(png.stem)}</figcaption></figure>")
    parts.append("</section>")
    return "".join(parts)


def _plots_section(run: _Run) -> str:
    folder = run.dir / "plots"
    if not folder.is_dir():
        return ""
    order = {m: i for i, m in enumerate(run.metrics)}
    pngs = sorted((p for p in folder.glob("*.png") if not p.stem.startswith("reliability")),
                  key=lambda p: (order.get(p.stem, len(order)), p.stem))
    if not pngs:
        return ""
    figs = [f"<figure class='plot'><img src='../plots/{_esc(p.name)}' alt='{_esc(p.stem)} per subset'>"
            f"<figcaption>{_esc(_metric_label(p.stem)[0])}: {_esc(_metric_label(p.stem)[1])}</figcaption>"
            "</figure>" for p in pngs]
    more = (f"<details><summary>{len(figs) - 1} more plots</summary><div class='plots'>"
            f"{''.join(figs[1:])}</div></details>" if len(figs) > 1 else "")
    return (f"<section id='plots'><h2>Plots</h2><p class='muted'>Bars: the metric per subset and "
            f"method; whiskers: the {level(run.confidence)} bootstrap interval over prompts.</p>"
            f"<div class='plots'>{figs[0]}</div>{more}</section>")


def _prompt_pages(run: _Run) -> dict[tuple[str, str], str]:
    """(subset, prompt) -> its page's file name under ``prompts/``."""
    assert run.images is not None
    pages: dict[tuple[str, str], str] = {}
    counters: dict[str, int] = {}
    for subset, prompt in dict.fromkeys(zip(run.images["subset"], run.images["prompt"], strict=True)):
        n = counters[subset] = counters.get(subset, 0) + 1
        pages[(subset, prompt)] = f"{_slug(subset)}-{n:04d}.html"
    return pages


def _prompt_index(run: _Run, pages: dict[tuple[str, str], str]) -> str:
    assert run.images is not None
    metric = run.headline if run.headline and run.per_prompt is not None and run.headline in run.per_prompt else None
    first = run.images[run.images["method"] == run.methods[0]]
    per_prompt = {}
    if metric is not None:
        scored = run.per_prompt[run.per_prompt["method"].isin(run.methods)
                                & (run.per_prompt["source"] == "scored")]
        per_prompt = {(str(s), str(p), str(m)): v for s, p, m, v in
                      zip(scored["subset"], scored["prompt"], scored["method"], scored[metric], strict=True)}
    label = _metric_label(metric)[0] if metric else ""
    out = ["<section id='prompts'><h2>Images, prompt by prompt</h2><p class='lead'>Each prompt's page "
           "shows its images ordered by a reward model's score, marked with the human labels. "
           "<a class='keep-method button' href='disagreements.html'>Largest disagreements between the "
           "models and the humans →</a></p>"]
    if metric:
        out.append(f"<p class='muted'>{_esc(label)} per prompt and scored model "
                   f"({_esc(_metric_label(metric)[1])}); empty where the prompt's images are all "
                   "aligned or all misaligned. Click a heading to sort, e.g. to find the prompts a "
                   "model gets most wrong.</p>")
    for subset, group in first.groupby("subset", sort=False):
        head = [_th("#", "num"), _th("prompt", "text"), _th("images", "num"),
                _th("aligned", "num", "images the human majority labelled aligned")]
        head += [_th(f"{label} {m}", "num", f"{label} of {m} on the prompt") for m in run.methods] if metric else []
        body = []
        for (prompt, g), i in zip(group.groupby("prompt", sort=False), range(1, len(group) + 1), strict=False):
            page = pages[(subset, str(prompt))]
            aligned = int((g["aligned"] == 1).sum())
            cells = [f"<td data-v='{i}'>{i}</td>",
                     f"<td class='text' data-v='{_esc(prompt)}'><a class='keep-method' "
                     f"href='prompts/{page}'>{_esc(prompt)}</a></td>",
                     f"<td data-v='{len(g)}'>{len(g)}</td>", f"<td data-v='{aligned}'>{aligned}</td>"]
            for m in run.methods if metric else []:
                v = _num(per_prompt.get((subset, str(prompt), m)))
                cells.append(f"<td data-v='{'' if v is None else repr(v)}'>{_fmt(v, 3)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        out.append(f"<h3>{_esc(subset)} <span class='muted'>· {group['prompt'].nunique()} prompts</span></h3>"
                   f"<div class='scroll tall'><table class='sortable prompts'><thead><tr>{''.join(head)}"
                   f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    out.append("</section>")
    return "".join(out)


def _index(run: _Run, pages: dict[tuple[str, str], str] | None) -> str:
    m = run.manifest
    data = m.get("data") or {}
    facts = [f"benchmark <b>{_esc(data.get('benchmark', ''))}</b>",
             f"subsets {_esc(', '.join(run.subsets))}"]
    if data.get("n_images"):
        facts.append(f"{data.get('n_images_evaluated', data['n_images'])} of {data['n_images']} images evaluated")
    models = [str(x.get("method") or x.get("id") or "") for x in m.get("models") or []]
    if models:
        facts.append("models scored: " + ", ".join(f"<b>{_esc(x)}</b>" for x in models))
    commit = (m.get("git") or {}).get("commit")
    facts.append(f"harness {_esc(m.get('harness_version', '?'))}"
                 + (f" @ {_esc(commit[:10])}" if commit else "") + f", {_esc(m.get('created', ''))}")
    headline = _metric_label(run.headline)[0] if run.headline else ""
    sources = sorted({str(r["source"]) for r in run.rows})
    legend = "".join(f"<li><span class='src src-{_slug(s)}'>{_esc(s)}</span> {_esc(SOURCE_TEXT.get(s, ''))}</li>"
                     for s in sources)
    body = [f"<header><h1>{_esc(run.title)}</h1><p class='facts'>{' · '.join(facts)}</p></header>",
            "<nav class='toc'>" + " ".join(
                f"<a href='#subset-{_slug(s)}'>{_esc(s)}</a>" for s in run.subsets)
            + (" <a href='#calibration'>calibration</a>" if _calibration_section(run) else "")
            + (" <a href='#plots'>plots</a>" if (run.dir / "plots").is_dir() else "")
            + (" <a href='#prompts'>prompts</a> <a class='keep-method' href='disagreements.html'>"
               "disagreements</a>" if pages else "") + "</nav>",
            "<section id='leaderboard'><h2>Leaderboard</h2>",
            f"<div class='protocol'><b>How the numbers are computed.</b> {_esc(run.protocol_text)}</div>",
            f"<p class='lead'>Each cell: the metric (higher is better unless marked ↓), and below it in "
            f"grey its {level(run.confidence)} percentile-bootstrap interval over prompts. "
            + (f"The highlighted column, <b>{_esc(headline)}</b>, is the benchmark's headline. " if headline else "")
            + "Click a column heading to sort; hover it for what the number means.</p>",
            f"<ul class='sources'>{legend}</ul>"]
    body += [_leaderboard_table(run, s) for s in run.subsets]
    other = [n for n in run.notes if not n.startswith("protocol: ")]
    if other:
        body.append(f"<details class='notes'><summary>Notes ({len(other)})</summary><ul>"
                    + "".join(f"<li>{_esc(n)}</li>" for n in other) + "</ul></details>")
    body.append("</section>")
    body.append(_calibration_section(run))
    body.append(_plots_section(run))
    if pages:
        body.append(_prompt_index(run, pages))
    elif run.image_note:
        body.append(f"<section id='prompts'><h2>Images</h2><p class='muted'>{_esc(run.image_note)}</p></section>")
    return _page(run.title, "\n".join(body), 0, run.methods if pages else ())


def _legend() -> str:
    items = "".join(f"<li><span class='swatch card-{k}'></span>{_esc(v)}</li>" for k, v in BORDERS.items()
                    if k != "unk")
    return f"<ul class='borders'><li><b>Borders:</b></li>{items}</ul>"


def _labels_html(row: Any, annotators: list[str]) -> str:
    parts = []
    b = _num(row.get("binary"))
    if b is not None:
        parts.append("<span class='lab pos'>✓ aligned</span>" if b == 1 else "<span class='lab neg'>✗ not aligned</span>")
    g = _num(row.get("graded"))
    votes = [_num(row.get(a)) for a in annotators]
    votes = [f"{v:g}" for v in votes if v is not None]
    if votes:
        mean = f" (mean {g:.2f})" if g is not None else ""
        parts.append("<span class='votes' title='each annotator: 1 aligned, 0 not'>votes "
                     f"{' · '.join(votes)}{mean}</span>")
    elif g is not None:
        parts.append(f"<span class='graded' title='graded human label: 0 (no) to 1 (yes)'>"
                     f"human score {g:.2f}</span>")
    return "".join(parts)


def _card(row: Any, per_method: list[list[Any]], thumbs: set[str] | None, depth: int, annotators: list[str],
          extra: str = "") -> str:
    name = thumb_name(row["subset"], row["image"])
    if thumbs is not None and name in thumbs:
        picture = (f"<img src='{'../' * depth}thumbs/{name}' alt='{_esc(row['image'])}' "
                   f"width='{THUMB_PX}' height='{THUMB_PX}'>")
    else:
        why = "image not found" if thumbs is not None else "no images folder"
        picture = f"<div class='placeholder'>{why}</div>"
    score, position, n, card = per_method[0][:4]
    data = _esc(json.dumps(per_method))
    shown = "–" if score is None else f"{score:.4g}"
    return (f"<figure class='card card-{card}' data-r='{data}'>"
            f"<div class='rank'><span>#<span class='pos'>{position}</span> of {n}</span>"
            f"<span class='score' title=\"the model's score\">score {shown}</span></div>{picture}"
            f"<figcaption>{_labels_html(row, annotators)}{extra}"
            f"<span class='name' title='{_esc(row['image'])}'>{_esc(row['image'])}</span></figcaption></figure>")


def _method_picker(methods: Sequence[str], what: str) -> str:
    options = "".join(f"<option value='{_esc(m)}'>{_esc(m)}</option>" for m in methods)
    return (f"<label class='picker'>{_esc(what)} <select id='method'>{options}</select></label>")


def _prompt_page(run: _Run, key: tuple[str, str], group: pd.DataFrame, nav: tuple[str | None, str | None],
                 thumbs: set[str] | None, annotators: list[str]) -> str:
    subset, prompt = key
    by_image = {m: g.set_index("image") for m, g in group.groupby("method", sort=False)}
    first = by_image[run.methods[0]].sort_values("position")
    cards = []
    half = len(first) // 2
    for image, row in first.iterrows():
        row = row.copy()
        row["image"] = image
        per_method = []
        for m in run.methods:
            r = by_image[m].loc[image] if m in by_image and image in by_image[m].index else None
            per_method.append([_num(r["score"]), int(r["position"]), int(r["n"]), str(r["card"])]
                              if r is not None else [None, 0, 0, "unk"])
        cards.append(_card(row, per_method, thumbs, 1, annotators))
        if int(row["position"]) == half and half:
            cards.append("<div class='half'>▲ the model's top half · its bottom half ▼</div>")
    aligned = int((first["aligned"] == 1).sum())
    metric = run.headline
    metric_line = ""
    if metric and run.per_prompt is not None and metric in run.per_prompt:
        pp = run.per_prompt[(run.per_prompt["subset"] == subset) & (run.per_prompt["prompt"] == prompt)
                            & (run.per_prompt["source"] == "scored")]
        values = {str(m): _num(v) for m, v in zip(pp["method"], pp[metric], strict=True)}
        shown = [f"<span class='metric' data-method='{_esc(m)}'>{_esc(m)} {_fmt(values.get(m), 3)}</span>"
                 for m in run.methods if values.get(m) is not None]
        if shown:
            metric_line = (f"<p class='muted'>{_esc(_metric_label(metric)[0])} on this prompt: "
                           + " · ".join(shown) + "</p>")
    prev, nxt = nav
    links = ["<a href='../index.html#prompts'>← leaderboard</a>",
             "<a class='keep-method' href='../disagreements.html'>largest disagreements</a>"]
    links += [f"<a class='keep-method' href='{prev}'>‹ previous prompt</a>"] if prev else []
    links += [f"<a class='keep-method' href='{nxt}'>next prompt ›</a>"] if nxt else []
    body = (f"<nav class='crumbs'>{' · '.join(links)}</nav>"
            f"<header><p class='muted'>{_esc(run.title)} · subset {_esc(subset)}</p>"
            f"<h1 class='prompt'>“{_esc(prompt)}”</h1>"
            f"<p class='facts'>{len(first)} images, {aligned} labelled aligned by the human majority.</p>"
            f"{metric_line}</header>"
            f"<div class='controls'>{_method_picker(run.methods, 'Order images by the score of')}"
            "<span class='muted'>highest first</span></div>"
            f"{_legend()}<div class='grid' id='cards'>{''.join(cards)}</div>")
    return _page(f"{prompt} · {run.title}", body, 1, run.methods)


def _disagreements_page(run: _Run, pages: dict[tuple[str, str], str], thumbs: set[str] | None,
                        annotators: list[str]) -> str:
    assert run.images is not None
    frame = run.images
    # Only prompts whose human labels vary: within a prompt the model can only rank.
    varies = frame.groupby(["method", "subset", "prompt"])["human"].transform("nunique") > 1
    sections = []
    for m in run.methods:
        mine = frame[(frame["method"] == m) & varies]
        negatives = mine[mine["aligned"] == 0]
        positives = mine[mine["aligned"] == 1]
        high = negatives[negatives["card"] == "neg-high"]
        low = positives[positives["card"] == "pos-low"]
        groups = []
        for heading, chosen, total, what in (
                ("Ranked high, but the humans say not aligned", high, len(negatives), "not-aligned images"),
                ("Ranked low, but the humans say aligned", low, len(positives), "aligned images")):
            top = chosen.sort_values(["disagreement", "subset", "prompt", "image"],
                                     ascending=[False, True, True, True], kind="stable")
            top = top.head(TOP_DISAGREEMENTS // 2)
            cards = []
            for _, row in top.iterrows():
                page = pages[(row["subset"], row["prompt"])]
                extra = (f"<span class='dis' title='|percentile rank − human score|'>disagreement "
                         f"{row['disagreement']:.2f}</span><a class='keep-method prompt-link' "
                         f"href='prompts/{page}'>“{_esc(row['prompt'])}”</a>")
                per = [[_num(row["score"]), int(row["position"]), int(row["n"]), str(row["card"])]]
                cards.append(_card(row, per, thumbs, 0, annotators, extra))
            groups.append(f"<h3>{heading} <span class='muted'>· {len(chosen)} of {total} {what}; "
                          f"the {len(top)} largest shown</span></h3>"
                          f"<div class='grid wide'>{''.join(cards)}</div>")
        sections.append(f"<section class='method-view' data-method='{_esc(m)}'><h2>{_esc(m)}</h2>"
                        + "".join(groups) + "</section>")
    body = ("<nav class='crumbs'><a href='index.html#prompts'>← leaderboard</a></nav>"
            f"<header><p class='muted'>{_esc(run.title)}</p><h1>Largest disagreements with the humans</h1>"
            "<p class='lead'>The images whose place in the model's ranking of their prompt's images most "
            "contradicts the human label: misaligned images the model ranks in its top half, and aligned "
            "images it ranks in its bottom half. Disagreement = |percentile rank of the score within "
            "the prompt (0 lowest, 1 highest) − human score (the annotators' mean, 0 to 1)|: 1 means a "
            "unanimously rejected image ranked first, or a unanimously accepted one ranked last. Only "
            "prompts whose images the humans did not all judge alike count.</p></header>"
            f"<div class='controls'>{_method_picker(run.methods, 'Reward model')}</div>{_legend()}"
            + "".join(sections))
    return _page(f"Largest disagreements · {run.title}", body, 0, run.methods)


# -- writing ---------------------------------------------------------------------------------------
def write_report(run_dir: str | Path, images_root: str | Path | None = None,
                 method: str | None = None) -> Path:
    """Render ``<run_dir>/report/`` from the run folder's files; returns ``report/index.html``.

    :param images_root: the images folder, when it moved since the run (default: the run's
        ``--images``); images that cannot be read get a placeholder.
    :param method: the scored method whose order the image pages show first (default: the first
        scored model).
    The folder is built beside the old one and swapped in whole.
    """
    run_dir = Path(run_dir).expanduser()
    run = _Run(run_dir, Path(images_root) if images_root is not None else None, method)
    staging = Path(tempfile.mkdtemp(prefix=".report.", suffix=".partial", dir=run_dir))
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        _render(run, staging)
        _swap(staging, run_dir / REPORT_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir / REPORT_DIR / "index.html"


def _render(run: _Run, out: Path) -> None:
    write_text(out / "report.css", CSS)
    write_text(out / "report.js", JS)
    pages = None
    if run.images is not None and len(run.images):
        pages = _prompt_pages(run)
        thumbs: set[str] | None = None
        if "path" in run.images:
            paths = {thumb_name(s, i): p for s, i, p in
                     zip(run.images["subset"], run.images["image"], run.images["path"], strict=True)
                     if isinstance(p, str) and p}
            thumbs = _write_thumbnails(paths, out / "thumbs")
        annotators = [c for c in run.images.columns if re.fullmatch(r"label_\d+", str(c))]
        (out / "prompts").mkdir()
        keys = list(pages)
        grouped = {k: g for k, g in run.images.groupby(["subset", "prompt"], sort=False)}
        for i, key in enumerate(keys):
            nav = (pages[keys[i - 1]] if i else None, pages[keys[i + 1]] if i + 1 < len(keys) else None)
            write_text(out / "prompts" / pages[key],
                       _prompt_page(run, key, grouped[key], nav, thumbs, annotators))
        write_text(out / "disagreements.html", _disagreements_page(run, pages, thumbs, annotators))
    write_text(out / "index.html", _index(run, pages))


def _swap(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=".report.", suffix=".old", dir=target.parent))
    os.rmdir(retired)
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def write_summary_report(run_dir: str | Path) -> Path:
    """``<run_dir>/report/index.html`` of a cross-benchmark run: the summary table (each cell a
    benchmark's headline metric with its interval) linking each benchmark's own report."""
    run_dir = Path(run_dir).expanduser()
    hint = "give a folder written by harness leaderboard A,B"
    manifest = read_json(run_dir / "manifest.json", "run file", hint)
    summary = read_json(run_dir / "summary.json", "run file", hint)
    report = manifest.get("report") or {}
    title = report.get("title") or "cross-benchmark leaderboard"
    confidence = float(report.get("confidence", 0.95))
    benchmarks = list(dict.fromkeys(str(r["benchmark"]) for r in summary))
    columns = list(dict.fromkeys((str(r["benchmark"]), str(r["subset"]), str(r["metric"])) for r in summary))
    keys = list(dict.fromkeys((str(r["method"]), str(r["source"])) for r in summary))
    cells = {((str(r["method"]), str(r["source"])), (str(r["benchmark"]), str(r["subset"]), str(r["metric"]))): r
             for r in summary}
    head = [_th("method", "text"), _th("source", "text")]
    head += [_th(f"{b}/{s}\n{_metric_label(m)[0]}", "num", _metric_label(m)[1]) for b, s, m in columns]
    body = []
    for key in keys:
        tds = [f"<td class='text' data-v='{_esc(key[0])}'><b>{_esc(key[0])}</b></td>",
               f"<td class='text' data-v='{_esc(key[1])}'><span class='src src-{_slug(key[1])}'>{_esc(key[1])}</span></td>"]
        for col in columns:
            r = cells.get((key, col))
            v = _num(r.get("value")) if r else None
            ci = _ci([r.get("ci_low"), r.get("ci_high")]) if r else ""
            tds.append(f"<td data-v='{'' if v is None else repr(v)}'>{_fmt(v)}{ci}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    links = "".join(f"<li><a href='../{_esc(b)}/{REPORT_DIR}/index.html'>{_esc(b)}</a></li>"
                    for b in benchmarks if (run_dir / b / REPORT_DIR / "index.html").is_file())
    notes = "".join(f"<li>{_esc(n)}</li>" for n in report.get("notes", []))
    page = _page(title, (
        f"<header><h1>{_esc(title)}</h1><p class='facts'>{len(benchmarks)} benchmarks · harness "
        f"{_esc(manifest.get('harness_version', '?'))}, {_esc(manifest.get('created', ''))}</p></header>"
        f"<section><h2>Each benchmark's report</h2><ul class='benchmarks'>{links}</ul></section>"
        "<section><h2>Summary</h2><p class='lead'>Each cell: the benchmark's headline metric under its own "
        f"protocol (below), and in grey its {level(confidence)} percentile-bootstrap interval over prompts. "
        "Click a column heading to sort.</p>"
        f"<div class='scroll'><table class='sortable board'><thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
        f"<div class='protocol'><b>Protocols.</b><ul>{notes}</ul></div></section>"), 0)
    staging = Path(tempfile.mkdtemp(prefix=".report.", suffix=".partial", dir=run_dir))
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        write_text(staging / "report.css", CSS)
        write_text(staging / "report.js", JS)
        write_text(staging / "index.html", page)
        _swap(staging, run_dir / REPORT_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir / REPORT_DIR / "index.html"


CSS = """\
:root{--fg:#1d2330;--muted:#667085;--line:#e3e6ec;--bg:#fff;--soft:#f6f7f9;--accent:#2f5fd0;
--pos:#1e9e4a;--neg:#d92d20;}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px;background:var(--bg);min-height:100vh}
h1{font-size:28px;margin:4px 0 6px}h1.prompt{font-size:24px;font-weight:600}
h2{font-size:21px;margin:34px 0 8px;padding-top:10px;border-top:1px solid var(--line)}
h3{font-size:17px;margin:22px 0 6px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.muted{color:var(--muted)}.facts{color:var(--muted);margin:2px 0 8px}.lead{max-width:900px}
.toc,.crumbs{display:flex;flex-wrap:wrap;gap:14px;font-size:14px;margin:6px 0 12px}
.protocol{background:#eef3ff;border-left:4px solid var(--accent);padding:10px 14px;margin:10px 0;
font-size:14px;max-width:1100px}
.protocol ul{margin:6px 0 0;padding-left:18px}
ul.sources,ul.borders,ul.legend{list-style:none;padding:0;margin:8px 0;display:flex;flex-wrap:wrap;
gap:6px 20px;font-size:13px;color:var(--muted)}
.src{display:inline-block;font-size:12px;padding:0 7px;border-radius:9px;background:#eceff3;color:#344054}
.src-scored{background:#e3f1ff;color:#174ea6}.src-reported{background:#f2f4f7}
.src-human{background:#fdf1dc;color:#8a4b00}.src-oracle{background:#fde8e7;color:#a4221b}
.scroll{overflow-x:auto}.scroll.tall{max-height:560px;overflow-y:auto}
table{border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;text-align:right;border-bottom:1px solid var(--line);vertical-align:top}
td.text,th[data-type=text]{text-align:left}
table.prompts td.text{max-width:620px}
thead th{position:sticky;top:0;background:#fafbfc;font-weight:600;cursor:pointer;user-select:none;
white-space:nowrap;border-bottom:2px solid #d0d5dd}
thead th:hover{background:#eef1f5}
th[aria-sort=descending]::after{content:" ▼";font-size:10px}
th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
th.headline,td.headline{background:#f3f7ff}
tbody tr:hover td{background:#fbfbf5}
.ci{display:block;font-size:11px;color:#8a919e;white-space:nowrap}
#plots details summary{cursor:pointer;color:var(--accent);margin:10px 0}
ul.borders{background:var(--soft);padding:8px 12px;border-radius:6px;color:var(--fg)}
details.notes{font-size:13px;color:var(--muted);margin:14px 0;max-width:1100px}
.plots,.diagrams{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0}figure.plot img{max-width:600px;width:100%;border:1px solid var(--line)}
figure figcaption{font-size:13px;color:var(--muted);max-width:600px}
figure.diagram{max-width:400px}svg.reliability{width:100%;height:auto;background:#fff}
svg .frame{fill:#fcfcfd;stroke:#98a2b3}svg .grid{stroke:#eaecf0}
svg .diagonal{stroke:#667085;stroke-dasharray:5 4}svg .tick{font-size:11px;fill:#667085}
svg .axis{font-size:12px;fill:#344054}
.swatch{display:inline-block;width:14px;height:14px;border-radius:3px;margin-right:6px;vertical-align:-2px}
.swatch.diag{border-top:2px dashed #667085;border-radius:0;height:0;width:18px;vertical-align:3px}
.controls{display:flex;gap:14px;align-items:center;margin:12px 0 4px}
.picker select{font:inherit;padding:3px 6px;margin-left:6px}
.button{display:inline-block;margin-top:6px;padding:5px 12px;border:1px solid var(--accent);border-radius:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:14px;margin-top:10px}
.grid.wide{grid-template-columns:repeat(auto-fill,minmax(200px,1fr))}
.card{background:#fff;border:3px solid transparent;border-radius:8px;padding:6px;font-size:12px;
box-shadow:0 1px 2px rgba(16,24,40,.08)}
.card img,.card .placeholder{display:block;width:100%;height:auto;aspect-ratio:1/1;object-fit:contain;
background:#f2f4f7;border-radius:4px}
.card .placeholder{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:12px}
.card .rank{display:flex;justify-content:space-between;font-weight:600;margin-bottom:4px}
.card .score{font-weight:400;color:var(--muted)}
.card figcaption{display:flex;flex-wrap:wrap;gap:2px 8px;margin-top:5px;max-width:none}
.card .name{width:100%;color:#98a2b3;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.card .prompt-link{width:100%;font-size:12px}
.card-pos,.swatch.card-pos{border-color:var(--pos)}
.card-pos-low,.swatch.card-pos-low{border-color:var(--pos);border-style:dashed}
.card-neg-high,.swatch.card-neg-high{border-color:var(--neg);background:#fff5f4}
.card-neg,.swatch.card-neg{border-color:#d0d5dd}
.card-unk{border-color:#d0d5dd;border-style:dotted}
.swatch.card-pos,.swatch.card-pos-low,.swatch.card-neg-high,.swatch.card-neg{border-width:3px;
border-style:solid;background:#fff}
.swatch.card-pos-low{border-style:dashed}.swatch.card-neg-high{background:#fff5f4}
.lab{font-weight:600}.lab.pos{color:var(--pos)}.lab.neg{color:var(--neg)}
.dis{font-weight:600;color:#b54708}
.half{grid-column:1/-1;text-align:center;color:var(--muted);font-size:12px;border-top:1px dashed #d0d5dd;
padding-top:4px}
.method-view[hidden]{display:none}
ul.benchmarks{font-size:16px}
"""

JS = """\
(function () {
  'use strict';
  function value(cell, numeric) {
    var v = cell ? cell.getAttribute('data-v') : '';
    if (!numeric) return (v || '').toLowerCase();
    return v === '' || v === null ? NaN : parseFloat(v);
  }
  function sortTable(table, col, th) {
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var dir = current ? (current === 'descending' ? 'ascending' : 'descending')
                      : (numeric && !th.getAttribute('data-low') ? 'descending' : 'ascending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return [value(r.cells[col], numeric), i, r]; });
    keyed.sort(function (a, b) {
      var x = a[0], y = b[0];
      if (numeric) {
        if (isNaN(x) && isNaN(y)) return a[1] - b[1];
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
      }
      var c = x < y ? -1 : x > y ? 1 : 0;
      return (dir === 'ascending' ? c : -c) || a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.addEventListener('click', function () { sortTable(table, col, th); });
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sortTable(table, col, th); });
    });
  });

  var methods = JSON.parse(document.body.getAttribute('data-methods') || '[]');
  if (!methods.length) return;
  function chosen() {
    var m = /(?:^|&)method=([^&]*)/.exec(location.hash.slice(1));
    var name = m ? decodeURIComponent(m[1]) : methods[0];
    return methods.indexOf(name) >= 0 ? name : methods[0];
  }
  function apply(name) {
    var i = methods.indexOf(name);
    var grid = document.getElementById('cards');
    if (grid) {
      var cards = Array.prototype.slice.call(grid.querySelectorAll('.card'));
      var half = grid.querySelector('.half');
      cards.forEach(function (c) {
        var r = JSON.parse(c.getAttribute('data-r'))[i];
        c.className = 'card card-' + r[3];
        c.querySelector('.pos').textContent = r[1];
        c.querySelector('.score').textContent = 'score ' + (r[0] === null ? '–' : Number(r[0]).toPrecision(4));
        c.setAttribute('data-pos', r[1]);
      });
      cards.sort(function (a, b) { return a.getAttribute('data-pos') - b.getAttribute('data-pos'); });
      var mid = Math.floor(cards.length / 2);
      cards.forEach(function (c, k) {
        grid.appendChild(c);
        if (half && k === mid - 1) grid.appendChild(half);
      });
    }
    Array.prototype.forEach.call(document.querySelectorAll('.method-view'), function (s) {
      s.hidden = s.getAttribute('data-method') !== name;
    });
    var select = document.getElementById('method');
    if (select) select.value = name;
  }
  var select = document.getElementById('method');
  if (select) {
    select.addEventListener('change', function () {
      location.hash = 'method=' + encodeURIComponent(select.value);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll('a.keep-method'), function (a) {
    a.addEventListener('click', function () {
      var href = a.getAttribute('href').split('#')[0];
      a.setAttribute('href', href + '#method=' + encodeURIComponent(chosen()));
    });
  });
  window.addEventListener('hashchange', function () { apply(chosen()); });
  apply(chosen());
})();
"""
