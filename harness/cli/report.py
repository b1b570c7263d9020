"""``harness report RUN_DIR``: re-render a run folder's tables and plots as the run wrote them."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import PathArg
from harness.cli.root import cli


@cli.command("report")
@click.argument("run_dir", type=PathArg(exists=True, file_okay=False))
@click.option("--plots/--no-plots", default=True, help="Redraw plots/*.png.")
@click.option("--method", default=None, metavar="NAME",
              help="The scored model whose order the report's image pages show first.")
@click.option("--images", "images", type=PathArg(exists=True, file_okay=False), default=None,
              help="The images folder, if it moved since the run (thumbnails are made from it).")
def report_command(run_dir: Path, plots: bool, method: str | None, images: Path | None) -> None:
    """Re-render a run folder's tables, plots and HTML report (report/index.html) from its files."""
    from harness.evaluation.html_report import write_report, write_summary_report
    from harness.evaluation.report import (
        load_run,
        plot_rows,
        render_html,
        render_markdown,
        render_terminal,
    )
    from harness.io import write_text

    if (run_dir / "summary.json").is_file() and not (run_dir / "leaderboard.json").is_file():
        for bench in sorted(p.parent for p in run_dir.glob("*/leaderboard.json")):  # cross-benchmark
            write_report(bench, images / bench.name if images else None, method)
        click.echo(f"Wrote {write_summary_report(run_dir)}", err=True)
        return
    rows, title, notes, confidence = load_run(run_dir)
    write_text(run_dir / "leaderboard.md", render_markdown(rows, notes, title, confidence))
    write_text(run_dir / "leaderboard.html", render_html(rows, notes, title, confidence))
    if plots:
        plot_rows(rows, run_dir / "plots", confidence)
    index = write_report(run_dir, images, method)
    render_terminal(rows, notes=notes, confidence=confidence)
    click.echo(f"Wrote {index}", err=True)
