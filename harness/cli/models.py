"""``harness models``: registered reward models."""

from __future__ import annotations

import json

import click

from harness.cli.root import cli


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="JSON list of {id, aliases, plugin, default_checkpoint}.")
def models_command(as_json: bool) -> None:
    """List registered reward models."""
    from harness.plugins import get_plugins

    rows = [{"id": e.id, "aliases": list(e.aliases), "plugin": e.plugin,
             "default_checkpoint": getattr(e.cls, "default_checkpoint", None),
             "description": (e.cls.__doc__ or "").strip().splitlines()[0] if e.cls.__doc__ else ""}
            for e in get_plugins().reward_models]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        click.echo(f"{r['id']}{alias}: {r['description']} [default checkpoint: {r['default_checkpoint']}; "
                   f"plugin {r['plugin']}]")
