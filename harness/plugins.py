"""Plugin discovery, loading and lookup.

One :class:`pluggy.PluginManager` holds the built-in plugins (the modules named in
:data:`BUILTIN_PLUGINS`) and the third-party ones found in the ``t2i_harness`` entry-point group.
Third-party plugins are loaded one at a time: one that fails to import, implements a misspelled
hook or raises inside its hook is skipped with a one-line warning naming its distribution and the
error, so one bad plugin never breaks every command. ``HARNESS_STRICT_PLUGINS=1`` makes such a
failure fatal instead.

Environment:

- ``HARNESS_LOAD_PLUGINS``: comma-separated allow-list of third-party plugins (entry-point or
  distribution names); set but empty means "no third-party plugins" (the test suite's default).
- ``HARNESS_BLOCK_PLUGINS``: comma-separated block-list.
- ``HARNESS_STRICT_PLUGINS=1``: a broken third-party plugin is an error, not a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from harness import __version__, hookspecs
from harness.errors import PluginError, UnknownIdError
from harness.types import (
    Benchmark,
    FineTuner,
    FineTuneSettings,
    Hyperparameter,
    Normalizer,
    PromptSetGenerator,
    RewardModel,
)

log = logging.getLogger("harness.plugins")

ENTRY_POINT_GROUP = "t2i_harness"

#: Built-in plugins, registered like any other plugin.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "harness_plugins.tia2",
    "harness_plugins.cards",
    "harness_plugins.clip",
    "harness_plugins.pickscore",
    "harness_plugins.blip2",
    "harness_plugins.imagereward",
    "harness_plugins.hpsv2",
    "harness_plugins.vlm_judge",
    "harness_plugins.vqascore",
    "harness_plugins.hpsv3",
    "harness_plugins.textnorm",
    "harness_plugins.rules",
    "harness_plugins.llm",
    "harness_plugins.sd",
)


T = TypeVar("T")


@dataclass(frozen=True)
class Kind(Generic[T]):
    """One kind of registrable thing: its hook, its base class and its human name."""

    key: str  # key in ``harness plugins --json`` output
    hook: str
    base: type[T]
    label: str


KINDS: tuple[Kind, ...] = (
    Kind("reward_models", "register_reward_models", RewardModel, "reward model"),
    Kind("normalizers", "register_normalizers", Normalizer, "normalizer"),
    Kind("prompt_generators", "register_prompt_generators", PromptSetGenerator, "prompt generator"),
    Kind("finetuners", "register_finetuners", FineTuner, "fine-tuner"),
    Kind("benchmarks", "register_benchmarks", Benchmark, "benchmark"),
)


@dataclass(frozen=True)
class Entry(Generic[T]):
    id: str
    cls: type[T]
    plugin: str
    aliases: tuple[str, ...] = ()


class Catalog(Generic[T]):
    """The registered classes of one kind, with ids, aliases and "did you mean" lookup.

    ``Catalog[RewardModel]``: :meth:`get` returns ``type[RewardModel]``, so type checkers know
    what a lookup gives.
    """

    def __init__(self, kind: Kind[T]):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def add(self, entry: Entry) -> None:
        for name in (entry.id, *entry.aliases):
            owner = self._owner(name)
            if owner is not None:
                raise PluginError(
                    f"{self.kind.label} id '{name}' from plugin '{entry.plugin}' is already "
                    f"registered by plugin '{owner.plugin}'"
                )
        self._entries[entry.id] = entry
        for alias in entry.aliases:
            self._aliases[alias] = entry.id

    def _owner(self, name: str) -> Entry | None:
        if name in self._entries:
            return self._entries[name]
        if name in self._aliases:
            return self._entries[self._aliases[name]]
        return None

    def entry(self, name: str) -> Entry[T]:
        found = self._owner(name)
        if found is None:
            raise UnknownIdError(self.kind.label, name, [*self._entries, *self._aliases])
        return found

    def get(self, name: str) -> type[T]:
        """The class registered under ``name`` (an id or an alias)."""
        return self.entry(name).cls

    def ids(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._owner(name) is not None

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class PluginInfo:
    name: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "hooks": self.hooks,
            "registered": self.registered,
        }


def _contract_problem(cls: type) -> str | None:
    """What a registered class gets wrong about its contract's declarations, if anything."""
    if issubclass(cls, RewardModel):
        params = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            missing = [n for n in ("checkpoint", "device", "dtype") if n not in params]
            if missing:
                return (f"does not accept the constructor arguments {', '.join(missing)}: a reward "
                        "model is built as Model(checkpoint=None, device='cpu', dtype='float32', "
                        "**options) (or omit __init__ to inherit RewardModel's)")
    if issubclass(cls, Normalizer):
        hypers = cls.hyperparameters
        if not isinstance(hypers, tuple) or not all(isinstance(h, Hyperparameter) for h in hypers):
            return "declares hyperparameters that are not a tuple of harness.types.Hyperparameter"
    if issubclass(cls, FineTuner):
        config = cls.config_class
        if not (inspect.isclass(config) and issubclass(config, FineTuneSettings)
                and dataclasses.is_dataclass(config)):
            return "has a config_class that is not a dataclass subclassing harness.types.FineTuneSettings"
    if issubclass(cls, Benchmark):
        subsets = getattr(cls, "subsets", None)
        if not isinstance(subsets, tuple) or not subsets or not all(isinstance(x, str) for x in subsets):
            return "needs `subsets`: a non-empty tuple of subset names"
    return None


def _call_declared(impl: Any, **available: Any) -> Any:
    """Call a hook implementation with only the arguments it declares (as pluggy does), so a
    hook that needs none of them may omit them."""
    return impl.function(**{name: available[name] for name in impl.argnames if name in available})


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _strict() -> bool:
    return os.environ.get("HARNESS_STRICT_PLUGINS", "").lower() in {"1", "true", "yes", "on"}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Plugins:
    """A typed facade over the plugin manager: what is loaded and what it registered."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.warnings: list[str] = []
        self.infos: dict[str, PluginInfo] = {}
        self.catalogs: dict[str, Catalog] = {k.key: Catalog(k) for k in KINDS}

        for modname in BUILTIN_PLUGINS:
            module = importlib.import_module(modname)
            self._register_module(module, modname, __version__, builtin=True)
        if load_entry_points:
            self._load_entry_points()
        for kind in KINDS:
            self._collect(kind)

    # -- loading ---------------------------------------------------------------------------
    def _fail(self, plugin: str, what: str, exc: BaseException | str) -> None:
        detail = exc if isinstance(exc, str) else _describe(exc)
        message = f"plugin '{plugin}' {what}: {detail}"
        if _strict() or (plugin in self.infos and self.infos[plugin].builtin):
            raise PluginError(message) from (exc if isinstance(exc, BaseException) else None)
        self.warnings.append(message)
        log.warning("%s (skipped; set HARNESS_STRICT_PLUGINS=1 to make this fatal)", message)

    def _register_module(self, module: Any, name: str, version: str, builtin: bool) -> bool:
        self.pm.register(module, name=name)
        misspelled = self._unknown_hooks(module)
        if misspelled:
            self.pm.unregister(module)
            known = [h for h in dir(hookspecs) if h.startswith("register_")]
            detail = "; ".join(
                f"unknown hook '{h}'." + (
                    f" Did you mean '{m[0]}'?" if (m := difflib.get_close_matches(h, known, 1)) else ""
                )
                for h in misspelled
            )
            if builtin:
                raise PluginError(f"built-in plugin '{name}': {detail}")
            self._fail(name, "implements a hook that does not exist", detail)
            return False
        hooks = sorted(hc.name for hc in (self.pm.get_hookcallers(module) or []))
        self.infos[name] = PluginInfo(name=name, version=version, builtin=builtin, hooks=hooks)
        return True

    def _unknown_hooks(self, module: Any) -> list[str]:
        return sorted(
            hc.name
            for hc in (self.pm.get_hookcallers(module) or [])
            if not hc.has_spec()
        )

    def _load_entry_points(self) -> None:
        allow = _env_list("HARNESS_LOAD_PLUGINS")
        block = set(_env_list("HARNESS_BLOCK_PLUGINS") or [])
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
        per_dist: dict[str, int] = {}
        for ep in eps:
            dist = ep.dist.name if ep.dist else ep.name
            per_dist[dist] = per_dist.get(dist, 0) + 1
        for ep in sorted(eps, key=lambda e: e.name):
            dist_name = ep.dist.name if ep.dist else ep.name
            version = ep.dist.version if ep.dist else "unknown"
            name = dist_name if per_dist[dist_name] == 1 else f"{dist_name}:{ep.name}"
            names = {ep.name, dist_name, name}
            if allow is not None and not names & set(allow):
                continue
            if names & block:
                continue
            if name in self.infos:
                continue
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - any import failure of a plugin
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(name, "failed to load", exc)
                continue
            try:
                self._register_module(module, name, version, builtin=False)
            except pluggy.PluginValidationError as exc:
                self._safe_unregister(name)
                self._fail(name, "has an invalid hook", exc)
            except ValueError as exc:  # already registered under another name
                self._fail(name, "could not be registered", exc)

    def _safe_unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.infos.pop(name, None)

    # -- registration ----------------------------------------------------------------------
    def _collect(self, kind: Kind) -> None:
        catalog = self.catalogs[kind.key]
        caller = getattr(self.pm.hook, kind.hook)
        # get_hookimpls() is in registration order: built-ins first, so they keep their ids.
        for impl in caller.get_hookimpls():
            plugin = impl.plugin_name
            staged: list[Entry] = []

            def register(cls: type, *, id: str | None = None, aliases=(), _p=plugin, _s=staged):
                _s.append(self._entry(kind, cls, id, aliases, _p))

            try:
                _call_declared(impl, register=register)
                for entry in staged:
                    catalog.add(entry)
            except Exception as exc:  # noqa: BLE001 - plugins may raise anything
                for entry in staged:  # all or nothing per hook call
                    if catalog._entries.get(entry.id) is entry:
                        del catalog._entries[entry.id]
                        for alias in entry.aliases:
                            catalog._aliases.pop(alias, None)
                self._fail(plugin, f"raised in {kind.hook}", exc)
                continue
            if staged and plugin in self.infos:
                self.infos[plugin].registered.setdefault(kind.key, []).extend(e.id for e in staged)

    @staticmethod
    def _entry(kind: Kind, cls: Any, id: str | None, aliases: Any, plugin: str) -> Entry:
        if not inspect.isclass(cls):
            raise PluginError(f"register() expects a class, got {cls!r}")
        if not issubclass(cls, kind.base):
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__} is not a subclass of "
                f"harness.types.{kind.base.__name__}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise PluginError(f"{cls.__qualname__} does not implement {missing}")
        ident = id or getattr(cls, "id", None)
        if not ident or not isinstance(ident, str):
            raise PluginError(f"{cls.__qualname__} has no id: set a class attribute `id`")
        if isinstance(aliases, str):
            aliases = (aliases,)
        problem = _contract_problem(cls)
        if problem:
            raise PluginError(f"{cls.__qualname__} {problem}")
        return Entry(id=ident, cls=cls, plugin=plugin, aliases=tuple(aliases))

    # -- the typed facade ------------------------------------------------------------------
    @property
    def reward_models(self) -> Catalog[RewardModel]:
        return self.catalogs["reward_models"]

    @property
    def normalizers(self) -> Catalog[Normalizer]:
        return self.catalogs["normalizers"]

    @property
    def prompt_generators(self) -> Catalog[PromptSetGenerator]:
        return self.catalogs["prompt_generators"]

    @property
    def finetuners(self) -> Catalog[FineTuner]:
        return self.catalogs["finetuners"]

    @property
    def benchmarks(self) -> Catalog[Benchmark]:
        return self.catalogs["benchmarks"]

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                _call_declared(impl, cli=cli)
            except Exception as exc:  # noqa: BLE001
                self._fail(impl.plugin_name, "raised in register_commands", exc)

    def list(self) -> list[PluginInfo]:
        return list(self.infos.values())


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def reset_plugins() -> None:
    """Forget the loaded plugins (tests; after installing a plugin at run time)."""
    global _PLUGINS
    _PLUGINS = None


def lookup(kind: str, name: str) -> type:
    """``lookup("benchmarks", "tia2")`` -> the registered class, or a "did you mean" error."""
    return get_plugins().catalogs[kind].get(name)

