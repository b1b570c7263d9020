"""Options, parameter types and printing shared by several commands.

Every option is checked by its click type before a command starts work, so a bad value is one
``Error: Invalid value for '--flag': ...`` line (exit status 2): numbers have ranges (and are
finite), paths say whether they must exist and be a file or a folder (an output's folder must be
creatable), ids are looked up among the registered plugins, and text must not be blank. (The
leaderboard's own numbers are checked once, by ``LeaderboardConfig.validate``, for its flags and
its YAML file alike; the command names the flag.)
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from harness.errors import HarnessError

#: upper bounds of counts: beyond them a value is a typo, not a setting
MAX_BATCH = 1 << 16
MAX_PROCESSES = 1024


class Text(click.ParamType):
    """Text that is not blank (an empty ``--prompt ''`` or ``--model ' '`` is a mistake)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if not value.strip():
            self.fail("must not be empty.", param, ctx)
        if "\x00" in value:
            self.fail("must not contain a NUL character.", param, ctx)
        return value


TEXT = Text()


class FiniteFloat(click.FloatRange):
    """A float in a range, never NaN or infinite (click's FloatRange lets NaN through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class PathArg(click.Path):
    """A path that is not empty; with ``output=True``, one the command can create: it may not
    exist yet, but its nearest existing ancestor is a writable folder."""

    def __init__(self, *, output: bool = False, **kwargs: Any):
        super().__init__(path_type=Path, **kwargs)
        self.output = output

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = os.fspath(value)
        if not text.strip():
            self.fail("must not be empty.", param, ctx)
        if "\x00" in text:
            self.fail("must not contain a NUL character.", param, ctx)
        if os.path.exists(text):
            if not self.file_okay and not os.path.isdir(text):
                self.fail(f"'{text}' is not a folder (it is a file).", param, ctx)
            if not self.dir_okay and os.path.isdir(text):
                self.fail(f"'{text}' is not a file (it is a folder).", param, ctx)
        elif self.exists:
            self.fail(f"'{text}' does not exist.", param, ctx)
        path = super().convert(value, param, ctx)
        if self.output and not path.exists():
            parent = path.expanduser().absolute().parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                self.fail(f"'{path}' cannot be created: '{parent}' is a file, not a folder.",
                          param, ctx)
            if not os.access(parent, os.W_OK | os.X_OK):
                self.fail(f"'{path}' cannot be created: the folder '{parent}' is not writable.",
                          param, ctx)
        return path


class RegisteredId(click.ParamType):
    """The id (or alias) of a registered plugin class of one kind, e.g. ``normalizers``."""

    name = "id"

    def __init__(self, kind: str):
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from harness.plugins import get_plugins

        TEXT.convert(value, param, ctx)
        catalog = get_plugins().catalogs[self.kind]
        try:
            catalog.get(value)
        except HarnessError as exc:
            self.fail(str(exc), param, ctx)
        return value


class BenchmarkList(click.ParamType):
    """``BENCH``, ``BENCH,BENCH,...`` or ``all``: registered benchmark ids (or aliases)."""

    name = "benchmark"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from harness.evaluation.multi import expand_benchmarks

        TEXT.convert(value, param, ctx)
        try:
            expand_benchmarks(value)
        except HarnessError as exc:
            self.fail(str(exc), param, ctx)
        return value


class ModelSpecText(click.ParamType):
    """``NAME`` or ``NAME:key=value,...``: a registered reward model and options its constructor
    takes, of the types it declares; checked without loading any weights."""

    name = "spec"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from harness.scoring.specs import check_model_spec

        TEXT.convert(value, param, ctx)
        try:
            check_model_spec(value)
        except HarnessError as exc:
            self.fail(str(exc), param, ctx)
        return value


class Device(click.ParamType):
    """A torch device name: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ... (whether it exists here is
    checked where the model runs: a Ray worker may have GPUs this machine lacks)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from harness.scoring.specs import check_device_name

        TEXT.convert(value, param, ctx)
        try:
            return check_device_name(value)
        except HarnessError as exc:
            self.fail(str(exc), param, ctx)


class RayAddress(click.ParamType):
    """``auto``, ``local``, ``host:port`` or ``ray://host:port``."""

    name = "address"
    _FORM = re.compile(r"(ray://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        TEXT.convert(value, param, ctx)
        text = value.strip()
        match = self._FORM.fullmatch(text)
        if text in ("auto", "local") or (match and 0 < int(match.group(3)) < 65536):
            return text
        self.fail(f"{value!r} is not a Ray address: use auto, local, host:port or "
                  "ray://host:port (a port in 1-65535).", param, ctx)


class Url(click.ParamType):
    """An http(s) URL, e.g. ``http://localhost:8000/v1``."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from urllib.parse import urlsplit

        TEXT.convert(value, param, ctx)
        try:
            parts = urlsplit(value.strip())
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(f"{value!r} is not an http(s) URL such as http://localhost:8000/v1.",
                      param, ctx)
        return value.strip()


class PromptSource(click.ParamType):
    """Where contrastive prompts come from: ``benchmark`` (the sets it ships), a registered
    prompt-set generator, or an existing JSON file ``{prompt: [prompts]}``."""

    name = "source"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from harness.evaluation.contrastive import BENCHMARK_SETS
        from harness.plugins import get_plugins

        TEXT.convert(value, param, ctx)
        generators = get_plugins().prompt_generators
        if value == BENCHMARK_SETS or value in generators:
            return value
        path = Path(value).expanduser()
        if path.is_file():
            return value
        if path.is_dir():
            self.fail(f"'{value}' is a folder, not a JSON file of prompt sets.", param, ctx)
        self.fail(f"'{value}' is neither {BENCHMARK_SETS}, a prompt-set generator "
                  f"({', '.join(generators.ids())}) nor an existing JSON file.", param, ctx)


def check_local_device(device: str | None, executor: str) -> None:
    """A ``--device`` that this machine lacks, refused before any work when models run here."""
    if device is None or executor != "local":
        return
    from harness.hf import check_device

    check_device(device)


def model_options(fn):
    options = [
        click.option("--model", "models", multiple=True, metavar="SPEC", type=ModelSpecText(),
                     help="Reward model to score: NAME or NAME:key=value,... (repeatable)."),
        click.option("--device", default=None, type=Device(),
                     help="cpu, cuda, cuda:1 (default: cuda if available)."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="auto: float16 on GPU, float32 on CPU."),
        click.option("--batch-size", default=16, show_default=True,
                     type=click.IntRange(1, MAX_BATCH), help="Images per forward pass."),
        click.option("--workers", default=0, show_default=True,
                     type=click.IntRange(0, MAX_PROCESSES), help="Data-loader worker processes."),
        click.option("--cache", type=PathArg(output=True, dir_okay=False), default=None,
                     help="Score cache (SQLite; default: <user cache>/scores-v2.sqlite)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the score cache."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Score in this process or on a Ray cluster."),
        click.option("--address", default=None, type=RayAddress(),
                     help="Ray cluster: auto (the cluster of `ray start`), ray://host:10001; default: a local instance."),
        click.option("--actors", default=1, show_default=True,
                     type=click.IntRange(1, MAX_PROCESSES), help="Ray: model actors in the pool."),
        click.option("--gpus-per-actor", default=None, type=FiniteFloat(0, MAX_PROCESSES),
                     help="Ray: GPUs per model actor, fractional allowed (default: 1 per actor if the cluster has them, else its GPUs shared)."),
        click.option("--one-pass/--no-one-pass", default=True, show_default=True,
                     help="Score all models in one pass over the images (each decoded once; all "
                          "models resident), or one model at a time."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_executor(executor: str, workers: int, address: str | None, actors: int,
                   gpus_per_actor: float | None) -> Any:
    """The :class:`~harness.scoring.executors.Executor` the ``--executor``, ``--workers``,
    ``--address``, ``--actors`` and ``--gpus-per-actor`` flags describe."""
    if workers < 0:
        raise HarnessError(f"--workers must be >= 0, got {workers}")
    if executor != "ray":
        if address is not None or actors != 1 or gpus_per_actor is not None:
            raise HarnessError("--address, --actors and --gpus-per-actor need --executor ray")
        from harness.scoring.executors import LocalExecutor

        return LocalExecutor(num_workers=workers)
    if actors < 1:
        raise HarnessError(f"--actors must be >= 1, got {actors}")
    if gpus_per_actor is not None and gpus_per_actor < 0:
        raise HarnessError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    from harness.scoring.ray import RayExecutor, RayOptions

    return RayExecutor(RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor))


def print_comparisons(comparisons: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scored vs reported (paired bootstrap over prompts, AUROC)",
                  title_justify="left", header_style="bold")
    for col in ("subset", "method", "against", "n", "diff", "95% CI", "p"):
        table.add_column(col, justify="right" if col in {"n", "diff", "95% CI", "p"} else "left")
    for _, r in comparisons[comparisons["metric"] == "auroc"].iterrows():
        table.add_row(r["subset"], r["method"], r["against"], str(r["n_prompts"]), f"{r['diff']:+.4f}",
                      f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_value']:.3f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def print_failures(failed: dict[str, str]) -> None:
    if not failed:
        return
    click.echo(f"{len(failed)} images could not be read or scored:", err=True)
    for path, reason in list(failed.items())[:20]:
        click.echo(f"  {path}: {reason}", err=True)
    if len(failed) > 20:
        click.echo(f"  ... and {len(failed) - 20} more (all listed in manifest.json)", err=True)
