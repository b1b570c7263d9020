"""Types: a value of the wrong type anywhere in a config is a one-line error naming its key,
never a string whose characters are taken for prompts."""

import json
from dataclasses import dataclass, field

import pandas as pd
import pytest
from test_cli import harness, one_line_error

from harness import Benchmark, BenchmarkData, HarnessError, LeaderboardConfig
from harness.config import check_types, describe_type, load_config, type_problem
from harness.evaluation.contrastive import contrastive_sets, generate, read_sets
from harness.scoring.specs import load_reward_model
from harness_plugins.sd.config import DDPOConfig, SFTConfig


@pytest.mark.parametrize("values,message", [
    ({"prompts": "a cat"}, "config 'prompts' must be a list of strings, got 'a cat' (write ['a cat'] for one item)"),
    ({"use_lora": "false"}, "config 'use_lora' must be true/false, got 'false' (write false without quotes)"),
    ({"use_lora": "yes"}, "config 'use_lora' must be true/false, got 'yes' (write true without quotes)"),
    ({"heldout_rewards": "clip"}, "config 'heldout_rewards' must be a list of strings, got 'clip'"),
    ({"eval_prompts": [1, 2]}, "config 'eval_prompts' must be a list of strings, got [1, 2]"),
    ({"train_learning_rate": "1e-4"}, "must be a number, got '1e-4' (a quoted number, or YAML read it as text: write 0.0001)"),
    ({"num_epochs": 2.5}, "config 'num_epochs' must be an integer, got 2.5"),
    ({"num_epochs": True}, "config 'num_epochs' must be an integer, got True"),
    ({"reward": ["clip", 3]}, "config 'reward' must be a string or a list of strings, got ['clip', 3]"),
    ({"normalizer_options": ["scale", 3]}, "config 'normalizer_options' must be a mapping"),
    ({"resolution": "512"}, "config 'resolution' must be an integer or null, got '512'"),
])
def test_finetune_config_types(values, message):
    base = {"prompts": ["a cat"], **values}
    with pytest.raises(HarnessError) as err:
        load_config(DDPOConfig, base)
    assert message in str(err.value) and "\n" not in str(err.value)
    # A config built in Python is checked the same way when it is validated.
    with pytest.raises(HarnessError, match="must be"):
        SFTConfig(**base).validate()


def test_right_types_pass_and_yaml_numbers_coerce():
    config = load_config(DDPOConfig, {"prompts": ["a cat"], "train_learning_rate": 1, "num_epochs": 3.0,
                                      "reward": ["clip", "pickscore"], "resolution": None})
    assert config.train_learning_rate == 1.0 and config.num_epochs == 3
    check_types(config)


def test_type_descriptions():
    assert describe_type(list[str]) == "a list of strings"
    assert describe_type(int | None) == "an integer or null"
    assert describe_type(dict[str, float]) == "a mapping"
    assert type_problem(["a"], list[str]) is None
    assert type_problem(("a",), tuple[str, ...]) is None
    assert type_problem({"a": "x"}, dict[str, float]) == "must be a mapping, got {'a': 'x'}"


def test_nested_groups_name_the_full_key():
    @dataclass
    class Inner:
        flags: list[str] = field(default_factory=list)

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(HarnessError, match=r"config 'inner.flags' must be a list of strings, got 'x'"):
        load_config(Outer, {"inner": {"flags": "x"}})


@pytest.mark.parametrize("group,key,value,message", [
    ("scoring", "models", "clip", "scoring.models must be a list of strings, got 'clip' (write ['clip'] for one item)"),
    ("data", "subsets", "counting", "data.subsets must be a list of strings"),
    ("report", "plots", "false", "report.plots must be true/false, got 'false' (write false without quotes)"),
    ("data", "skip_missing", "true", "data.skip_missing must be true/false"),
    ("calibration", "folds", "5", "calibration.folds must be an integer, got '5'"),
    ("calibration", "prompt_options", "x", "calibration.prompt_options must be a mapping"),
])
def test_leaderboard_config_types(tmp_path, group, key, value, message):
    with pytest.raises(HarnessError) as err:
        LeaderboardConfig.from_dict({group: {key: value}})
    assert message in str(err.value)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({group: {key: value}}))  # JSON is YAML: the value stays quoted
    one_line_error(harness("leaderboard", "tia2", "--config", config, "--out", tmp_path / "o"), key)


def test_finetune_command_refuses_a_string_for_prompts(tmp_path):
    config = tmp_path / "ddpo.yaml"
    config.write_text("prompts: a cat\nnum_epochs: 1\n")
    one_line_error(harness("finetune", "ddpo", "--config", config),
                   "config 'prompts' must be a list of strings, got 'a cat'")
    config.write_text("prompts: [a cat]\nuse_lora: 'false'\n")
    one_line_error(harness("finetune", "ddpo", "--config", config), "config 'use_lora' must be true/false")
    one_line_error(harness("finetune", "ddpo", "--config", config, "--set", "use_lora=true",
                           "--set", "heldout_rewards=clip"), "config 'heldout_rewards' must be a list")


def test_prompt_sets_must_be_lists_of_strings(tmp_path):
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"a cat": "a dog"}))
    with pytest.raises(HarnessError, match="the value of 'a cat' must be a list of strings"):
        read_sets(sets)
    sets.write_text(json.dumps({"a cat": ["a dog", 3]}))
    with pytest.raises(HarnessError, match="must be a list of strings"):
        read_sets(sets)

    from harness.plugins import Entry, get_plugins
    from harness.types import PromptSetGenerator

    class Stringy(PromptSetGenerator):
        id = "stringy"

        def generate(self, prompts):
            return {p: "not a list" for p in prompts}

    get_plugins().prompt_generators.add(Entry("stringy", Stringy, "test-plugin"))
    with pytest.raises(HarnessError, match="gave 'not a list' for 'a cat'; expected a list"):
        generate("stringy", ["a cat"])

    class StringSets(Benchmark):
        id = "string-sets"
        subsets = ("all",)

        def load(self, subsets=None):
            images = pd.DataFrame([{"subset": "all", "prompt": "a cat", "image": "1.png", "binary": 1,
                                    "graded": 1.0}])
            return BenchmarkData(self.id, images, contrastive={("all", "a cat"): "a dog"})

        def reported(self, subsets=None):
            return pd.DataFrame()

    with pytest.raises(HarnessError, match="gave str 'a dog' as the contrastive prompts of 'a cat'"):
        contrastive_sets(StringSets().load(), "benchmark")


def test_model_spec_options_are_checked_against_the_constructor():
    with pytest.raises(HarnessError, match="option 'batch_size' must be an integer, got 'abc'"):
        load_reward_model("clip:batch_size=abc", device="cpu")
    with pytest.raises(HarnessError, match="option 'max_text_tokens' must be an integer, got 1.5"):
        load_reward_model("blip2:max_text_tokens=1.5", device="cpu")
    # A number where the constructor takes text is that text: a folder named 2024.
    with pytest.raises(HarnessError, match="checkpoint '2024'"):
        load_reward_model("clip:checkpoint=2024", device="cpu")
