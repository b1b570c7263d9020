"""The layering rules, checked on the source: no import cycles, the core never reaches into the
built-in plugins or branches on their ids, every plugin kind is a hook and a top-level export."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: import package -> its folder in the repository
PACKAGES = {"harness": REPO / "harness", "harness_plugins": REPO / "plugins"}


def modules() -> dict[str, Path]:
    """Every module of the core and the built-in plugins: dotted name -> file."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under TYPE_CHECKING
    (class bodies and module-level if/try blocks do run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from (i for child in node.orelse for i in module_level_imports_of(child))
        else:
            yield from module_level_imports(node)


def module_level_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from module_level_imports(node)


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted module names an import statement names (``from a import b``: ``a`` and
    ``a.b``, the latter kept only if it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def all_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, lazy ones inside functions included (not under TYPE_CHECKING)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from all_imports(ast.Module(body=[child], type_ignores=[]))
        else:
            yield from all_imports(node)


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports: at import time, or (``lazy``) anywhere."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    find = all_imports if lazy else module_level_imports
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in find(parse(path)):
            targets.update(t for t in imported_names(node, name, is_package) if t in mods)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def core_files() -> list[Path]:
    return sorted(PACKAGES["harness"].rglob("*.py"))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


# -- (a) no import cycles -------------------------------------------------------------------------
def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_parsing_resolves_relative_and_skips_functions_and_type_checking():
    tree = ast.parse(
        "from . import a\nfrom ..b import c\nimport x.y\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hidden\n"
        "def f():\n    import inner\n"
        "class K:\n    import in_class\n"
        "try:\n    import tried\nexcept ImportError:\n    pass\n"
    )
    names = [n for node in module_level_imports(tree)
             for n in imported_names(node, "pkg.sub.mod", is_package=False)]
    assert names == ["pkg.sub", "pkg.sub.a", "pkg.b", "pkg.b.c", "x.y", "typing",
                     "typing.TYPE_CHECKING", "in_class", "tried"]


def test_no_import_cycles_among_core_and_builtin_plugin_modules():
    graph = import_graph()
    assert "harness.scoring.runner" in graph and "harness_plugins.textnorm" in graph
    assert "harness.types" in graph["harness.plugins"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_in_the_core_even_through_lazy_imports():
    """A function-level import that closes a loop still ties two modules into one layer."""
    graph = import_graph(lazy=True)
    core = {m: {t for t in targets if t.split(".")[0] == "harness"}
            for m, targets in graph.items() if m.split(".")[0] == "harness"}
    assert "harness.scoring.executors" in core["harness.scoring.runner"]
    cycle = find_cycle(core)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# -- (b) the core never imports the built-in plugins ----------------------------------------------
def test_core_never_imports_builtin_plugins():
    bad = []
    for path in core_files():
        tree = parse(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{where(path, node)} imports {n}" for n in names
                    if n.split(".")[0] == "harness_plugins"]
    assert not bad, "the core imports built-in plugins:\n" + "\n".join(bad)


def test_core_names_builtin_plugin_modules_only_in_the_builtin_list():
    """Module names as strings (importlib.import_module("harness_plugins.x")) only in
    harness/plugins.py's BUILTIN_PLUGINS."""
    from harness.plugins import BUILTIN_PLUGINS

    bad = []
    for path in core_files():
        tree = parse(path)
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign | ast.Assign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "BUILTIN_PLUGINS" for t in targets):
                    allowed |= {id(c) for c in ast.walk(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.split(".")[0] == "harness_plugins"
                    and node.value.replace(".", "").replace("_", "").isalnum()
                    and id(node) not in allowed):
                bad.append(f"{where(path, node)} names {node.value!r}")
    assert not bad, "\n".join(bad)
    assert all(m.startswith("harness_plugins.") for m in BUILTIN_PLUGINS)


# -- (c) the core never branches on a built-in plugin's id ----------------------------------------
def builtin_ids() -> set[str]:
    from harness.plugins import Plugins

    plugins = Plugins(load_entry_points=False)
    ids = set()
    for catalog in plugins.catalogs.values():
        for entry in catalog:
            ids |= {entry.id, *entry.aliases}
    return ids


def _strings(node: ast.AST) -> list[str]:
    """The string literals of ``node`` when it is a string or a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for e in node.elts for s in _strings(e) if isinstance(e, ast.Constant)]
    return []


def branches_on(tree: ast.AST, ids: set[str]) -> Iterator[tuple[ast.AST, str]]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``, ``match``) against a literal that is a
    built-in id, and click ``Choice`` lists that offer built-in ids."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            lefts = [node.left, *node.comparators[:-1]]
            for op, left, right in zip(node.ops, lefts, node.comparators, strict=True):
                if isinstance(op, ast.Eq | ast.NotEq):
                    hits = [s for side in (left, right) if isinstance(side, ast.Constant)
                            for s in _strings(side)]
                elif isinstance(op, ast.In | ast.NotIn):
                    hits = _strings(right)
                else:
                    continue
                for s in hits:
                    if s in ids:
                        yield node, s
        elif isinstance(node, ast.MatchValue):
            for s in _strings(node.value):
                if s in ids:
                    yield node, s
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "Choice":
                for s in (s for arg in node.args for s in _strings(arg)):
                    if s in ids:
                        yield node, s


def test_branch_detector_finds_planted_branches():
    ids = {"textnorm", "sd_ddpo", "sft"}
    code = (
        "if name == 'textnorm': pass\n"
        "if tuner.id != 'sd_ddpo': pass\n"
        "ok = method in ('sft', 'other')\n"
        "fine = name == 'mean' or x in ['a', 'b'] or 'textnorm' in text_list\n"
        "click.Choice(['sft', 'x'])\n"
        "match n:\n    case 'textnorm':\n        pass\n"
    )
    found = [(node.lineno, s) for node, s in branches_on(ast.parse(code), ids)]
    assert found == [(1, "textnorm"), (2, "sd_ddpo"), (3, "sft"), (5, "sft"), (7, "textnorm")]


def test_core_never_branches_on_a_builtin_id():
    ids = builtin_ids()
    assert {"textnorm", "tia2", "sd_ddpo", "ddpo", "sft", "clip"} <= ids
    bad = [f"{where(path, node)} compares with built-in id {s!r}"
           for path in core_files() for node, s in branches_on(parse(path), ids)]
    assert not bad, "the core branches on built-in plugin ids:\n" + "\n".join(bad)


# -- (d) every kind is a hook and a top-level export ----------------------------------------------
def test_every_hook_has_a_kind_and_every_kind_base_is_exported():
    import harness
    from harness import hookspecs
    from harness.plugins import KINDS

    hooks = {name for name, fn in vars(hookspecs).items()
             if callable(fn) and hasattr(fn, "t2i_harness_spec")}
    assert hooks == {k.hook for k in KINDS} | {"register_commands"}
    for kind in KINDS:
        name = kind.base.__name__
        assert getattr(harness, name) is kind.base, f"harness.{name} is not exported"
        assert name in harness.__all__
    assert harness.hookimpl is hookspecs.hookimpl
    for name in ("PairRewardModel", "FineTuneSettings", "FineTuneResult", "BenchmarkData",
                 "Hyperparameter", "HarnessError"):
        assert name in harness.__all__ and getattr(harness, name) is not None


def test_loading_every_plugin_imports_no_heavy_dependency():
    """Registering is cheap: building the CLI with every plugin loaded imports no torch,
    transformers, diffusers or ray (they load inside the functions that need them)."""
    code = (
        "import sys\n"
        "from harness.cli import build_cli\n"
        "from harness.plugins import get_plugins\n"
        "build_cli(); get_plugins()\n"
        "heavy = ('torch', 'transformers', 'diffusers', 'ray', 'peft', 'openai', 'matplotlib')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "HARNESS_LOAD_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at load time: {done.stdout.strip()}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_is_found(package):
    names = [m for m in modules() if m.split(".")[0] == package]
    assert package in names and len(names) > 5
