import json
import logging
import textwrap

import pytest

from harness.errors import PluginError, UnknownIdError
from harness.plugins import Plugins, get_plugins, lookup

GOOD = """
from harness.hookspecs import hookimpl
from harness.types import Normalizer

class Halve(Normalizer):
    id = "halve"
    def __call__(self, scores):
        return next(iter(scores.values()))[:, 0] / 2

@hookimpl
def register_normalizers(register):
    register(Halve, aliases=("half",))
"""


def make_dist(root, dist, module, source, ep_name=None):
    """A minimal installed distribution on ``root`` with a t2i_harness entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[t2i_harness]\n{ep_name or module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_ordinary_plugins():
    plugins = get_plugins()
    names = [p.name for p in plugins.list()]
    assert "harness_plugins.tia2" in names and "harness_plugins.cards" in names
    assert sorted(plugins.benchmarks.ids()) == ["dsg_tifa160", "genai_bench", "hpdv2_test", "imagereward_test",
                                                "pickapic_v2", "seetrue", "tia2", "tifa_v1"]
    assert lookup("benchmarks", "tia2").__name__ == "TIA2"


def test_unknown_id_did_you_mean():
    with pytest.raises(UnknownIdError) as info:
        lookup("benchmarks", "tia")
    assert str(info.value) == ("Unknown benchmark 'tia'. Did you mean 'tia2'? Known: dsg_tifa160, genai_bench, "
                               "hpdv2_test, imagereward_test, pickapic_v2, seetrue, tia2, tifa_v1.")


def test_third_party_plugin_registers_with_alias(site, monkeypatch):
    make_dist(site, "t2i-harness-halve", "t2i_harness_halve", GOOD, ep_name="halve")
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "t2i-harness-halve")
    plugins = Plugins()
    info = {p.name: p for p in plugins.list()}["t2i-harness-halve"]
    assert info.version == "0.3.1"
    assert info.hooks == ["register_normalizers"]
    assert info.registered == {"normalizers": ["halve"]}
    assert plugins.normalizers.get("half") is plugins.normalizers.get("halve")
    import numpy as np

    assert plugins.normalizers.get("halve")()({"m": np.array([[4.0, 1.0]])}).tolist() == [2.0]


def test_allow_and_block_lists(site, monkeypatch):
    make_dist(site, "t2i-harness-halve", "t2i_harness_halve2", GOOD.replace("halve", "halve2").replace('"half"', '"h2"'))
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "")
    assert "halve2" not in Plugins().normalizers
    monkeypatch.delenv("HARNESS_LOAD_PLUGINS")
    monkeypatch.setenv("HARNESS_BLOCK_PLUGINS", "t2i-harness-halve")
    assert "halve2" not in Plugins().normalizers
    monkeypatch.delenv("HARNESS_BLOCK_PLUGINS")
    assert "halve2" in Plugins().normalizers  # unset allow-list: all installed plugins


BROKEN = {
    "import": ("import a_module_that_does_not_exist\n", "failed to load: ModuleNotFoundError"),
    "raises": (
        "from harness.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_normalizers(register):\n    raise RuntimeError('boom')\n",
        "raised in register_normalizers: RuntimeError: boom",
    ),
    "misspelled": (
        "from harness.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_reward_model(register):\n    pass\n",
        "unknown hook 'register_reward_model'. Did you mean 'register_reward_models'?",
    ),
    "not-a-subclass": (
        "from harness.hookspecs import hookimpl\n"
        "class Thing:\n    id = 'thing'\n"
        "@hookimpl\ndef register_normalizers(register):\n    register(Thing)\n",
        "is not a subclass of harness.types.Normalizer",
    ),
    "wrong-argument": (
        "from harness.hookspecs import hookimpl\n"
        "@hookimpl\ndef register_normalizers(registr):\n    pass\n",
        "has an invalid hook",
    ),
    "duplicate-id": (
        "from harness.hookspecs import hookimpl\n"
        "from harness_plugins.tia2 import TIA2\n"
        "class Copy(TIA2):\n    pass\n"
        "@hookimpl\ndef register_benchmarks(register):\n    register(Copy)\n",
        "benchmark id 'tia2' from plugin 't2i-harness-bad' is already registered by plugin "
        "'harness_plugins.tia2'",
    ),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_is_skipped_with_a_warning(kind, site, monkeypatch, caplog):
    module = f"t2i_harness_bad_{kind.replace('-', '_')}"
    source, message = BROKEN[kind]
    make_dist(site, "t2i-harness-bad", module, source)
    make_dist(site, "t2i-harness-halve", "t2i_harness_ok_" + kind.replace("-", "_"), GOOD)
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "t2i-harness-bad,t2i-harness-halve")
    with caplog.at_level(logging.WARNING, logger="harness"):
        plugins = Plugins()
    assert len(plugins.warnings) == 1
    assert plugins.warnings[0].startswith("plugin 't2i-harness-bad' ")
    assert message in plugins.warnings[0]
    assert "\n" not in plugins.warnings[0]
    assert message in caplog.text
    # The good plugin and the built-ins still work.
    assert "halve" in plugins.normalizers
    assert plugins.benchmarks.get("tia2").__module__ == "harness_plugins.tia2"
    assert "thing" not in plugins.normalizers

    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="t2i-harness-bad"):
        Plugins()


def run_harness(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )


def test_broken_plugin_does_not_break_the_cli(site):
    make_dist(site, "t2i-harness-bad", "t2i_harness_bad_cli", "raise ImportError('missing dep')\n")
    env = {"PYTHONPATH": str(site), "HARNESS_LOAD_PLUGINS": "t2i-harness-bad"}
    result = run_harness("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    names = [p["name"] for p in json.loads(result.stdout)]
    assert "t2i-harness-bad" not in names and "harness_plugins.tia2" in names
    assert result.stderr.startswith(
        "Warning: plugin 't2i-harness-bad' failed to load: ImportError: missing dep"
    )
    assert len(result.stderr.strip().splitlines()) == 1

    result = run_harness("plugins", env={**env, "HARNESS_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: plugin 't2i-harness-bad' failed to load: ImportError: missing dep"


def test_every_hookspec_is_documented_and_registered_kinds_cover_them():
    from harness import hookspecs
    from harness.plugins import KINDS

    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert sorted(specs) == sorted([k.hook for k in KINDS] + ["register_commands"])
    for name in specs:
        assert ":param" in getattr(hookspecs, name).__doc__


def test_hooks_get_only_the_arguments_they_declare(site, monkeypatch):
    make_dist(site, "t2i-harness-quiet", "t2i_harness_quiet", """
        from harness import hookimpl

        CALLS = []

        @hookimpl
        def register_commands():
            CALLS.append("commands")
    """)
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "t2i-harness-quiet")
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "1")
    import click

    plugins = Plugins()
    plugins.add_commands(click.Group())
    import t2i_harness_quiet

    assert t2i_harness_quiet.CALLS == ["commands"]
    assert plugins.warnings == []


def test_contract_declarations_are_checked_at_registration(site, monkeypatch):
    make_dist(site, "t2i-harness-badctor", "t2i_harness_badctor", """
        from harness import RewardModel, hookimpl

        class Needy(RewardModel):
            id = "needy"
            def __init__(self, path):
                self.path = path
            def preprocess(self, image): return image
            def embed_images(self, batch): return batch
            def score(self, features, prompts): return [[0.0] * len(p) for p in prompts]

        @hookimpl
        def register_reward_models(register):
            register(Needy)
    """)
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "t2i-harness-badctor")
    plugins = Plugins()
    assert "needy" not in plugins.reward_models
    (warning,) = plugins.warnings
    assert "does not accept the constructor arguments checkpoint, device, dtype" in warning
    monkeypatch.setenv("HARNESS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="Needy does not accept the constructor arguments"):
        Plugins()


def test_catalogs_are_typed_and_bases_are_exported():
    import typing

    import harness
    from harness.plugins import KINDS

    plugins = get_plugins()
    for kind in KINDS:
        assert getattr(harness, kind.base.__name__) is kind.base
        hint = typing.get_type_hints(type(plugins).__dict__[kind.key].fget)["return"]
        assert typing.get_args(hint) == (kind.base,)
        for entry in plugins.catalogs[kind.key]:
            assert issubclass(entry.cls, kind.base)
    assert harness.hookimpl is __import__("harness.hookspecs").hookspecs.hookimpl


def test_every_built_in_reward_model_has_a_model_card():
    from test_cli import harness

    from harness.types import ModelCard

    builtins = [e for e in get_plugins().reward_models if e.plugin.startswith("harness_plugins")]
    assert {e.id for e in builtins} >= {"clip", "pickscore", "blip2", "imagereward", "hpsv2", "vqascore",
                                        "hpsv3", "vlm_judge"}
    for entry in builtins:
        card = entry.cls.card
        assert isinstance(card, ModelCard), entry.id
        assert card.checkpoint and card.license and card.score_range and card.meaning, entry.id
    shown = harness("models", "hpsv3")
    assert shown.returncode == 0 and "license: MIT" in shown.stdout and "score_range:" in shown.stdout
    listed = json.loads(harness("models", "--json").stdout)
    assert {r["id"]: r["card"]["license"] for r in listed}["clip"] == "MIT"
