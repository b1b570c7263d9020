"""One leaderboard run over several benchmarks: a run per benchmark plus a summary table.

``harness leaderboard tia2,tifa_v1`` (or ``all``) evaluates the same reward models on each
benchmark under its own protocol, with one shared score cache, and summarises: one row per method
(and source), one column per benchmark and subset, each cell the benchmark's headline metric with
its interval. Data folders: each benchmark finds its annotation folder among the ``--data`` roots
(``ROOT/<data_folder>``, or ``ROOT`` itself when it is named so; see
:func:`resolve_data_dir`), and its images under ``--images ROOT/<benchmark id>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.evaluation.config import LeaderboardConfig
from harness.evaluation.leaderboard import LeaderboardResult, NothingToShow, run_leaderboard
from harness.plugins import get_plugins

SUMMARY_KEYS = ("method", "source", "benchmark", "subset", "metric", "value", "ci_low", "ci_high",
                "n_prompts")


@dataclass
class MultiLeaderboardResult:
    """The runs of several benchmarks and their summary."""

    results: dict[str, LeaderboardResult]  #: benchmark id -> its run
    summary: pd.DataFrame  #: SUMMARY_KEYS: one row per (method, source, benchmark, subset)
    manifest: dict[str, Any]
    confidence: float = 0.95
    title: str = "cross-benchmark leaderboard"
    notes: list[str] = field(default_factory=list)


def expand_benchmarks(text: str) -> list[str]:
    """``"tia2"``, ``"tia2,tifa_v1"`` or ``"all"`` -> registered benchmark ids (aliases resolved)."""
    catalog = get_plugins().benchmarks
    names = [n.strip() for n in str(text).split(",")]
    if any(not n for n in names):
        raise HarnessError(f"empty benchmark name in '{text}': write BENCH[,BENCH...] or all")
    if names == ["all"]:
        return catalog.ids()
    ids = [catalog.entry(n).id for n in names]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise HarnessError(f"benchmark '{dupes[0]}' is named twice in '{text}'")
    return ids


def resolve_data_dir(benchmark: str, roots: Sequence[str | Path], single: bool) -> str | None:
    """The annotation folder of ``benchmark`` among ``roots``: ``ROOT/<data_folder>`` where it
    exists, else a root named ``<data_folder>``; with one benchmark and one root, that root.
    None: not given (the benchmark downloads its annotations)."""
    cls = get_plugins().benchmarks.get(benchmark)
    folder = getattr(cls, "data_folder", None) or cls.id
    for root in map(lambda r: Path(r).expanduser(), roots):
        if (root / folder).is_dir():
            return str(root / folder)
        if root.name == folder:
            return str(root)
    if single and len(roots) == 1:
        return str(roots[0])
    return None


def run_leaderboards(config: LeaderboardConfig, benchmarks: Sequence[str],
                     data_roots: Sequence[str | Path] = (), images_root: str | Path | None = None,
                     *, progress: bool = False) -> MultiLeaderboardResult:
    """Run ``config`` (its data group a template) on each of ``benchmarks``; summarise."""
    if not benchmarks:
        raise HarnessError("no benchmarks to run")
    if config.data.subsets and len(benchmarks) > 1:
        raise HarnessError("--subset selects subsets of one benchmark: run one benchmark, or drop --subset")
    configs = {}
    for bench in benchmarks:
        images = None
        if images_root is not None:
            root = Path(images_root).expanduser()
            images = str(root / bench) if (root / bench).is_dir() else str(root)
            if len(benchmarks) > 1 and not (root / bench).is_dir():
                raise HarnessError(f"no images folder for benchmark '{bench}': expected "
                                   f"{root / bench} (--images ROOT holds one folder per benchmark)")
        data = dataclasses.replace(config.data, benchmark=bench,
                                   data=resolve_data_dir(bench, data_roots, len(benchmarks) == 1),
                                   images=images)
        configs[bench] = dataclasses.replace(config, data=data)
    results, skipped = {}, []
    for bench, cfg in configs.items():
        try:
            results[bench] = run_leaderboard(cfg, progress=progress)
        except NothingToShow:
            skipped.append(bench)
        except HarnessError as exc:
            raise HarnessError(f"benchmark '{bench}': {exc}") from exc
    if not results:
        raise HarnessError(f"nothing to put on the leaderboard: {', '.join(skipped)} release no "
                           "numbers of their own; score reward models with --model and --images")
    summary = summarize(results)
    from harness.evaluation.manifest import build_manifest

    manifest = build_manifest(config.asdict(), config.report.seed, {
        "benchmarks": list(results),
        "protocols": {b: r.manifest["data"]["protocol"] for b, r in results.items()},
        "data_dirs": {b: c.data.data for b, c in configs.items()},
    })
    notes = [f"{b}: {r.protocol.describe()}" for b, r in results.items()]
    if skipped:
        notes.append(f"no rows for {', '.join(skipped)}: they release no numbers of their own and "
                     "no model was scored")
    manifest["data"]["skipped"] = skipped
    manifest["report"] = {"title": "cross-benchmark leaderboard", "notes": notes,
                          "confidence": config.report.confidence, "summary": True}
    return MultiLeaderboardResult(results, summary, manifest, config.report.confidence, notes=notes)


def summarize(results: dict[str, LeaderboardResult]) -> pd.DataFrame:
    """One row per (method, source, benchmark, subset): the benchmark's headline metric."""
    out = []
    for bench, result in results.items():
        metric = result.protocol.headline
        for _, row in result.rows.iterrows():
            ci = row.get(f"{metric}_ci")
            ci = ci if isinstance(ci, (list, tuple)) else [float("nan"), float("nan")]
            out.append({"method": row["method"], "source": row["source"], "benchmark": bench,
                        "subset": row["subset"], "metric": metric, "value": row.get(metric),
                        "ci_low": ci[0], "ci_high": ci[1], "n_prompts": row["n_prompts"]})
    return pd.DataFrame(out, columns=list(SUMMARY_KEYS))


def summary_table(summary: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], dict]:
    """Columns (``benchmark/subset`` with the metric), row keys ``(method, source)``, and
    ``{(row key, column): (value, low, high)}``, in first-seen order."""
    columns, keys, cells = [], [], {}
    for _, r in summary.iterrows():
        col = f"{r['benchmark']}/{r['subset']} ({r['metric']})"
        key = (str(r["method"]), str(r["source"]))
        if col not in columns:
            columns.append(col)
        if key not in keys:
            keys.append(key)
        cells[(key, col)] = (r["value"], r["ci_low"], r["ci_high"])
    return columns, keys, cells
