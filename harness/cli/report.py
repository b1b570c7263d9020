"""``harness report RUN_DIR``: re-render a run folder's tables and plots as the run wrote them."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.options import PathArg
from harness.cli.root import cli


@cli.command("report")
@click.argument("run_dir", type=PathArg(exists=True, file_okay=False))
@click.option("--plots/--no-plots", default=True, help="Redraw plots/*.png.")
def report_command(run_dir: Path, plots: bool) -> None:
    """Re-render a run folder's tables and plots from its leaderboard.json and manifest.json."""
    from harness.evaluation.report import (
        load_run,
        plot_rows,
        render_html,
        render_markdown,
        render_terminal,
    )
    from harness.io import write_text

    rows, title, notes, confidence = load_run(run_dir)
    write_text(run_dir / "leaderboard.md", render_markdown(rows, notes, title, confidence))
    write_text(run_dir / "leaderboard.html", render_html(rows, notes, title, confidence))
    if plots:
        plot_rows(rows, run_dir / "plots", confidence)
    render_terminal(rows, notes=notes, confidence=confidence)
