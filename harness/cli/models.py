"""``harness models``: registered reward models."""

from __future__ import annotations

import json

import click

from harness.cli.options import RegisteredId
from harness.cli.root import cli


@cli.command("models")
@click.argument("model", required=False, type=RegisteredId("reward_models"))
@click.option("--json", "as_json", is_flag=True,
              help="JSON list of {id, aliases, plugin, default_checkpoint, description, card}.")
def models_command(model: str | None, as_json: bool) -> None:
    """List registered reward models; with MODEL, its model card."""
    import dataclasses

    from harness.plugins import get_plugins

    catalog = get_plugins().reward_models
    entries = [catalog.entry(model)] if model else list(catalog)
    rows = []
    for e in entries:
        card = getattr(e.cls, "card", None)
        rows.append({"id": e.id, "aliases": list(e.aliases), "plugin": e.plugin,
                     "default_checkpoint": getattr(e.cls, "default_checkpoint", None),
                     "description": (e.cls.__doc__ or "").strip().splitlines()[0] if e.cls.__doc__ else "",
                     "card": dataclasses.asdict(card) if card is not None else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        click.echo(f"{r['id']}{alias}: {r['description']} [default checkpoint: {r['default_checkpoint']}; "
                   f"plugin {r['plugin']}]")
        if model:
            for key, value in (r["card"] or {"card": "none published"}).items():
                if value:
                    click.echo(f"  {key}: {value}")
