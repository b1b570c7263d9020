"""``harness benchmarks``: registered benchmarks."""

from __future__ import annotations

import click

from harness.cli.root import cli


@cli.command("benchmarks")
def benchmarks_command() -> None:
    """List registered benchmarks and their subsets."""
    from harness.plugins import get_plugins

    for entry in get_plugins().benchmarks:
        subsets = ", ".join(getattr(entry.cls, "subsets", ()))
        click.echo(f"{entry.id}: {entry.cls.description} [{subsets}] (plugin {entry.plugin})")
