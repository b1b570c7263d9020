"""The ``harness`` command line.

Bad input raises :class:`harness.errors.HarnessError`; it is printed as one ``Error: ...`` line
and the command exits with status 2, without a traceback.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from harness import __version__
from harness.errors import HarnessError


class HarnessGroup(click.Group):
    """Turns :class:`HarnessError` into a one-line error with exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            raise _UserError(str(exc)) from exc


class _UserError(click.ClickException):
    exit_code = 2


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.capitalize()}: {record.getMessage()}"


def _setup_logging(verbose: int) -> None:
    logger = logging.getLogger("harness")
    if not any(getattr(h, "_harness", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_WarningFormatter())
        handler._harness = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Benchmark text-to-image reward models against human labels (TIA2), calibrate them with
    TextNorm, and fine-tune Stable Diffusion against them."""
    _setup_logging(verbose)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="JSON: a list of {name, version, hooks, registered}.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their hooks and what they registered."""
    from harness.plugins import get_plugins

    infos = get_plugins().list()
    if as_json:
        click.echo(json.dumps([i.as_json() for i in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("name", "version", "hooks", "registered"):
        table.add_column(col)
    for i in infos:
        registered = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.registered.items())
        table.add_row(i.name, i.version, ", ".join(i.hooks), registered or "-")
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@cli.command("benchmarks")
def benchmarks_command() -> None:
    """List registered benchmarks and their subsets."""
    from harness.plugins import get_plugins

    for entry in get_plugins().benchmarks:
        subsets = ", ".join(getattr(entry.cls, "subsets", ()))
        click.echo(f"{entry.id}: {entry.cls.description} [{subsets}] (plugin {entry.plugin})")


def _model_options(fn):
    options = [
        click.option("--model", "models", multiple=True, metavar="SPEC",
                     help="Reward model to score: NAME or NAME:key=value,... (repeatable)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="auto: float16 on GPU, float32 on CPU."),
        click.option("--batch-size", default=16, show_default=True, help="Images per forward pass."),
        click.option("--workers", default=0, show_default=True, help="Data-loader worker processes."),
        click.option("--cache", type=click.Path(path_type=Path), default=None,
                     help="Score cache (SQLite; default: <user cache>/scores.sqlite)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the score cache."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Score in this process or on a Ray cluster."),
        click.option("--address", default=None,
                     help="Ray cluster: auto (the cluster of `ray start`), ray://host:10001; default: a local instance."),
        click.option("--actors", default=1, show_default=True, help="Ray: model actors in the pool."),
        click.option("--gpus-per-actor", default=None, type=float,
                     help="Ray: GPUs per model actor, fractional allowed (default: 1 if the cluster has GPUs, else 0)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _ray_options(executor: str, address: str | None, actors: int, gpus_per_actor: float | None) -> Any:
    if executor != "ray":
        if address is not None or actors != 1 or gpus_per_actor is not None:
            raise HarnessError("--address, --actors and --gpus-per-actor need --executor ray")
        return None
    from harness.scoring.ray import RayOptions

    return RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor)


def _print_comparisons(comparisons: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scored vs reported (paired bootstrap over prompts, AUROC)",
                  title_justify="left", header_style="bold")
    for col in ("subset", "method", "against", "n", "diff", "95% CI", "p"):
        table.add_column(col, justify="right" if col in {"n", "diff", "95% CI", "p"} else "left")
    for _, r in comparisons[comparisons["metric"] == "auroc"].iterrows():
        table.add_row(r["subset"], r["method"], r["against"], str(r["n_prompts"]), f"{r['diff']:+.4f}",
                      f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_value']:.3f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def _print_failures(failed: dict[str, str]) -> None:
    if not failed:
        return
    click.echo(f"{len(failed)} images could not be read and were not scored:", err=True)
    for path, reason in list(failed.items())[:20]:
        click.echo(f"  {path}: {reason}", err=True)
    if len(failed) > 20:
        click.echo(f"  ... and {len(failed) - 20} more (all listed in manifest.json)", err=True)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="JSON list of {id, aliases, plugin, default_checkpoint}.")
def models_command(as_json: bool) -> None:
    """List registered reward models."""
    from harness.plugins import get_plugins

    rows = [{"id": e.id, "aliases": list(e.aliases), "plugin": e.plugin,
             "default_checkpoint": getattr(e.cls, "default_checkpoint", None),
             "description": (e.cls.__doc__ or "").strip().splitlines()[0] if e.cls.__doc__ else ""}
            for e in get_plugins().reward_models]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        click.echo(f"{r['id']}{alias}: {r['description']} [default checkpoint: {r['default_checkpoint']}; "
                   f"plugin {r['plugin']}]")


@cli.command("score")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder (or the base of --pairs paths).")
@click.option("--prompt", "prompts", multiple=True, help="Score every image against this prompt (repeatable).")
@click.option("--pairs", type=click.Path(path_type=Path), help="CSV with columns image,prompt.")
@click.option("--out", type=click.Path(path_type=Path), help="Write scores as CSV (image, prompt, model, score).")
@click.option("--json", "as_json", is_flag=True, help="Print scores as JSON.")
@_model_options
def score_command(
    images: Path | None, prompts: tuple[str, ...], pairs: Path | None, out: Path | None,
    as_json: bool, models: tuple[str, ...], device: str | None, dtype: str, batch_size: int,
    workers: int, cache: Path | None, no_cache: bool, executor: str, address: str | None,
    actors: int, gpus_per_actor: float | None,
) -> None:
    """Score images against prompts with one or more reward models."""
    import pandas as pd

    from harness.io import write_text
    from harness.scoring.specs import load_reward_model, parse_model_spec
    from harness.scoring.cache import open_score_cache
    from harness.scoring.runner import score_images

    if not models:
        raise HarnessError("give at least one --model (see `harness models`)")
    paths, per_image = _score_inputs(images, prompts, pairs)
    store = open_score_cache(False if no_cache else (cache or True))
    records, failed = [], {}
    try:
        for text in models:
            spec = parse_model_spec(text)
            model = load_reward_model(spec, device=device, dtype=dtype)
            run = score_images(model, paths, per_image, cache=store, batch_size=batch_size,
                               num_workers=workers, progress=not as_json, executor=executor,
                               ray_options=_ray_options(executor, address, actors, gpus_per_actor))
            failed.update(run.failed)
            for path, ps, values in zip(paths, per_image, run.scores, strict=True):
                if values is None:
                    continue
                records += [{"image": path, "prompt": p, "model": spec.label, "score": float(v)}
                            for p, v in zip(ps, values, strict=True)]
    finally:
        if store is not None:
            store.close()
    frame = pd.DataFrame(records, columns=["image", "prompt", "model", "score"])
    if out is not None:
        write_text(out, frame.to_csv(index=False))
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(header_style="bold")
        for col in ("image", "prompt", "model", "score"):
            table.add_column(col, justify="right" if col == "score" else "left")
        for r in records[:200]:
            table.add_row(r["image"], r["prompt"], r["model"], f"{r['score']:.4f}")
        Console(width=None if sys.stdout.isatty() else 140).print(table)
        if len(records) > 200:
            click.echo(f"... {len(records) - 200} more rows" + (f" in {out}" if out else ""))
    _print_failures(failed)
    if out is not None:
        click.echo(f"Wrote {out}", err=True)


def _score_inputs(images: Path | None, prompts: tuple[str, ...], pairs: Path | None):
    import pandas as pd

    if pairs is not None:
        if prompts:
            raise HarnessError("use either --pairs or --prompt, not both")
        try:
            table = pd.read_csv(pairs, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise HarnessError(f"cannot read --pairs file '{pairs}': {exc}") from exc
        if not {"image", "prompt"} <= set(table.columns):
            raise HarnessError(f"--pairs file '{pairs}' needs the columns image,prompt; "
                               f"it has {', '.join(table.columns)}")
        if table.empty:
            raise HarnessError(f"--pairs file '{pairs}' has no rows")
        grouped: dict[str, list[str]] = {}
        for image, prompt in zip(table["image"], table["prompt"], strict=True):
            path = Path(image) if images is None or Path(image).is_absolute() else images / image
            grouped.setdefault(str(path), []).append(prompt)
        return list(grouped), list(grouped.values())
    if images is None or not prompts:
        raise HarnessError("give --images DIR with --prompt TEXT, or --pairs pairs.csv")
    if images.is_file():
        paths = [images]
    elif images.is_dir():
        paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise HarnessError(f"images folder '{images}' does not exist")
    if not paths:
        raise HarnessError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{images}'")
    if any(not p.strip() for p in prompts):
        raise HarnessError("--prompt must not be empty")
    return [str(p) for p in paths], [list(prompts)] * len(paths)


@cli.group("prompts")
def prompts_group() -> None:
    """Contrastive prompt sets: generate them with a registered generator."""


@prompts_group.command("generate")
@click.option("--generator", "generator", default="rules", show_default=True,
              help="Prompt-set generator id (rules, llm, tia2, or a plugin's).")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="Text file, one prompt per line (or a JSON list).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON file {prompt: [contrastive prompts]}.")
@click.option("--n", type=int, default=None, help="Contrastive prompts per prompt (llm).")
@click.option("--model", default=None, help="Chat model name on the server (llm).")
@click.option("--base-url", default=None, help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (llm).")
@click.option("--api-key", default=None, help="API key (llm; default $OPENAI_API_KEY).")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (llm).")
@click.option("--seed", type=int, default=None, help="Sampling seed (llm).")
@click.option("--timeout", type=float, default=None, help="Seconds per request (llm).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="TIA2 annotation folder (tia2).")
def prompts_generate(generator: str, input_path: Path, out: Path, **settings: Any) -> None:
    """Write contrastive prompts for every prompt in --input."""
    from harness.io import write_json
    from harness.plugins import get_plugins

    cls = get_plugins().prompt_generators.get(generator)
    prompts = _read_prompts(input_path)
    if settings.get("data") is not None:
        settings["data_dir"] = settings.pop("data")
    import inspect

    params = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in settings.items() if v is not None}
    unused = [k for k in given if k not in params]
    if unused:
        flags = {"data_dir": "--data"}
        names = ", ".join(flags.get(u, "--" + u.replace("_", "-")) for u in unused)
        raise HarnessError(f"generator '{generator}' takes no {names}")
    sets = cls(**given).generate(prompts)
    empty = [p for p, v in sets.items() if not v]
    if empty:
        raise HarnessError(f"generator '{generator}' wrote no contrastive prompts for {empty[0]!r}")
    write_json(out, sets)
    sizes = [len(v) for v in sets.values()]
    click.echo(f"Wrote {len(sets)} prompt sets ({min(sizes)}-{max(sizes)} contrastive prompts each) to {out}", err=True)


def _read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HarnessError(f"cannot read prompts file '{path}': {exc.strerror}") from exc
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HarnessError(f"malformed JSON prompts file '{path}': {exc.msg}") from exc
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))
    if not prompts:
        raise HarnessError(f"prompts file '{path}' has no prompts")
    return prompts


@cli.command("finetune")
@click.argument("method", type=click.Choice(["sft", "ddpo"]))
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="YAML file of settings (see docs/finetune.md).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config setting.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Train (data-parallel workers).")
@click.option("--workers", default=2, show_default=True, help="Ray Train workers (with --ray).")
@click.option("--address", default=None, help="Ray cluster address (with --ray; default: a local instance).")
@click.option("--max-failures", default=2, show_default=True, help="Worker-group restarts from the last checkpoint (with --ray).")
def finetune_command(method: str, config_path: Path, overrides: tuple[str, ...], resume: bool,
                     use_ray: bool, workers: int, address: str | None, max_failures: int) -> None:
    """Fine-tune Stable Diffusion against a reward with SFT or DDPO (LoRA)."""
    import yaml

    from harness_plugins.sd.config import load_config
    from harness.plugins import get_plugins

    tuner = get_plugins().finetuners.get(f"sd_{method}")
    extra = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise HarnessError(f"--set expects KEY=VALUE, got '{item}'")
        extra[key.strip()] = yaml.safe_load(value)
    if resume:
        extra["resume_from"] = "latest"
    config = load_config(tuner.config_class, config_path, **extra)
    if use_ray:
        from harness.finetune.ray_train import train_on_ray

        result = train_on_ray(tuner.id, config, workers, address=address, max_failures=max_failures)
        click.echo(f"Ray Train finished {len(result['log'])} epochs; last checkpoint {result['checkpoint']}", err=True)
        return
    result = tuner.trainer_class(config, progress=True).train()
    last = result["log"][-1] if result["log"] else {}
    click.echo(f"Trained {config.num_epochs} epochs; last mean reward {last.get('reward_mean', float('nan')):.4f}; "
               f"checkpoints in {config.output_dir}/checkpoints", err=True)
    if result.get("selected"):
        click.echo(f"Selected checkpoint: epoch {result['selected']['epoch']} "
                   f"(wins over the base model per epoch: {result['selected']['wins']})", err=True)


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
@_model_options
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
        ray_options=_ray_options(executor, address, actors, gpus_per_actor),
    )
    if as_json:
        click.echo(json.dumps(rows_as_records(result.rows), indent=2))
    else:
        render_terminal(result.rows, notes=result.notes)
        if result.comparisons is not None and not result.comparisons.empty:
            _print_comparisons(result.comparisons)
    _print_failures(result.failed_images)
    if result.missing_images:
        click.echo(f"Skipped {len(result.missing_images)} missing images.", err=True)
    click.echo(f"Wrote {result.run_dir}", err=True)


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--plots/--no-plots", default=True, help="Redraw plots/*.png.")
def report_command(run_dir: Path, plots: bool) -> None:
    """Re-render a run folder's tables and plots from its leaderboard.json."""
    from harness.io import write_text
    from harness.evaluation.report import load_rows, plot_rows, render_html, render_markdown, render_terminal

    rows = load_rows(run_dir)
    write_text(run_dir / "leaderboard.md", render_markdown(rows))
    write_text(run_dir / "leaderboard.html", render_html(rows))
    if plots:
        plot_rows(rows, run_dir / "plots")
    render_terminal(rows)


def build_cli() -> click.Group:
    """The root command with every plugin's commands added."""
    from harness.plugins import get_plugins

    get_plugins().add_commands(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    _setup_logging(0)
    try:
        root = build_cli()
    except HarnessError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    root.main(args=argv, prog_name="harness")


if __name__ == "__main__":
    main()
