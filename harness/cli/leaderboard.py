"""``harness leaderboard``: reward models against a benchmark's human labels."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click

from harness.cli.options import model_options, print_comparisons, print_failures, ray_options
from harness.cli.root import cli


def _default_out(benchmark: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{benchmark}-{stamp}"


@cli.command("leaderboard")
@click.argument("benchmark", default="tia2")
@click.option("--data", type=click.Path(path_type=Path), help="Annotation folder (default: download into the cache).")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder: DIR/<subset>/<file>.")
@click.option("--skip-missing", is_flag=True, help="Score the images that exist; report how many were skipped.")
@click.option("--subset", "subsets", multiple=True, help="Subset(s) to evaluate (default: all).")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder (default: runs/<benchmark>-<time>).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples over prompts.")
@click.option("--confidence", default=0.95, show_default=True, help="Confidence level of the intervals.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--json", "as_json", is_flag=True, help="Print leaderboard.json to stdout instead of tables.")
@model_options
@click.option("--normalizer", "normalizers", multiple=True,
              help="Per-model normalizer: textnorm, identity, or zscore (repeatable).")
@click.option("--ensemble", "ensembles", multiple=True, help="Ensemble over all --model: mean, ur, zscore.")
@click.option("--prompts", "prompt_sets", default="tia2", show_default=True,
              help="Contrastive prompts: tia2, rules, llm, or a JSON file {prompt: [prompts]}.")
@click.option("--oracle", is_flag=True,
              help="Tune TextNorm per prompt against its labels (rows labelled 'oracle').")
@click.option("--folds", default=5, show_default=True, help="Cross-validation folds over prompts.")
@click.option("--select-metric", default="auroc", show_default=True, help="Metric that hyperparameters maximise.")
@click.option("--standardize", is_flag=True, help="Standardise each model's raw scores before TextNorm.")
@click.option("--llm-model", default=None, help="Chat model for --prompts llm.")
@click.option("--llm-base-url", default=None, help="OpenAI-compatible server for --prompts llm.")
def leaderboard_command(
    benchmark: str, data: Path | None, images: Path | None, skip_missing: bool,
    subsets: tuple[str, ...], out: Path | None, seed: int, n_boot: int, confidence: float,
    no_plots: bool, as_json: bool, models: tuple[str, ...], device: str | None, dtype: str,
    batch_size: int, workers: int, cache: Path | None, no_cache: bool, executor: str,
    address: str | None, actors: int, gpus_per_actor: float | None, normalizers: tuple[str, ...], ensembles: tuple[str, ...], prompt_sets: str, oracle: bool,
    folds: int, select_metric: str, standardize: bool, llm_model: str | None,
    llm_base_url: str | None,
) -> None:
    """Evaluate reward models on BENCHMARK (default tia2) and write a run folder.

    Without --model: the paper's reported rows and the human-agreement row. With --model (and
    --images): each model scores every image against its prompt and gets a "scored" row.
    """
    from harness.evaluation.leaderboard import run_leaderboard
    from harness.evaluation.report import render_terminal, rows_as_records

    result = run_leaderboard(
        benchmark, data=data, subsets=list(subsets) or None, images=images,
        skip_missing=skip_missing, n_boot=n_boot, seed=seed, confidence=confidence,
        out=out or _default_out(benchmark), plots=not no_plots, models=models, device=device,
        dtype=dtype, batch_size=batch_size, num_workers=workers,
        cache=False if no_cache else (cache or True), progress=not as_json,
        normalizers=normalizers, ensembles=ensembles, prompt_sets=prompt_sets,
        prompt_options={k: v for k, v in {"model": llm_model, "base_url": llm_base_url}.items() if v},
        selection="oracle" if oracle else "cv", folds=folds, select_metric=select_metric,
        standardize=standardize, executor=executor,
        ray_options=ray_options(executor, address, actors, gpus_per_actor),
    )
    if as_json:
        click.echo(json.dumps(rows_as_records(result.rows), indent=2))
    else:
        render_terminal(result.rows, notes=result.notes)
        if result.comparisons is not None and not result.comparisons.empty:
            print_comparisons(result.comparisons)
    print_failures(result.failed_images)
    if result.missing_images:
        click.echo(f"Skipped {len(result.missing_images)} missing images.", err=True)
    click.echo(f"Wrote {result.run_dir}", err=True)
