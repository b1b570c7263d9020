"""Options and printing shared by several commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from harness.errors import HarnessError


def model_options(fn):
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


def build_executor(executor: str, workers: int, address: str | None, actors: int,
                   gpus_per_actor: float | None) -> Any:
    """The :class:`~harness.scoring.executors.Executor` the ``--executor``, ``--workers``,
    ``--address``, ``--actors`` and ``--gpus-per-actor`` flags describe."""
    if workers < 0:
        raise HarnessError(f"--workers must be >= 0, got {workers}")
    if executor != "ray":
        if address is not None or actors != 1 or gpus_per_actor is not None:
            raise HarnessError("--address, --actors and --gpus-per-actor need --executor ray")
        from harness.scoring.executors import LocalExecutor

        return LocalExecutor(num_workers=workers)
    if actors < 1:
        raise HarnessError(f"--actors must be >= 1, got {actors}")
    if gpus_per_actor is not None and gpus_per_actor < 0:
        raise HarnessError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    from harness.scoring.ray import RayExecutor, RayOptions

    return RayExecutor(RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor))


def print_comparisons(comparisons: Any) -> None:
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


def print_failures(failed: dict[str, str]) -> None:
    if not failed:
        return
    click.echo(f"{len(failed)} images could not be read and were not scored:", err=True)
    for path, reason in list(failed.items())[:20]:
        click.echo(f"  {path}: {reason}", err=True)
    if len(failed) > 20:
        click.echo(f"  ... and {len(failed) - 20} more (all listed in manifest.json)", err=True)
