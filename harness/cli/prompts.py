"""``harness prompts generate``: contrastive prompt sets from a registered generator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from harness.cli.options import TEXT, FiniteFloat, PathArg, RegisteredId, Url
from harness.cli.root import cli
from harness.errors import HarnessError

#: beyond these a value is a typo
MAX_PROMPTS = 10_000
MAX_TIMEOUT = 24 * 3600.0


@cli.group("prompts")
def prompts_group() -> None:
    """Contrastive prompt sets: generate them with a registered generator."""


@prompts_group.command("generate")
@click.option("--generator", "generator", default="rules", show_default=True,
              type=RegisteredId("prompt_generators"),
              help="Prompt-set generator id (rules, llm, tia2, or a plugin's).")
@click.option("--input", "input_path", type=PathArg(exists=True, dir_okay=False), required=True,
              help="Text file, one prompt per line (or a JSON list).")
@click.option("--out", type=PathArg(output=True, dir_okay=False), required=True,
              help="JSON file {prompt: [contrastive prompts]}.")
@click.option("--n", type=click.IntRange(1, MAX_PROMPTS), default=None,
              help="Contrastive prompts per prompt (llm).")
@click.option("--model", default=None, type=TEXT, help="Chat model name on the server (llm).")
@click.option("--base-url", default=None, type=Url(),
              help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (llm).")
@click.option("--api-key", default=None, type=TEXT, help="API key (llm; default $OPENAI_API_KEY).")
@click.option("--temperature", type=FiniteFloat(0, 2), default=None,
              help="Sampling temperature, 0-2 (llm).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Sampling seed (llm).")
@click.option("--timeout", type=FiniteFloat(0, MAX_TIMEOUT, min_open=True), default=None,
              help="Seconds per request (llm).")
@click.option("--data", type=PathArg(exists=True, file_okay=False), default=None,
              help="TIA2 annotation folder (tia2).")
def prompts_generate(generator: str, input_path: Path, out: Path, **settings: Any) -> None:
    """Write contrastive prompts for every prompt in --input."""
    from harness.io import write_json
    from harness.plugins import get_plugins

    cls = get_plugins().prompt_generators.get(generator)
    prompts = _read_prompts(input_path)
    if settings.get("data") is not None:
        settings["data_dir"] = settings.pop("data")
    import inspect

    params = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in settings.items() if v is not None}
    unused = [k for k in given if k not in params]
    if unused:
        flags = {"data_dir": "--data"}
        names = ", ".join(flags.get(u, "--" + u.replace("_", "-")) for u in unused)
        raise HarnessError(f"generator '{generator}' takes no {names}")
    sets = cls(**given).generate(prompts)
    empty = [p for p, v in sets.items() if not v]
    if empty:
        raise HarnessError(f"generator '{generator}' wrote no contrastive prompts for {empty[0]!r}")
    write_json(out, sets)
    sizes = [len(v) for v in sets.values()]
    click.echo(f"Wrote {len(sets)} prompt sets ({min(sizes)}-{max(sizes)} contrastive prompts each) to {out}", err=True)


def _read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HarnessError(f"cannot read prompts file '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise HarnessError(f"prompts file '{path}' is not UTF-8 text: give one prompt per line "
                           "or a JSON list of prompts") from exc
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HarnessError(f"malformed JSON prompts file '{path}': {exc.msg}") from exc
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))
    if not prompts:
        raise HarnessError(f"prompts file '{path}' has no prompts")
    return prompts
