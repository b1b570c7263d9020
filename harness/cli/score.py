"""``harness score``: images against prompts with one or more reward models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from harness.cli.options import (
    TEXT,
    PathArg,
    build_executor,
    check_local_device,
    model_options,
    print_failures,
)
from harness.cli.root import cli
from harness.errors import HarnessError
from harness.images import (
    IMAGE_SUFFIXES,
    describe_unreadable,
    list_images,
    skipped_lines,
    unreadable_images,
)


@cli.command("score")
@click.option("--images", type=PathArg(), help="Image folder (or the base of --pairs paths).")
@click.option("--prompt", "prompts", multiple=True, type=TEXT,
              help="Score every image against this prompt (repeatable).")
@click.option("--pairs", type=PathArg(dir_okay=False), help="CSV with columns image,prompt.")
@click.option("--out", type=PathArg(output=True, dir_okay=False),
              help="Write scores as CSV (image, prompt, model, score).")
@click.option("--json", "as_json", is_flag=True, help="Print scores as JSON.")
@click.option("--skip-missing", is_flag=True,
              help="Skip (and list) images that are missing or cannot be read instead of stopping.")
@model_options
def score_command(
    images: Path | None, prompts: tuple[str, ...], pairs: Path | None, out: Path | None,
    as_json: bool, skip_missing: bool, models: tuple[str, ...], device: str | None, dtype: str,
    batch_size: int, workers: int, cache: Path | None, no_cache: bool, executor: str, address: str | None,
    actors: int, gpus_per_actor: float | None, one_pass: bool,
) -> None:
    """Score images against prompts with one or more reward models."""
    import pandas as pd

    from harness.io import write_text
    from harness.scoring.runner import score_models

    if not models:
        raise HarnessError("give at least one --model (see `harness models`)")
    run_on = build_executor(executor, workers, address, actors, gpus_per_actor)
    check_local_device(device, executor)
    paths, per_image = _score_inputs(images, prompts, pairs, skip_missing)
    results = score_models(models, paths, per_image, device=device, dtype=dtype,
                           cache=False if no_cache else (cache or True), batch_size=batch_size,
                           progress=not as_json, executor=run_on, one_pass=one_pass)
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


def _score_inputs(images: Path | None, prompts: tuple[str, ...], pairs: Path | None,
                  skip_missing: bool = False) -> tuple[list[str], list[list[str]]]:
    """The images to score and each one's prompts. Entries that cannot be read at all (missing,
    broken or looping links, folders named like images, unopenable or empty files: see
    :func:`harness.images.unreadable_reason`) stop the command naming the first one, or with
    ``skip_missing`` are listed on stderr and left out."""
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
        culprits = unreadable_images(grouped)
        kept = _readable(list(grouped), culprits, skip_missing, f"--pairs file '{pairs}'")
        return kept, [grouped[p] for p in kept]
    if images is None or not prompts:
        raise HarnessError("give --images DIR with --prompt TEXT, or --pairs pairs.csv")
    if any(not p.strip() for p in prompts):
        raise HarnessError("--prompt must not be empty")
    if images.is_dir():
        paths, culprits = list_images(images)
        if not paths and not culprits:
            raise HarnessError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{images}'")
    elif images.is_file() or os.path.lexists(images):
        paths, culprits = [str(images)], unreadable_images([images])
    else:
        raise HarnessError(f"images folder '{images}' does not exist")
    paths = _readable(paths, culprits, skip_missing, f"'{images}'")
    return paths, [list(prompts)] * len(paths)


def _readable(paths: list[str], culprits: dict[str, str], skip_missing: bool, where: str,
              ) -> list[str]:
    """``paths`` less ``culprits``; without ``skip_missing`` a culprit is an error."""
    if culprits and not skip_missing:
        first, why = next(iter(culprits.items()))
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        raise HarnessError(f"cannot read '{first}': {why}{more}; fix it or pass --skip-missing "
                           "to skip what cannot be read and score the rest")
    kept = [p for p in paths if p not in culprits]
    if not kept:
        raise HarnessError(f"no image of {where} can be read: {describe_unreadable(culprits)}")
    if culprits:
        click.echo("\n".join(skipped_lines(culprits)), err=True)
    return kept
