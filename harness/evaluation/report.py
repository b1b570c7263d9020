"""Writing and rendering a leaderboard run folder.

A run folder holds ``manifest.json``, ``leaderboard.{json,csv,md,html}``, ``per_prompt.csv``,
``plots/<metric>.png`` and ``report/`` (the HTML report, :mod:`harness.evaluation.html_report`);
with scored reward models also ``scores.parquet`` (one row per model, image and prompt),
``labels.parquet`` (the evaluated images' human labels and paths) and ``comparisons.csv`` (paired
bootstrap against the reported rows). Every file is written atomically, and only after all numbers are
computed, so a failed run never leaves a half-written file or clobbers an earlier one.

``leaderboard.json`` schema: a list of rows, each
``{"subset", "method", "source", "n_prompts", <metric>: float, "<metric>_ci": [low, high]}``
for the metrics of the benchmark's protocol (:class:`harness.types.Protocol`): auroc, auprc, ap5,
ap10, ap25, spearman, kendall for per-prompt benchmarks such as TIA2; e.g. spearman, kendall,
pearson, pairwise_acc (plus ``n_items``) for pooled ones; ``accuracy`` and
``accuracy_ties_dropped`` (plus ``n_items``, the pair counts and a chosen tie ``threshold``) for
preference benchmarks. ``manifest.json`` records the protocol under ``data.protocol``.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness.errors import HarnessError
from harness.io import atomic_path, current_umask, read_json, write_json, write_text

if TYPE_CHECKING:
    from harness.evaluation.leaderboard import LeaderboardResult

METRIC_LABELS = {
    "auroc": "AUROC", "auprc": "AUPRC", "ap5": "AP@5", "ap10": "AP@10", "ap25": "AP@25",
    "spearman": "Spearman", "kendall": "Kendall", "pearson": "Pearson",
    "pairwise_acc": "Pairwise acc", "accuracy": "Accuracy", "accuracy_ties_dropped": "Acc (no ties)",
    "ece": "ECE (lower better)", "brier": "Brier (lower better)",
}
#: Every metric a row can carry, in table order.
ALL_METRICS = tuple(METRIC_LABELS)


def metrics_of(rows: pd.DataFrame) -> list[str]:
    """The metric columns of ``rows`` (a benchmark's protocol decides which), in table order."""
    return [m for m in ALL_METRICS if m in rows.columns]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def rows_as_records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in rec.items()} for rec in rows.to_dict(orient="records")]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _fmt_ci(ci: Any, digits: int = 3) -> str:
    if not isinstance(ci, (list, tuple)) or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def level(confidence: float) -> str:
    """0.95 -> "95%", 0.8 -> "80%", 0.999 -> "99.9%": the level as given, never rounded to 95."""
    return f"{100 * confidence:.10g}%"


def render_markdown(rows: pd.DataFrame, notes: list[str] | None = None, title: str = "",
                    confidence: float = 0.95) -> str:
    lines = [f"# {title}", ""] if title else []
    metrics = metrics_of(rows)
    header = "| method | source | prompts | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |"
    rule = "|---|---|---:|" + "---:|" * len(metrics)
    for subset, group in rows.groupby("subset", sort=False):
        lines += [f"## {subset}", "", header, rule]
        for _, r in group.iterrows():
            cells = [f"{_fmt(r[m])} {_fmt_ci(r[f'{m}_ci'])}".strip() for m in metrics]
            lines.append(f"| {r['method']} | {r['source']} | {r['n_prompts']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Brackets hold {level(confidence)} percentile-bootstrap intervals over prompts; "
                 "the protocol note says how each number is computed.")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_html(rows: pd.DataFrame, notes: list[str] | None = None, title: str = "",
                confidence: float = 0.95) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'leaderboard')}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}small{color:#666}</style>",
        "</head><body>",
    ]
    if title:
        parts.append(f"<h1>{html.escape(title)}</h1>")
    metrics = metrics_of(rows)
    for subset, group in rows.groupby("subset", sort=False):
        parts.append(f"<h2>{html.escape(str(subset))}</h2><table><tr><th>method</th><th>source</th>"
                     "<th>prompts</th>" + "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in metrics) + "</tr>")
        for _, r in group.iterrows():
            cells = "".join(
                f"<td>{_fmt(r[m])}<br><small>{_fmt_ci(r[f'{m}_ci'])}</small></td>" for m in metrics
            )
            parts.append(f"<tr><td>{html.escape(str(r['method']))}</td><td>{html.escape(str(r['source']))}</td>"
                         f"<td>{r['n_prompts']}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append(f"<p><small>Small numbers are {level(confidence)} percentile-bootstrap intervals "
                 "over prompts; the protocol note says how each number is computed.</small></p>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def plot_rows(rows: pd.DataFrame, plots_dir: Path, confidence: float = 0.95) -> list[Path]:
    """One PNG per metric: grouped bars (subset x method) with CI whiskers."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    subsets = list(dict.fromkeys(rows["subset"]))
    labels = list(dict.fromkeys(f"{m} ({s})" for m, s in zip(rows["method"], rows["source"], strict=True)))
    width = 0.8 / max(1, len(labels))
    cmap = plt.get_cmap("tab10")
    for metric in metrics_of(rows):
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(subsets) + 2) + 3, 4))
        for i, label in enumerate(labels):
            xs, ys, lo, hi = [], [], [], []
            for j, subset in enumerate(subsets):
                r = rows[(rows["subset"] == subset)
                         & ((rows["method"] + " (" + rows["source"] + ")") == label)]
                if r.empty or r.iloc[0][metric] is None or pd.isna(r.iloc[0][metric]):
                    continue
                val = float(r.iloc[0][metric])
                ci = r.iloc[0][f"{metric}_ci"]
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(val)
                ok = isinstance(ci, (list, tuple)) and not any(c is None or pd.isna(c) for c in ci)
                # A point estimate may fall outside its percentile interval (ECE is biased):
                # whiskers then start at the estimate.
                lo.append(max(val - ci[0], 0.0) if ok else 0.0)
                hi.append(max(ci[1] - val, 0.0) if ok else 0.0)
            ax.bar(xs, ys, width=width, color=cmap(i % 10), label=label,
                   yerr=np.array([lo, hi]), capsize=2, ecolor="black")
        ax.set_xticks(range(len(subsets)), subsets)
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"{METRIC_LABELS[metric]} per subset ({level(confidence)} bootstrap CI)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = plots_dir / f"{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    reliability = plot_reliability(rows, plots_dir)
    return written + ([reliability] if reliability else [])


def plot_reliability(rows: pd.DataFrame, plots_dir: Path) -> Path | None:
    """``plots/reliability.png``: per subset, every calibrated method's reliability points
    (mean predicted probability vs fraction labelled aligned, per equal-mass bin) and the
    diagonal of perfect calibration. None when no row carries calibration."""
    if "calibration" not in rows.columns:
        return None
    calibrated = rows[[isinstance(c, dict) and bool(c.get("bins")) for c in rows["calibration"]]]
    if calibrated.empty:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    subsets = list(dict.fromkeys(calibrated["subset"]))
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.2 * len(subsets) + 2.5, 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(f"{m} ({s})" for m, s in zip(calibrated["method"], calibrated["source"], strict=True)))
    for ax, subset in zip(axes[0], subsets, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for _, r in calibrated[calibrated["subset"] == subset].iterrows():
            label = f"{r['method']} ({r['source']})"
            points = r["calibration"]["bins"]
            ax.plot([b[0] for b in points], [b[1] for b in points], marker="o", markersize=3,
                    color=cmap(labels.index(label) % 10),
                    label=f"{label}: ECE {r['ece']:.3f} ({r['calibration']['mapping']})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability (bin mean)")
        ax.set_ylabel("fraction labelled aligned")
        ax.set_title(str(subset))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = plots_dir / "reliability.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def is_run_folder(path: str | Path) -> bool:
    """A folder this harness wrote: its manifest.json names the harness version."""
    manifest = Path(path) / "manifest.json"
    try:
        return "harness_version" in json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: str | Path, force: bool = False) -> Path:
    """The run folder ``out``, refused when it is a file or a non-empty folder that is not a
    harness run (unless ``force``): called before any work, so nothing computed is lost."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out '{out}' exists and is not a folder; choose a folder path")
    if out.is_dir() and not force and not is_run_folder(out):
        try:
            occupied = any(out.iterdir())
        except OSError as exc:
            raise HarnessError(f"cannot read --out folder '{out}': {exc.strerror}") from exc
        if occupied:
            raise HarnessError(f"--out '{out}' is a folder with files but not a harness run; choose "
                               "another folder, or pass --force to replace it")
    return out


def write_run(out: str | Path, result: LeaderboardResult, plots: bool = True,
              force: bool = False) -> Path:
    """Write the run folder ``out`` whole, or not at all; returns its path.

    The files are written into a temporary sibling folder that is renamed to ``out`` once
    complete; an earlier run in ``out`` is replaced as a whole (its files never mix with the new
    run's). A folder that is not a harness run is replaced only with ``force``. Files and folders
    follow the user's umask.
    """
    return _write_whole(out, force, lambda staging: _write_files(staging, result, plots))


def write_multi_run(out: str | Path, multi: Any, plots: bool = True, force: bool = False) -> Path:
    """Write a cross-benchmark run whole: ``<out>/<benchmark>/`` (each a run folder as
    :func:`write_run` writes it), ``summary.{json,csv,md,html}``, ``report/`` and
    ``manifest.json``."""

    def fill(staging: Path) -> None:
        for bench, result in multi.results.items():
            folder = staging / bench
            folder.mkdir()
            _write_files(folder, result, plots)
        summary = multi.summary
        write_json(staging / "summary.json", rows_as_records(summary))
        write_text(staging / "summary.csv", summary.to_csv(index=False))
        write_text(staging / "summary.md", render_summary_markdown(summary, multi.notes, multi.title,
                                                                  multi.confidence))
        write_text(staging / "summary.html", render_summary_html(summary, multi.notes, multi.title,
                                                                multi.confidence))
        write_json(staging / "manifest.json", multi.manifest)
        from harness.evaluation.html_report import write_summary_report

        write_summary_report(staging)  # report/index.html: the summary, linking each benchmark's

    return _write_whole(out, force, fill)


def _write_whole(out: str | Path, force: bool, fill: Any) -> Path:
    """``fill(staging)`` writes a run into a temporary sibling of ``out``, which then replaces
    ``out`` in one rename; any failure leaves ``out`` as it was and nothing else behind."""
    out = check_out(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise HarnessError(f"cannot create run folder '{out}': {exc.strerror or exc}") from exc
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        fill(staging)
        _swap_in(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise HarnessError(f"cannot write run folder '{out}': {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _summary_cells(summary: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], dict]:
    from harness.evaluation.multi import summary_table

    return summary_table(summary)


def render_summary_markdown(summary: pd.DataFrame, notes: list[str] | None = None, title: str = "",
                            confidence: float = 0.95) -> str:
    """Methods x benchmarks: each cell the benchmark's headline metric and its interval."""
    columns, keys, cells = _summary_cells(summary)
    lines = [f"# {title}", ""] if title else []
    lines += ["| method | source | " + " | ".join(columns) + " |",
              "|---|---|" + "---:|" * len(columns)]
    for key in keys:
        row = []
        for col in columns:
            value, lo, hi = cells.get((key, col), (None, None, None))
            row.append(f"{_fmt(value)} {_fmt_ci([lo, hi])}".strip() if value is not None else "")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
    lines += ["", f"Each cell: the benchmark's headline metric with its {level(confidence)} "
                  "percentile-bootstrap interval over prompts; each benchmark's protocol below."]
    if notes:
        lines += ["", "Protocols:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def render_summary_html(summary: pd.DataFrame, notes: list[str] | None = None, title: str = "",
                        confidence: float = 0.95) -> str:
    columns, keys, cells = _summary_cells(summary)
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(title or 'summary')}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,td:nth-child(2){text-align:left}small{color:#666}</style>",
             "</head><body>"]
    if title:
        parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append("<table><tr><th>method</th><th>source</th>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for key in keys:
        tds = []
        for col in columns:
            value, lo, hi = cells.get((key, col), (None, None, None))
            tds.append(f"<td>{_fmt(value)}<br><small>{_fmt_ci([lo, hi])}</small></td>"
                       if value is not None else "<td></td>")
        parts.append(f"<tr><td>{html.escape(key[0])}</td><td>{html.escape(key[1])}</td>{''.join(tds)}</tr>")
    parts.append(f"</table><p><small>Each cell: the benchmark's headline metric with its "
                 f"{level(confidence)} percentile-bootstrap interval over prompts.</small></p>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_summary_terminal(summary: pd.DataFrame, confidence: float = 0.95) -> None:
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table

    columns, keys, cells = _summary_cells(summary)
    table = Table(title="summary: headline metric per benchmark", title_justify="left",
                  header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("method")
    table.add_column("source")
    for col in columns:
        table.add_column(col, justify="right")
    for key in keys:
        values = []
        for col in columns:
            value, lo, hi = cells.get((key, col), (None, None, None))
            values.append(f"{_fmt(value)}\n[dim]{_fmt_ci([lo, hi], 2)}[/dim]" if value is not None else "")
        table.add_row(key[0], key[1], *values)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(f"[dim]brackets: {level(confidence)} bootstrap intervals over prompts[/dim]")


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing what is there."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(retired)
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(retired, out)  # put the old run back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_files(out: Path, result: LeaderboardResult, plots: bool) -> None:
    title, notes, confidence = result.title, result.notes, result.confidence
    records = rows_as_records(result.rows)
    csv_rows = result.rows.copy()
    for m in metrics_of(csv_rows):
        ci = csv_rows.pop(f"{m}_ci")
        csv_rows[f"{m}_ci_low"] = [c[0] for c in ci]
        csv_rows[f"{m}_ci_high"] = [c[1] for c in ci]
    write_json(out / "leaderboard.json", records)
    write_text(out / "leaderboard.csv", csv_rows.to_csv(index=False))
    write_text(out / "leaderboard.md", render_markdown(result.rows, notes, title, confidence))
    write_text(out / "leaderboard.html", render_html(result.rows, notes, title, confidence))
    write_text(out / "per_prompt.csv", result.per_prompt.to_csv(index=False))
    if result.scores is not None:
        with atomic_path(out / "scores.parquet") as tmp:
            result.scores.to_parquet(tmp, index=False)
    if result.comparisons is not None and not result.comparisons.empty:
        write_text(out / "comparisons.csv", result.comparisons.to_csv(index=False))
    if plots:
        plot_rows(result.rows, out / "plots", confidence)
    if result.scores is not None:  # the image pages' labels and paths, so the report needs no data
        from harness.evaluation.html_report import LABELS_FILE, image_labels

        with atomic_path(out / LABELS_FILE) as tmp:
            image_labels(result.manifest, result.scores).to_parquet(tmp, index=False)
    write_json(out / "manifest.json", result.manifest)  # it marks a run folder
    from harness.evaluation.html_report import write_report

    write_report(out)  # from the files above: report/index.html, and image pages with scores


_RUN_FOLDER = "give a folder written by harness leaderboard"


def load_rows(run_dir: str | Path) -> pd.DataFrame:
    """Read ``leaderboard.json`` of a run folder back into a DataFrame."""
    records = read_json(Path(run_dir) / "leaderboard.json", "run file", _RUN_FOLDER)
    rows = pd.DataFrame(records)
    for m in metrics_of(rows):
        rows[m] = rows[m].astype(float)
        rows[f"{m}_ci"] = [[float("nan") if v is None else v for v in ci] for ci in rows[f"{m}_ci"]]
    return rows


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, str, list[str], float]:
    """A run folder's rows, title, notes and confidence level, as the run wrote them."""
    rows = load_rows(run_dir)
    report = read_json(Path(run_dir) / "manifest.json", "run file", _RUN_FOLDER).get("report") or {}
    confidence = report.get("confidence", 0.95)  # runs written before it was recorded said 95%
    return rows, report.get("title", ""), list(report.get("notes", [])), float(confidence)


def render_terminal(rows: pd.DataFrame, console: Any = None, notes: list[str] | None = None,
                    confidence: float = 0.95) -> None:
    """Print one rich table per subset."""
    import sys

    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Piped output has no terminal width; rich would squeeze the table into 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    for subset, group in rows.groupby("subset", sort=False):
        table = Table(title=f"{subset}", title_justify="left", header_style="bold",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("method")
        table.add_column("source")
        table.add_column("n", justify="right")
        for m in metrics_of(rows):
            table.add_column(METRIC_LABELS[m], justify="right")
        for _, r in group.iterrows():
            table.add_row(
                str(r["method"]), str(r["source"]), str(r["n_prompts"]),
                *(f"{_fmt(r[m])}\n[dim]{_fmt_ci(r[f'{m}_ci'], 2)}[/dim]" for m in metrics_of(rows)),
            )
        console.print(table)
    console.print(f"[dim]brackets: {level(confidence)} bootstrap intervals over prompts[/dim]")
    for n in notes or []:
        console.print(f"[dim]note: {n}[/dim]")
