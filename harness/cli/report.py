"""``harness report RUN_DIR``: re-render a run folder."""

from __future__ import annotations

from pathlib import Path

import click

from harness.cli.root import cli


@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--plots/--no-plots", default=True, help="Redraw plots/*.png.")
def report_command(run_dir: Path, plots: bool) -> None:
    """Re-render a run folder's tables and plots from its leaderboard.json."""
    from harness.evaluation.report import (
        load_rows,
        plot_rows,
        render_html,
        render_markdown,
        render_terminal,
    )
    from harness.io import write_text

    rows = load_rows(run_dir)
    write_text(run_dir / "leaderboard.md", render_markdown(rows))
    write_text(run_dir / "leaderboard.html", render_html(rows))
    if plots:
        plot_rows(rows, run_dir / "plots")
    render_terminal(rows)
