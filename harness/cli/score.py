"""``harness score``: images against prompts with one or more reward models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from harness.cli.options import build_executor, model_options, print_failures
from harness.cli.root import cli
from harness.errors import HarnessError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@cli.command("score")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder (or the base of --pairs paths).")
@click.option("--prompt", "prompts", multiple=True, help="Score every image against this prompt (repeatable).")
@click.option("--pairs", type=click.Path(path_type=Path), help="CSV with columns image,prompt.")
@click.option("--out", type=click.Path(path_type=Path), help="Write scores as CSV (image, prompt, model, score).")
@click.option("--json", "as_json", is_flag=True, help="Print scores as JSON.")
@model_options
def score_command(
    images: Path | None, prompts: tuple[str, ...], pairs: Path | None, out: Path | None,
    as_json: bool, models: tuple[str, ...], device: str | None, dtype: str, batch_size: int,
    workers: int, cache: Path | None, no_cache: bool, executor: str, address: str | None,
    actors: int, gpus_per_actor: float | None,
) -> None:
    """Score images against prompts with one or more reward models."""
    import pandas as pd

    from harness.io import write_text
    from harness.scoring.runner import score_models

    if not models:
        raise HarnessError("give at least one --model (see `harness models`)")
    run_on = build_executor(executor, workers, address, actors, gpus_per_actor)
    paths, per_image = _score_inputs(images, prompts, pairs)
    results = score_models(models, paths, per_image, device=device, dtype=dtype,
                           cache=False if no_cache else (cache or True), batch_size=batch_size,
                           progress=not as_json, executor=run_on)
    records, failed = [], {}
    for result in results:
        failed.update(result.run.failed)
        for path, ps, values in zip(paths, per_image, result.run.scores, strict=True):
            if values is None:
                continue
            records += [{"image": path, "prompt": p, "model": result.label, "score": float(v)}
                        for p, v in zip(ps, values, strict=True)]
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
    print_failures(failed)
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
