"""Contrastive prompt sets for a run: the benchmark's own, a generator's, or a JSON file."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.io import read_json
from harness.plugins import get_plugins
from harness.types import BenchmarkData

#: ``--prompts benchmark``: the sets the benchmark itself ships (``BenchmarkData.contrastive``).
BENCHMARK_SETS = "benchmark"


def construct(cls: type, available: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> Any:
    """``cls(**kwargs)`` with ``given`` (every key must be a constructor argument) plus those of
    ``available`` that the constructor declares (e.g. ``data_dir`` for a generator that reads a
    benchmark's files)."""
    given = dict(given or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in given if k not in params and not takes_any]
    if unknown:
        names = ", ".join(n for n in params if n != "self") or "none"
        raise HarnessError(f"{getattr(cls, 'id', cls.__name__)} takes no option "
                           f"{', '.join(repr(u) for u in unknown)}; its options: {names}")
    extra = {k: v for k, v in available.items() if k in params and k not in given and v is not None}
    return cls(**extra, **given)


def generate(generator: str, prompts: Iterable[str], options: Mapping[str, Any] | None = None,
             data_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Run a registered prompt-set generator over ``prompts`` (distinct, in order)."""
    cls = get_plugins().prompt_generators.get(generator)
    wanted = list(dict.fromkeys(prompts))
    sets = construct(cls, {"data_dir": data_dir}, options).generate(wanted)
    if not isinstance(sets, Mapping):
        raise HarnessError(f"prompt generator '{generator}' returned {type(sets).__name__}, "
                           "expected a mapping {prompt: [contrastive prompts]}")
    out = {}
    for prompt in wanted:
        values = sets.get(prompt)
        if not is_prompt_list(values):
            raise HarnessError(f"prompt generator '{generator}' gave {values!r:.60} for {prompt!r}; "
                               "expected a list of contrastive prompts (strings)")
        out[prompt] = list(values)
    return out


def is_prompt_list(values: Any) -> bool:
    """A list (or tuple) of strings: never a bare string, whose characters would pass for prompts."""
    return isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values)


def read_sets(path: str | Path) -> dict[str, list[str]]:
    """A JSON file ``{prompt: [contrastive prompts]}``."""
    by_prompt = read_json(path, "prompt-sets file", "expected {prompt: [contrastive prompts]}")
    if not isinstance(by_prompt, dict):
        raise HarnessError(f"prompt sets '{path}' must be a JSON object {{prompt: [prompts]}}")
    for prompt, values in by_prompt.items():
        if not is_prompt_list(values):
            raise HarnessError(f"prompt sets '{path}': the value of {prompt!r} must be a list of "
                               "strings")
    return by_prompt


def contrastive_sets(
    loaded: BenchmarkData, source: str, options: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
) -> dict[tuple[str, str], list[str]]:
    """``{(subset, prompt): [contrastive prompts]}`` for every prompt of ``loaded``.

    :param source: ``benchmark`` (the sets the benchmark ships), a JSON file, or a registered
        prompt-set generator id (run with ``options``; ``data_dir`` is passed to generators
        that declare it).
    """
    labels = loaded.images
    pairs = list(dict.fromkeys(zip(labels["subset"].astype(str), labels["prompt"], strict=True)))
    path = Path(source).expanduser()
    if source == BENCHMARK_SETS:
        if not loaded.contrastive:
            raise HarnessError(f"benchmark '{loaded.benchmark}' ships no contrastive prompt sets: "
                               "pass --prompts with a generator (rules, llm) or a JSON file")
        sets = {}
        for pair in pairs:
            values = loaded.contrastive.get(pair, [])
            if not is_prompt_list(values):
                raise HarnessError(f"benchmark '{loaded.benchmark}' gave {type(values).__name__} "
                                   f"{values!r:.60} as the contrastive prompts of {pair[1]!r}; "
                                   "expected a list of strings (a bug in the benchmark plugin)")
            sets[pair] = list(values)
    elif path.suffix == ".json" or path.is_file():
        by_prompt = read_sets(path)
        sets = {(s, p): list(by_prompt.get(p, [])) for s, p in pairs}
    else:
        generated = generate(source, (p for _, p in pairs), options, data_dir)
        sets = {(s, p): generated[p] for s, p in pairs}
    empty = [pair for pair, v in sets.items() if not v]
    if empty:
        s, p = empty[0]
        raise HarnessError(
            f"{len(empty)} prompts have no contrastive prompts in '{source}', e.g. {s}: {p!r}"
        )
    return sets
