"""Every command and every option of the ``harness`` command line, given bad values: exit status
2, exactly one line on stderr (``Error: ...`` naming the option or the value), no traceback.

The commands and options are discovered from the click tree, including commands a plugin adds
(the example plugin is loaded as a third-party plugin), so an option added later is covered
without touching this file. Each command starts from a *baseline*: arguments that run to
completion (``test_baselines_run`` proves it), so a failure is caused by the one bad value
swapped in. Bad values come from the option's click type (numbers out of range, NaN and
infinities, text that is not a number, unknown choices, empty text, paths that do not exist, a
file where a folder is expected and the reverse), from a short list per option name (unknown ids,
malformed model specs) and, in the hypothesis tests, from random text and numbers.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_example_plugin import EXAMPLE, SETS, make_swatches

SHARED = REPO.parent / "shared"

HUGE = "1" + "0" * 30  # past every 64-bit integer


# -- the command tree ---------------------------------------------------------------------------
def walk(group: click.Group, prefix: tuple[str, ...] = ()):
    """``(path, command)`` for every command and sub-command under ``group`` (groups included)."""
    for name in sorted(group.commands):
        command = group.commands[name]
        path = (*prefix, name)
        yield path, command
        if isinstance(command, click.Group):
            yield from walk(command, path)


def valued(command: click.Command) -> list[click.Parameter]:
    """The parameters that take a value (not flags, not --help/--version)."""
    out = []
    for p in command.params:
        if isinstance(p, click.Option) and (p.is_flag or p.count or p.expose_value is False):
            continue
        out.append(p)
    return out


@dataclass
class Files:
    """Everything the baselines and bad values point at, made once per module."""

    root: Path
    swatches: Path  # the example benchmark's data folder, which is also its image folder
    sets: Path  # contrastive prompt sets (JSON)
    prompts: Path  # one prompt per line
    finetune: Path  # a fine-tuning config of the example fine-tuner
    run: Path  # a finished leaderboard run folder
    plain: Path  # a regular file
    folder: Path  # an empty folder
    garbage: Path  # a file of bytes that are no format at all

    @property
    def nowhere(self) -> Path:
        return self.root / "does-not-exist"

    @property
    def under_file(self) -> Path:
        return self.plain / "child"


def baseline(files: Files, path: tuple[str, ...]) -> dict[str, list[str] | bool]:
    """Arguments, by parameter name, under which the command ``path`` runs to completion."""
    out = files.root / "out"
    return {
        ("score",): {"images": [files.swatches], "prompts": ["a red square"],
                     "models": ["example-color"]},
        ("leaderboard",): {"benchmark": ["example-swatches"], "data": [files.swatches],
                           "images": [files.swatches], "models": ["example-color"],
                           "normalizers": ["example-margin"], "prompt_sets": [files.sets],
                           "folds": ["3"], "n_boot": ["20"], "no_plots": True,
                           "out": [out / "run"]},
        ("finetune",): {"method": ["example-rgb"], "config_path": [files.finetune]},
        ("prompts", "generate"): {"generator": ["example-swap"], "input_path": [files.prompts],
                                  "out": [out / "sets.json"]},
        ("report",): {"run_dir": [files.run]},
        ("data", "download"): {"benchmark": ["imagereward_test"], "dest": [files.root / "ir"]},
    }.get(path, {})


def arguments(command: click.Command, given: dict) -> list[str]:
    """``given`` (parameter name -> values, or True for a flag) as a command line."""
    args, options = [], []
    for p in command.params:
        if p.name not in given:
            continue
        values = given[p.name]
        if isinstance(p, click.Argument):
            args += [str(v) for v in values]
        elif values is True:
            options.append(p.opts[0])
        else:
            for v in values:
                options += [p.opts[0], str(v)]
    return args + options


def bad_values(p: click.Parameter, files: Files) -> list[str]:
    """Values of ``p`` that no command may accept, from its click type and its name."""
    t = p.type
    vals: list[str] = []
    if isinstance(t, click.types.IntParamType):
        vals += ["abc", "", "1.5", "nan", "-1", HUGE, "-" + HUGE]
        if isinstance(t, click.IntRange):
            vals += [str(t.min - 1)] if t.min is not None else []
            vals += [str(t.max + 1)] if t.max is not None else []
    elif isinstance(t, click.types.FloatParamType):
        vals += ["abc", "", "nan", "NaN", "inf", "-inf", "1e400", "-1"]
        if isinstance(t, click.FloatRange):
            vals += [repr(t.min - 1)] if t.min is not None else []
            vals += [repr(t.max + 1)] if t.max is not None else []
    elif isinstance(t, click.Choice):
        vals += ["nope", ""]
    elif isinstance(t, click.Path):
        vals += ["", str(files.under_file)]
        if t.exists:
            vals.append(str(files.nowhere))
        if not t.file_okay:
            vals.append(str(files.plain))
        if not t.dir_okay:
            vals.append(str(files.folder))
    elif isinstance(t, click.types.BoolParamType):
        vals += ["maybe", ""]
    else:  # free text
        vals += ["", "   "]
    return vals + [str(v) for v in NAMED.get(_key(p), lambda f: [])(files)]


def _key(p: click.Parameter) -> str:
    return p.opts[0] if isinstance(p, click.Option) else p.human_readable_name


#: option (or argument) -> bad values beyond what its type implies
NAMED = {
    "--model": lambda f: ["nope", "clip:=", "clip:batch=x", "clip:batch_size=x", "clip:,", ":",
                          "example-color:=1", "example-color:label", "nope:x=1"],
    "--device": lambda f: ["nope", "cuda:99", "cpu:x"],
    "--address": lambda f: ["garbage", "host:99999", "ray://"],
    "--subset": lambda f: ["nope"],
    "--normalizer": lambda f: ["nope"],
    "--ensemble": lambda f: ["nope"],
    "--prompts": lambda f: ["nope", f.nowhere.with_suffix(".json"), f.garbage, f.folder],
    "--select-metric": lambda f: ["nope"],
    "--folds": lambda f: ["0", "1"],
    "--confidence": lambda f: ["0", "1", "1.5"],
    "--batch-size": lambda f: ["0"],
    "--actors": lambda f: ["0"],
    "--gpus-per-actor": lambda f: ["-0.5"],
    "--n": lambda f: ["0"],
    "--temperature": lambda f: ["-0.1", "2.5"],
    "--timeout": lambda f: ["0"],
    "--generator": lambda f: ["nope"],
    "--input": lambda f: [f.garbage, f.folder],
    "--config": lambda f: [f.garbage, f.folder, f.plain],
    "--set": lambda f: ["garbage", "=1", "nosuchkey=1", "epochs=x", "epochs=-1", "epochs=[1"],
    "--llm-base-url": lambda f: ["garbage", "ftp://host/v1"],
    "--base-url": lambda f: ["garbage", "ftp://host/v1"],
    "--data": lambda f: [f.folder],
    "--images": lambda f: [f.folder],
    "--pairs": lambda f: [f.garbage],
    "BENCHMARK": lambda f: ["nope", ""],
    "ID": lambda f: ["nope", ""],
    "RUN_DIR": lambda f: [f.folder, f.plain, f.nowhere],
}


# -- running ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("fuzz")
    swatches = make_swatches(root / "swatches")
    (root / "sets.json").write_text(json.dumps(SETS))
    (root / "prompts.txt").write_text("\n".join(SETS) + "\n")
    (root / "run.yaml").write_text(
        "prompts: ['a red square']\nreward: example-color\nnormalizer: example-margin\n"
        f"contrastive_prompts: example-swap\noutput_dir: {root / 'tuned'}\nepochs: 1\n"
        "candidates: 2\n")
    (root / "plain.txt").write_text("a plain file\n")
    (root / "folder").mkdir()
    (root / "garbage.bin").write_bytes(b"\x00\xff[{:\n\x89PNG garbage \xfe")
    (root / "ir").mkdir()  # the ImageReward test annotations, already there: no network needed
    shutil.copy(SHARED / "benchmarks" / "imagereward_test" / "test.json", root / "ir" / "test.json")
    return Files(root, swatches, root / "sets.json", root / "prompts.txt", root / "run.yaml",
                 root / "run", root / "plain.txt", root / "folder", root / "garbage.bin")


@pytest.fixture
def root(files, monkeypatch):
    """The ``harness`` group with every plugin's commands, the example loaded as a third-party
    plugin (through an entry point), and a finished run folder for ``harness report``."""
    import harness.plugins as hp
    from harness.cli import cli

    monkeypatch.syspath_prepend(str(EXAMPLE))
    ep = EntryPoint(name="example", value="t2i_harness_example", group=hp.ENTRY_POINT_GROUP)
    monkeypatch.setattr(hp, "entry_points",
                        lambda group: [ep] if group == hp.ENTRY_POINT_GROUP else [])
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "example")
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "1")
    monkeypatch.chdir(files.root)  # a relative path a command writes by default lands here
    hp.reset_plugins()
    group = copy.copy(cli)  # the global group stays as it was
    group.commands = dict(cli.commands)
    hp.get_plugins().add_commands(group)
    assert "example-colors" in group.commands
    if not (files.run / "leaderboard.json").is_file():
        lb = group.commands["leaderboard"]
        given = {**baseline(files, ("leaderboard",)), "out": [files.run]}
        ok = invoke(group, ["leaderboard", *arguments(lb, given)])
        assert ok.exit_code == 0, ok.output
    return group


def invoke(group: click.Group, args: list[str]):
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def problem(result, culprits: tuple[str, ...]) -> str | None:
    """What is wrong with ``result`` of a bad command line, or None: it must exit 2 with one
    ``Error: ...`` line on stderr naming one of ``culprits``, and no traceback anywhere."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {type(result.exception).__name__}: {result.exception}"
    if "Traceback" in result.output:
        return "printed a traceback"
    lines = result.stderr.strip().splitlines()
    if result.exit_code != 2:
        return f"exit {result.exit_code}: {' | '.join(lines)[:300]}"
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        return f"stderr is not one 'Error: ' line: {lines}"
    if not any(c and c in lines[0] for c in culprits):
        return f"does not name {culprits}: {lines[0]}"
    return None


def culprits(p: click.Parameter, value: str) -> tuple[str, ...]:
    """What the error line may name: the option's flags or metavar, the (non-blank) value, or
    the key of a ``KEY=VALUE`` value (``config 'epochs' must be >= 1``)."""
    names = [*p.opts, p.human_readable_name, p.metavar or ""]
    if isinstance(p, click.Option):
        names += p.secondary_opts
    key = value.partition("=")[0].strip() if p.metavar == "KEY=VALUE" else ""
    if isinstance(p, click.Argument) and value.startswith("-"):  # read as (short) options
        names += [repr(value[:2]), repr(value.partition("=")[0])]
    from harness.cli.root import one_line  # what a value with line breaks is printed as

    return (*names, value.strip(), one_line(value) if value.strip() else "",
            f"'{key}'" if key else "")


def cases(group: click.Group, files: Files):
    """``(label, args, culprits)`` for every bad value of every option of every command."""
    for path, command in walk(group):
        if isinstance(command, click.Group):
            yield (f"{' '.join(path)} <unknown>", [*path, "no-such-command"], ("no-such-command",))
            continue
        base = baseline(files, path)
        plain = arguments(command, base)
        yield (f"{' '.join(path)} --no-such-option", [*path, *plain, "--no-such-option"],
               ("--no-such-option",))
        if not any(isinstance(p, click.Argument) and p.nargs == -1 for p in command.params):
            yield (f"{' '.join(path)} surplus", [*path, *plain, "surplus-argument"],
                   ("surplus-argument",))
        for p in valued(command):
            rest = {k: v for k, v in base.items() if k != p.name}
            if p.required:
                yield (f"{' '.join(path)} without {_key(p)}", [*path, *arguments(command, rest)],
                       culprits(p, ""))
            if isinstance(p, click.Option):  # the option last, its value missing
                yield (f"{' '.join(path)} {p.opts[0]} (no value)",
                       [*path, *arguments(command, rest), p.opts[0]], tuple(p.opts))
            for value in dict.fromkeys(bad_values(p, files)):
                args = arguments(command, {**rest, p.name: [value]})
                yield (f"{' '.join(path)} {_key(p)}={value!r}", [*path, *args], culprits(p, value))


# -- the tests ----------------------------------------------------------------------------------
def test_baselines_run(root, files):
    """Every baseline command line succeeds, so each bad value below is the only thing wrong."""
    checked = []
    for path, command in walk(root):
        if isinstance(command, click.Group):
            continue
        result = invoke(root, [*path, *arguments(command, baseline(files, path))])
        assert result.exit_code == 0, (path, result.output)
        checked.append(" ".join(path))
    assert {"score", "leaderboard", "finetune", "prompts generate", "report",
            "example-colors"} <= set(checked)
    # A command of the core whose required parameters have no baseline would be fuzzed only
    # for missing values: give it a baseline above.
    for path, command in walk(root):
        required = [p.name for p in command.params if p.required]
        assert not required or baseline(files, path), (path, required)


def test_every_option_rejects_bad_values(root, files):
    found = list(cases(root, files))
    failures = [f"{label}: {why}" for label, args, named in found
                if (why := problem(invoke(root, args), named))]
    commands = [c for _, c in walk(root) if not isinstance(c, click.Group)]
    options = sum(len(valued(c)) for c in commands)
    print(f"{len(found)} bad command lines over {len(commands)} commands and {options} options "
          "and arguments")
    assert len(found) > 300 and len(commands) >= 8 and options >= 40
    assert not failures, f"{len(failures)} of {len(found)}:\n" + "\n".join(failures)


def test_root_usage_errors_are_one_line(root):
    for args, named in [(["--no-such-option"], "--no-such-option"), (["nope"], "nope"),
                        (["-v", "nope"], "nope"), (["--verbose=3"], "--verbose")]:
        result = invoke(root, args)
        assert problem(result, (named,)) is None, (args, result.output)
    line = invoke(root, ["score", "--batch-size", "0"]).stderr.strip()
    assert line == ("Error: Invalid value for '--batch-size': 0 is not in the range 1<=x<=65536. "
                    "(see harness score --help)")
    help_text = invoke(root, [])  # no command: the help, as before
    assert "Usage: " in help_text.output and "Commands:" in help_text.output


def test_bugs_and_os_errors_are_one_line(root, tmp_path):
    """A bug is one line with exit status 1 (the traceback only with -vv); an operating-system
    error is bad input: exit status 2, naming the file."""
    group = copy.copy(root)
    group.commands = dict(root.commands)

    @group.command("buggy")
    def buggy():
        {}["missing"]  # noqa: B018 - the bug

    @group.command("full-disk")
    def full_disk():
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "scores.csv"))

    result = invoke(group, ["buggy"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "Error: internal error (KeyError: 'missing'); this is a bug in harness or a plugin: "
        "rerun with -vv for the traceback and report it"]
    verbose = invoke(group, ["-vv", "buggy"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "KeyError" in verbose.stderr
    result = invoke(group, ["full-disk"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: No space left on device: '{tmp_path / 'run' / 'scores.csv'}'"]


def test_real_process_prints_one_line(tmp_path):
    """The same through the installed entry point (``python -m harness.cli``), where nothing
    catches what the command lets out."""
    import os
    import subprocess
    import sys

    for args, line in [
        (["--no-such-option"], "Error: No such option '--no-such-option'. (see harness --help)"),
        (["score", "--batch-size", "0"],
         "Error: Invalid value for '--batch-size': 0 is not in the range 1<=x<=65536. "
         "(see harness score --help)"),
    ]:
        result = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                                text=True, timeout=300, env=os.environ.copy(), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [line] and result.stdout == ""


# -- random values ------------------------------------------------------------------------------
def _typed(root: click.Group):
    """``(path, parameter, kind)`` for every option of a type hypothesis can invent values for."""
    out = []
    for path, command in walk(root):
        for p in valued(command):
            t = p.type
            if isinstance(t, click.types.IntParamType):
                out.append((path, p, "int"))
            elif isinstance(t, click.types.FloatParamType):
                out.append((path, p, "float"))
            elif isinstance(t, click.Choice):
                out.append((path, p, "choice"))
            elif _key(p) in IDS:
                out.append((path, p, "id"))
    return out


#: options naming a registered thing: random text is an unknown id
IDS = {"--model", "--normalizer", "--ensemble", "--generator", "--subset", "--select-metric",
       "BENCHMARK", "ID"}


def _not_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return True
    return False


def _not_float(s: str) -> bool:
    try:
        return not math.isfinite(float(s)) or float(s) < 0
    except ValueError:
        return True


def _known_ids() -> set[str]:
    from harness.evaluation.metrics import METRICS
    from harness.plugins import get_plugins

    known = set(METRICS) | {"colors", "counting", "composition", "comprehensive"}
    for catalog in get_plugins().catalogs.values():
        for entry in catalog:
            known |= {entry.id, *entry.aliases}
    return {k.lower() for k in known}


def _value(kind: str, choices=()):
    text = st.text(max_size=12)
    if kind == "int":
        return st.one_of(text.filter(_not_int), st.integers(max_value=-1).map(str),
                         st.integers(min_value=2**63).map(str))
    if kind == "float":
        return st.one_of(text.filter(_not_float),
                         st.floats(max_value=-1e-6, allow_infinity=True).map(repr),
                         st.sampled_from(["nan", "inf", "-inf", "+nan", "1e999", "Infinity"]))
    return text.filter(lambda s: s not in choices)


def _random_cases(root, files, data):
    path, p, kind = data.draw(st.sampled_from(_typed(root)), label="option")
    choices = tuple(p.type.choices) if kind == "choice" else ()
    value = data.draw(_value(kind, choices), label="value")
    if kind == "id":
        name = re.split(r"[:,=]", value)[0].strip().lower()
        if not name or name in _known_ids() or "\x00" in value:
            event("skipped: blank or a registered id")
            return None
    event(f"{kind} option")
    command = root
    for part in path:
        command = command.commands[part]
    rest = {k: v for k, v in baseline(files, path).items() if k != p.name}
    return [*path, *arguments(command, {**rest, p.name: [value]})], culprits(p, value)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data())
def test_random_bad_values(root, files, data):
    case = _random_cases(root, files, data)
    if case is not None:
        args, named = case
        assert problem(invoke(root, args), named) is None, args


@pytest.mark.slow
@settings(max_examples=3000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data())
def test_random_bad_values_long(root, files, data):
    case = _random_cases(root, files, data)
    if case is not None:
        args, named = case
        assert problem(invoke(root, args), named) is None, args


# -- pickled checkpoints ------------------------------------------------------------------------
def _pickle_checkpoint(folder: Path, extra: object | None) -> Path:
    """``folder``'s safetensors weights re-saved as a pickled ``pytorch_model.bin``; with
    ``extra``, the pickle also holds that object, which torch's safe loader refuses."""
    import torch
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state if extra is None else {**state, "extra": extra}, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def _scores(result) -> list[float]:
    assert result.exit_code == 0, result.output
    return [r["score"] for r in json.loads(result.stdout)]


def test_pickled_checkpoint_is_refused_without_unpickling_advice(root, files, tmp_path):
    from tiny_models import make_tiny_clip

    def score(folder):
        return invoke(root, ["score", "--images", files.swatches, "--prompt", "a red square",
                             "--model", f"clip:checkpoint={folder}", "--device", "cpu",
                             "--no-cache", "--json"])

    want = _scores(score(make_tiny_clip(tmp_path / "safe")))
    # Pickled tensors alone load safely, with the same numbers.
    _pickle_checkpoint(make_tiny_clip(tmp_path / "tensors"), None)
    assert _scores(score(tmp_path / "tensors")) == want
    assert len(want) == 14
    # A pickle naming any other object is refused by name, with safetensors as the fix.
    weights = _pickle_checkpoint(make_tiny_clip(tmp_path / "objects"), Path("x"))
    result = score(tmp_path / "objects")
    assert problem(result, (str(weights),)) is None, result.output
    assert "weights_only" not in result.output and "safetensors" in result.stderr
    assert "pathlib.PosixPath" in result.stderr


def test_torch_unpickling_advice_never_reaches_the_user(root, tmp_path):
    """Wherever torch's refusal surfaces (transformers raising it inside quiet_transformers, a
    plugin quoting it in its own error, ImageReward's loader), the user reads the safetensors
    advice instead of ``weights_only=False``."""
    import pickle

    import torch

    from harness.errors import HarnessError
    from harness.hf import quiet_transformers
    from harness_plugins.imagereward import _read_state_dict

    bad = tmp_path / "ImageReward.pt"
    torch.save({"w": torch.ones(2), "why": Path("x")}, bad)
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(bad, weights_only=True)
    torch_message = str(refused.value)
    assert "weights_only" in torch_message  # what must not reach the user

    with pytest.raises(HarnessError) as info, quiet_transformers():
        raise pickle.UnpicklingError(torch_message)
    assert "weights_only" not in str(info.value) and "safetensors" in str(info.value)
    with pytest.raises(HarnessError) as info:
        _read_state_dict(bad)
    assert str(bad) in str(info.value) and "weights_only" not in str(info.value)

    group = copy.copy(root)
    group.commands = dict(root.commands)

    @group.command("quoting-plugin")
    def quoting_plugin():
        raise HarnessError(f"cannot load my-model: {torch_message}")

    @group.command("raising-plugin")
    def raising_plugin():
        torch.load(bad, weights_only=True)

    for name in ("quoting-plugin", "raising-plugin"):
        result = invoke(group, [name])
        assert problem(result, ("safetensors",)) is None, result.output
        assert "weights_only" not in result.output and "pathlib.PosixPath" in result.stderr
