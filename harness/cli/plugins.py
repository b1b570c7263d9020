"""``harness plugins``: loaded plugins, their hooks and what they registered."""

from __future__ import annotations

import json
import sys

import click

from harness.cli.root import cli


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
