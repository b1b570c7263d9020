"""The ``harness`` command line: one module per command, each parsing flags and calling the library.

Bad input raises :class:`harness.errors.HarnessError`; it is printed as one ``Error: ...`` line
and the command exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys

import click

from harness.cli import (  # noqa: F401 - importing a command module adds it to the group
    benchmarks,
    data,
    finetune,
    leaderboard,
    models,
    plugins,
    prompts,
    report,
    score,
)
from harness.cli.root import _setup_logging, cli, one_line
from harness.errors import HarnessError

__all__ = ["build_cli", "cli", "main"]


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
        click.echo(f"Error: {one_line(str(exc))}", err=True)
        sys.exit(2)
    root.main(args=argv, prog_name="harness")


if __name__ == "__main__":
    main()
