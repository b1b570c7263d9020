"""Settings dataclasses from YAML or dicts: one loader for every config the harness reads.

``load_config(cls, source, **overrides)`` builds any dataclass config (a fine-tuner's
``config_class``, a leaderboard config, ...) from a YAML file or a dict plus keyword overrides,
rejects an unknown key with "did you mean", coerces YAML's ``10`` to ``10.0`` for a float setting
(and ``2.0`` to ``2`` for an int one), builds nested dataclass groups from nested mappings, checks
every value against its field's annotation (:func:`check_types`: a string where a list is
expected, a quoted ``'false'`` where a boolean is, are errors naming the key, never characters
taken for prompts), and calls the config's ``validate()`` when it has one, so an impossible value
is refused before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import HarnessError, did_you_mean

T = TypeVar("T")


def read_mapping(source: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping -> that mapping (``{}`` for an empty file)."""
    import yaml

    path = Path(source).expanduser()
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise HarnessError(f"cannot read config '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise HarnessError(f"config '{path}' is not UTF-8 text: give a YAML file of settings") from exc
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"malformed YAML in config '{path}': {first}") from exc
    if not isinstance(loaded, dict):
        raise HarnessError(f"config '{path}' must be a mapping of settings")
    return loaded


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated: no coercion
        return {}


def _numeric(hint: Any) -> type | None:
    """``float`` or ``int`` when the annotation is that type (or that type or None)."""
    if hint in (float, int):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in (float, int):
        return args[0]
    return None


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]) and isinstance(args[0], type):
        return args[0]
    return None


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in values:
        if key not in known:
            raise HarnessError(
                f"unknown config key '{where}{key}'.{did_you_mean(str(key), known)} "
                f"See the {cls.__name__} settings in its documentation"
            )
    kwargs = {}
    for key, value in values.items():
        hint = hints.get(key)
        group = _dataclass_of(hint)
        if group is not None and isinstance(value, dict):
            value = _build(group, value, f"{where}{key}.")
        kind = _numeric(hint)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise HarnessError(f"bad config{' group ' + where.rstrip('.') if where else ''}: {exc}") from exc


def type_problem(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits the annotation ``hint``; else "must be a list of strings, got
    'a cat' (write ['a cat'] for one item)", with a tip for the common YAML slips."""
    if _fits(value, hint):
        return None
    problem = f"must be {describe_type(hint)}, got {value!r}"
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("true", "false", "yes", "no", "on", "off") and _fits(True, hint):
        return f"{problem} (write {'true' if word in ('true', 'yes', 'on') else 'false'} without quotes)"
    if isinstance(value, str) and typing.get_origin(_strip_optional(hint)) in (list, tuple):
        return f"{problem} (write [{value!r}] for one item)"
    if isinstance(value, str) and _fits(1.0, hint):
        try:
            number = float(value)
        except ValueError:
            return problem
        return f"{problem} (a quoted number, or YAML read it as text: write {number!r})"
    return problem


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        kinds = {list: (list, tuple), tuple: (list, tuple), set: (list, set), frozenset: (list, frozenset)}
        if not isinstance(value, kinds.get(origin or hint, (list,))):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(hint):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(hint)
        return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    try:
        return isinstance(value, origin or hint)
    except TypeError:  # an annotation isinstance cannot check: accept
        return True


def describe_type(hint: Any) -> str:
    """``list[str]`` -> "a list of strings"; ``int | None`` -> "an integer or null"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = describe_type(args[0]) if args else "value"
        plural = {"a string": "strings", "an integer": "integers", "a number": "numbers",
                  "true/false": "true/false values", "a mapping": "mappings"}.get(item, item)
        return f"a list of {plural}"
    if origin is dict or hint is dict:
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(config: Any, where: str = "") -> None:
    """Raise :class:`HarnessError` naming the first field of the dataclass ``config`` (nested
    groups included, as ``group.key``) whose value does not fit its annotation."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints.get(f.name)
        if hint is None:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, f"{where}{f.name}.")
            continue
        problem = type_problem(value, hint)
        if problem is not None:
            raise HarnessError(f"config '{where}{f.name}' {problem}")


def load_config(cls: type[T], source: str | Path | dict[str, Any] | None = None,
                **overrides: Any) -> T:
    """Build and validate a ``cls`` config from a YAML file or dict, then ``overrides``.

    ``overrides`` whose value is None are ignored (unset command-line flags). Raises
    :class:`HarnessError` naming the key of an unknown or impossible setting.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"load_config needs a dataclass, got {cls!r}")
    values: dict[str, Any] = {}
    if isinstance(source, dict):
        values.update(source)
    elif source is not None:
        values.update(read_mapping(source))
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = _build(cls, values, "")
    check_types(config)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def parse_overrides(items: typing.Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """``["a=1", "b=[x, y]"]`` -> ``{"a": 1, "b": ["x", "y"]}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise HarnessError(f"{flag} expects KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise HarnessError(f"{flag} {key.strip()}: value '{value}' is not valid YAML") from exc
    return out
