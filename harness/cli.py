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
    Console().print(table)


@cli.command("benchmarks")
def benchmarks_command() -> None:
    """List registered benchmarks and their subsets."""
    from harness.plugins import get_plugins

    for entry in get_plugins().benchmarks:
        subsets = ", ".join(getattr(entry.cls, "subsets", ()))
        click.echo(f"{entry.id}: {entry.cls.description} [{subsets}] (plugin {entry.plugin})")


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
def leaderboard_command(
    benchmark: str, data: Path | None, images: Path | None, skip_missing: bool,
    subsets: tuple[str, ...], out: Path | None, seed: int, n_boot: int, confidence: float,
    no_plots: bool, as_json: bool,
) -> None:
    """Evaluate reward models on BENCHMARK (default tia2) and write a run folder."""
    from harness.leaderboard import run_leaderboard
    from harness.report import render_terminal, rows_as_records

    result = run_leaderboard(
        benchmark, data=data, subsets=list(subsets) or None, images=images,
        skip_missing=skip_missing, n_boot=n_boot, seed=seed, confidence=confidence,
        out=out or _default_out(benchmark), plots=not no_plots,
    )
    if as_json:
        click.echo(json.dumps(rows_as_records(result.rows), indent=2))
    else:
        render_terminal(result.rows, notes=result.notes)
    if result.missing_images:
        click.echo(f"Skipped {len(result.missing_images)} missing images.", err=True)
    click.echo(f"Wrote {result.run_dir}", err=True)


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--plots/--no-plots", default=True, help="Redraw plots/*.png.")
def report_command(run_dir: Path, plots: bool) -> None:
    """Re-render a run folder's tables and plots from its leaderboard.json."""
    from harness.atomic import write_text
    from harness.report import load_rows, plot_rows, render_html, render_markdown, render_terminal

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
