"""``harness leaderboard``: reward models against a benchmark's human labels.

Flags (or a YAML ``--config``, flags given explicitly overriding it) become a
:class:`~harness.evaluation.config.LeaderboardConfig`; the library computes the result and this
command writes the run folder and prints the tables. Library errors name parameters
(``report.bootstrap``); here they name the flag (``--bootstrap``).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

import click

from harness.cli.options import (
    TEXT,
    BenchmarkList,
    PathArg,
    PromptSource,
    RegisteredId,
    Url,
    check_local_device,
    model_options,
    print_failures,
)
from harness.cli.root import cli
from harness.errors import HarnessError

#: config parameter -> (click parameter name, flag shown in errors)
FLAGS: dict[str, tuple[str, str]] = {
    "data.benchmark": ("benchmark", "BENCHMARK"),
    "data.data": ("data", "--data"),
    "data.subsets": ("subsets", "--subset"),
    "data.images": ("images", "--images"),
    "data.skip_missing": ("skip_missing", "--skip-missing"),
    "scoring.models": ("models", "--model"),
    "scoring.device": ("device", "--device"),
    "scoring.dtype": ("dtype", "--dtype"),
    "scoring.batch_size": ("batch_size", "--batch-size"),
    "scoring.workers": ("workers", "--workers"),
    "scoring.executor": ("executor", "--executor"),
    "scoring.address": ("address", "--address"),
    "scoring.actors": ("actors", "--actors"),
    "scoring.gpus_per_actor": ("gpus_per_actor", "--gpus-per-actor"),
    "scoring.cache": ("cache", "--cache"),
    "scoring.one_pass": ("one_pass", "--one-pass/--no-one-pass"),
    "calibration.normalizers": ("normalizers", "--normalizer"),
    "calibration.ensembles": ("ensembles", "--ensemble"),
    "calibration.prompts": ("prompt_sets", "--prompts"),
    "calibration.selection": ("oracle", "--oracle"),
    "calibration.folds": ("folds", "--folds"),
    "calibration.select_metric": ("select_metric", "--select-metric"),
    "calibration.standardize": ("standardize", "--standardize"),
    "calibration.prompt_options": ("llm_model", "--llm-model/--llm-base-url"),
    "report.bootstrap": ("n_boot", "--bootstrap"),
    "report.confidence": ("confidence", "--confidence"),
    "report.seed": ("seed", "--seed"),
    "report.plots": ("no_plots", "--no-plots"),
    "report.calibration_bins": ("calibration_bins", "--calibration-bins"),
    "report.calibration_mapping": ("calibration_mapping", "--calibration-mapping"),
}


def _default_out(benchmark: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{benchmark}-{stamp}"


def config_from_flags(ctx: click.Context, p: dict[str, Any]) -> Any:
    """A LeaderboardConfig from the flags; with ``--config``, only flags given explicitly
    replace the file's values."""
    from harness.evaluation.config import LeaderboardConfig

    cache: Any = False if p["no_cache"] else (str(p["cache"]) if p["cache"] is not None else True)
    prompt_options = {k: v for k, v in {"model": p["llm_model"], "base_url": p["llm_base_url"]}.items() if v}
    values = {
        "data": {"benchmark": p["benchmark"], "data": _str(p["data"]), "subsets": list(p["subsets"]),
                 "images": _str(p["images"]), "skip_missing": p["skip_missing"]},
        "scoring": {"models": list(p["models"]), "device": p["device"], "dtype": p["dtype"],
                    "batch_size": p["batch_size"], "workers": p["workers"], "cache": cache,
                    "executor": p["executor"], "address": p["address"], "actors": p["actors"],
                    "gpus_per_actor": p["gpus_per_actor"], "one_pass": p["one_pass"]},
        "calibration": {"normalizers": list(p["normalizers"]), "ensembles": list(p["ensembles"]),
                        "prompts": p["prompt_sets"], "prompt_options": prompt_options,
                        "selection": "oracle" if p["oracle"] else "cv", "folds": p["folds"],
                        "select_metric": p["select_metric"], "standardize": p["standardize"]},
        "report": {"bootstrap": p["n_boot"], "confidence": p["confidence"], "seed": p["seed"],
                   "calibration_bins": p["calibration_bins"], "calibration_mapping": p["calibration_mapping"],
                   "plots": not p["no_plots"]},
    }
    if p["config_path"] is None:
        return LeaderboardConfig.from_dict(values)

    overrides: dict[str, dict[str, Any]] = {}
    for param, (name, _) in FLAGS.items():
        group, key = param.split(".")
        if (_given(ctx, name) or (key == "cache" and _given(ctx, "no_cache"))
                or (key == "prompt_options" and _given(ctx, "llm_base_url"))):
            overrides.setdefault(group, {})[key] = values[group][key]
    return LeaderboardConfig.from_yaml(p["config_path"], overrides)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user set the parameter ``name`` on the command line (not a default)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT,
                                                  ParameterSource.DEFAULT_MAP)


def _culprit(ctx: click.Context, param: str, config_path: Path | None) -> str:
    """The flag behind a config parameter, or its key in the --config file if no flag set it."""

    name, flag = FLAGS.get(param, (None, param))
    from_file = name is None or not _given(ctx, name)
    return f"{param} in {config_path}" if config_path is not None and from_file else flag


def _check_device(ctx: click.Context, config: Any, config_path: Path | None) -> None:
    """A device this machine lacks, refused before any work (a Ray cluster brings its own)."""
    from harness.scoring.specs import check_device_name

    device = config.scoring.device
    if device is None:
        return
    try:
        check_device_name(device)
        check_local_device(device, config.scoring.executor)
    except HarnessError as exc:
        raise HarnessError(f"{_culprit(ctx, 'scoring.device', config_path)}: {exc}") from exc


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _print_comparisons(comparisons: Any, confidence: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.evaluation.report import level

    ci = f"{level(confidence)} CI"
    table = Table(title="scored vs reported (paired bootstrap over prompts, AUROC)",
                  title_justify="left", header_style="bold")
    for col in ("subset", "method", "against", "n", "diff", ci, "p"):
        table.add_column(col, justify="right" if col in {"n", "diff", ci, "p"} else "left")
    for _, r in comparisons[comparisons["metric"] == "auroc"].iterrows():
        table.add_row(r["subset"], r["method"], r["against"], str(r["n_prompts"]), f"{r['diff']:+.4f}",
                      f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_value']:.3f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)


@cli.command("leaderboard")
@click.argument("benchmark", default="tia2", type=BenchmarkList())
@click.option("--config", "config_path", type=PathArg(exists=True, dir_okay=False),
              help="YAML file with groups data, scoring, calibration, report (flags override it).")
@click.option("--data", multiple=True, type=PathArg(exists=True, file_okay=False),
              help="Annotation folder (default: download into the cache); with several benchmarks, "
                   "roots holding one folder per benchmark (repeatable).")
@click.option("--images", type=PathArg(exists=True, file_okay=False),
              help="Image folder, paths as the annotations give them; with several benchmarks, "
                   "a root with one folder per benchmark id.")
@click.option("--skip-missing", is_flag=True, help="Score the images that exist; report how many were skipped.")
@click.option("--subset", "subsets", multiple=True, type=TEXT, help="Subset(s) to evaluate (default: all).")
@click.option("--out", type=PathArg(output=True, file_okay=False),
              help="Run folder (default: runs/<benchmark>-<time>).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True,
              help="Bootstrap resamples over prompts (0: no intervals).")
@click.option("--confidence", default=0.95, show_default=True, help="Confidence level of the intervals.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--calibration-bins", default=10, show_default=True, type=click.IntRange(2, 1000),
              help="Equal-mass bins of the ECE and the reliability diagrams.")
@click.option("--calibration-mapping", default="platt", show_default=True, type=click.Choice(["platt", "isotonic"]),
              help="How raw scores become probabilities for calibration (cross-fitted over prompts).")
@click.option("--force", is_flag=True, help="Replace --out even when it is not a harness run folder.")
@click.option("--json", "as_json", is_flag=True, help="Print leaderboard.json to stdout instead of tables.")
@model_options
@click.option("--normalizer", "normalizers", multiple=True, type=RegisteredId("normalizers"),
              help="Normalizer applied to each --model alone: textnorm, identity, zscore, or a "
                   "plugin's (repeatable).")
@click.option("--ensemble", "ensembles", multiple=True, type=RegisteredId("normalizers"),
              help="Normalizer over all --model together: mean, ur, zscore, or a plugin's (repeatable).")
@click.option("--prompts", "prompt_sets", default="benchmark", show_default=True, type=PromptSource(),
              help="Contrastive prompts: benchmark (the sets it ships), a generator (rules, llm, "
                   "tia2, ...) or a JSON file {prompt: [prompts]}.")
@click.option("--oracle", is_flag=True,
              help="Tune hyperparameters per prompt against its labels (rows labelled 'oracle').")
@click.option("--folds", default=5, show_default=True, help="Cross-validation folds over prompts.")
@click.option("--select-metric", default="auroc", show_default=True, type=TEXT,
              help="Metric that hyperparameters maximise.")
@click.option("--standardize", is_flag=True, help="Standardise each model's raw scores before normalizing.")
@click.option("--llm-model", default=None, type=TEXT, help="Chat model for --prompts llm.")
@click.option("--llm-base-url", default=None, type=Url(), help="OpenAI-compatible server for --prompts llm.")
@click.pass_context
def leaderboard_command(ctx: click.Context, out: Path | None, as_json: bool, force: bool,
                        **params: Any) -> None:
    """Evaluate reward models on BENCHMARK (default tia2) and write a run folder.

    Without --model: the paper's reported rows and the human-agreement row. With --model (and
    --images): each model scores every image against its prompt and gets a "scored" row.
    """
    from harness.evaluation.leaderboard import run_leaderboard
    from harness.evaluation.multi import expand_benchmarks, resolve_data_dir
    from harness.evaluation.report import render_terminal, rows_as_records, write_run

    benchmarks = expand_benchmarks(params["benchmark"])
    roots = list(params["data"])
    params["benchmark"] = benchmarks[0]
    params["data"] = resolve_data_dir(benchmarks[0], roots, single=True) if len(benchmarks) == 1 and roots else None
    if len(benchmarks) > 1:
        return _multi(ctx, benchmarks, roots, out, as_json, force, params)
    config, run_dir, result = _compute(
        ctx, params, lambda config: out or _default_out(config.data.benchmark), force,
        lambda config: run_leaderboard(config, progress=not as_json))
    _write(config, lambda: write_run(run_dir, result, plots=config.report.plots, force=force))
    if as_json:
        click.echo(json.dumps(rows_as_records(result.rows), indent=2))
    else:
        render_terminal(result.rows, notes=result.notes, confidence=result.confidence)
        if result.comparisons is not None and not result.comparisons.empty:
            _print_comparisons(result.comparisons, result.confidence)
    print_failures(result.failed_images)
    if result.missing_images:
        click.echo(f"Skipped {len(result.missing_images)} missing or unreadable images.", err=True)
    click.echo(f"Wrote {run_dir}", err=True)


def _multi(ctx: click.Context, benchmarks: list[str], roots: list[Path], out: Path | None,
           as_json: bool, force: bool, params: dict[str, Any]) -> None:
    """``harness leaderboard A,B``: a run per benchmark and the summary, written whole."""
    from harness.evaluation.multi import run_leaderboards
    from harness.evaluation.report import (
        render_summary_terminal,
        render_terminal,
        rows_as_records,
        write_multi_run,
    )

    name = "-".join(benchmarks) if len(benchmarks) < 4 else "all"
    config, run_dir, multi = _compute(
        ctx, params, lambda config: out or _default_out(name), force,
        lambda config: run_leaderboards(config, benchmarks, roots, params["images"], progress=not as_json))
    _write(config, lambda: write_multi_run(run_dir, multi, plots=config.report.plots, force=force))
    if as_json:
        click.echo(json.dumps(rows_as_records(multi.summary), indent=2))
    else:
        for bench, result in multi.results.items():
            click.echo(f"\n{bench}")
            render_terminal(result.rows, notes=result.notes[:1], confidence=result.confidence)
        render_summary_terminal(multi.summary, multi.confidence)
    for result in multi.results.values():
        print_failures(result.failed_images)
    click.echo(f"Wrote {run_dir}", err=True)


def _compute(ctx: click.Context, params: dict[str, Any], out_for: Any, force: bool, run: Any) -> Any:
    """The config from the flags, the checked output folder (before any work) and ``run(config)``;
    a bad setting names its flag (or config key)."""
    from harness.evaluation.config import ConfigError
    from harness.evaluation.report import check_out

    try:
        config = config_from_flags(ctx, params)
        _check_device(ctx, config, params["config_path"])
        run_dir = check_out(out_for(config), force)
        return config, run_dir, run(config)
    except ConfigError as exc:
        raise HarnessError(f"{_culprit(ctx, exc.param, params['config_path'])} {exc.problem}") from exc


def _write(config: Any, write: Any) -> None:
    """``write()`` the run folder; a failure says where the computed scores are kept."""
    try:
        write()
    except HarnessError as exc:
        kept = _cache_path(config.scoring.cache) if config.scoring.models else None
        raise HarnessError(f"{exc}; " + (f"the scores are kept in the score cache {kept}, so a rerun "
                                         "does not score again" if kept else "nothing was written")) from exc


def _cache_path(cache: str | bool) -> str | None:
    """Where the scores of a run are kept (None: no cache)."""
    if cache is False:
        return None
    if cache is True:
        from harness.io import cache_dir
        from harness.scoring.cache import DEFAULT_CACHE_NAME

        return str(cache_dir() / DEFAULT_CACHE_NAME)
    return str(cache)
