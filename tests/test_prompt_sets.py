"""Contrastive prompt-set generators: rules vs the released sets, tia2, and the LLM pipeline."""

import json
import time

import pytest

from harness.errors import HarnessError
from harness.plugins import get_plugins
from harness_plugins.llm import LLMPrompts, clean, parse_reply
from harness_plugins.rules import RuleBasedPrompts, article, pluralize, singularize


def released(tia2_dir, subset):
    return json.loads((tia2_dir / f"prompts/prompt_set_{subset}.json").read_text())


def test_rules_reproduce_the_released_counting_sets(tia2_dir):
    sets = released(tia2_dir, "counting")
    assert len(sets) == 150
    assert RuleBasedPrompts(colors=False).generate(list(sets)) == sets


def test_rules_reproduce_the_composition_template(tia2_dir):
    sets = released(tia2_dir, "composition")
    ours = RuleBasedPrompts(colors=False).generate(list(sets))
    differ = [p for p, v in sets.items() if ours[p] != v[:13]]
    # One released set carries a cartoon prompt about other objects (a data slip upstream).
    assert differ == ["a realistic photo of an automobile and a truck"]
    assert sets[differ[0]][12] == "a cartoon drawing of two bicycles and three cars"
    assert ours[differ[0]][:12] == sets[differ[0]][:12]
    fixed = RuleBasedPrompts(faithful=False).contrast("a realistic photo of a cat and a deer")
    assert "a realistic photo of two cats and two deer" in fixed
    assert "a cartoon drawing of two cats and three deer" in fixed


def test_grammar():
    assert [article(w) for w in ("apple", "umbrella", "unicorn", "hour", "cat")] == ["an", "an", "a", "an", "a"]
    assert [pluralize(w) for w in ("teddy bear", "bus", "strawberry", "deer", "knife", "box")] == [
        "teddy bears", "buses", "strawberries", "deer", "knives", "boxes"]
    assert [singularize(w) for w in ("vases", "glasses", "cherries", "wolves", "deer")] == [
        "vase", "glass", "cherry", "wolf", "deer"]
    rules = RuleBasedPrompts()
    assert rules.contrast("a photo of an umbrella") == ["a photo of two umbrellas", "a photo of three umbrellas"]
    assert "a blue car and a red bus" in rules.contrast("a red car and a blue bus")
    assert "an orange car" in rules.contrast("a red car")


def test_rules_error_names_the_prompt():
    with pytest.raises(HarnessError, match="no rule applies to prompt 'a frog in the middle of the ocean'"):
        RuleBasedPrompts().generate(["a frog in the middle of the ocean"])


def test_tia2_generator(tia2_dir):
    gen = get_plugins().prompt_generators.get("tia2")(data_dir=tia2_dir)
    out = gen.generate(["a frog in the middle of the ocean"])
    assert out["a frog in the middle of the ocean"][0] == "A frog in a pond."
    with pytest.raises(HarnessError, match="'a purple frog' is not a TIA2 prompt"):
        gen.generate(["a purple frog"])


def test_reply_parsing_and_cleaning():
    assert parse_reply('{"prompts": ["a b", "c d"]}') == ["a b", "c d"]
    assert parse_reply('Sure:\n```json\n["x y", "z"]\n```') == ["x y", "z"]
    assert parse_reply('[{"prompt": "one"}, {"text": "two"}]') == ["one", "two"]
    assert parse_reply('{"prompts": ["kept", "also kept", "cut off') == ["kept", "also kept"]
    assert parse_reply("I can't do that.") is None
    assert clean("A cat.", ["a cat", "...", "a dog", "A  dog.", "two cats", "", "a bird"], 2) == ["a dog", "two cats"]


def test_llm_settings_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(HarnessError, match="no API key for the LLM server http://127.0.0.1:1/v1"):
        LLMPrompts(base_url="http://127.0.0.1:1/v1")
    gen = LLMPrompts(base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=1, backoff=0.01,
                     timeout=2, cache=tmp_path / "c.sqlite")
    with pytest.raises(HarnessError, match=r"no contrastive prompts for 'a cat' from http://127.0.0.1:9/v1 .*unreachable"):
        gen.generate(["a cat"])


@pytest.fixture(scope="module")
def server():
    from llm_server import ChatServer

    s = ChatServer()
    yield s
    s.close()


@pytest.fixture
def fresh(server):
    server.fail_next, server.delay, server.override = 0, 0.0, None
    server.script.clear()
    server.requests.clear()
    server.replies.clear()
    return server


def make(server, tmp_path, **kw):
    settings = dict(model="smollm2", base_url=server.url, api_key="test", n=4, temperature=0.7,
                    seed=1, max_tokens=120, backoff=0.05, cache=tmp_path / "sets.sqlite")
    settings.update(kw)
    return LLMPrompts(**settings)


@pytest.mark.slow
def test_llm_pipeline_with_a_real_model(fresh, tmp_path):
    prompts = ["a red car on a street", "a frog in the middle of the ocean"]
    gen = make(fresh, tmp_path)
    sets = gen.generate(prompts)
    for prompt, values in sets.items():
        # Every prompt kept was parsed out of what the model actually wrote for this input.
        answers = [reply for body, reply in zip(fresh.requests, fresh.replies, strict=True)
                   if prompt in body["messages"][1]["content"]]
        assert answers and all(any(v in a for a in answers) for v in values)
        keys = [v.lower().strip(" .") for v in values]
        assert len(set(keys)) == len(keys)  # de-duplicated
        assert prompt.lower() not in keys  # copies of the input removed
    body = fresh.requests[0]
    assert body["model"] == "smollm2" and body["seed"] == 1 and body["temperature"] == 0.7
    assert body["response_format"] == {"type": "json_object"}
    assert "exactly ONE" in body["messages"][1]["content"] and prompts[0] in body["messages"][1]["content"]
    # Cached: the same settings send nothing; another seed asks again.
    sent = len(fresh.requests)
    again = make(fresh, tmp_path).generate(prompts)
    assert again == sets and len(fresh.requests) == sent
    make(fresh, tmp_path, seed=2).generate(prompts[:1])
    assert len(fresh.requests) > sent


@pytest.mark.slow
def test_llm_retries_after_a_server_error(fresh, tmp_path):
    fresh.fail_next = 1
    gen = make(fresh, tmp_path)
    prompt = "a frog in the middle of the ocean"  # the model answers this one at seed 1
    out = gen.generate([prompt])
    assert out[prompt]
    assert gen.requests >= 2 and len(fresh.requests) == gen.requests


@pytest.mark.slow
def test_llm_timeout_names_the_server(fresh, tmp_path):
    fresh.delay = 3.0
    fresh.override = '{"prompts": ["too late"]}'  # the late answers need no generation
    gen = make(fresh, tmp_path, timeout=0.5, max_retries=1)
    start = time.monotonic()
    with pytest.raises(HarnessError, match=f"'a cat on a mat' from {fresh.url} .*timed out"):
        gen.generate(["a cat on a mat"])
    assert time.monotonic() - start < 6


@pytest.mark.slow
def test_llm_invalid_json_and_sets_already_generated_stay_cached(fresh, tmp_path):
    gen = make(fresh, tmp_path, max_retries=1)
    fresh.override = '{"prompts": ["a green apple on a table", "two red apples on a table"]}'
    first = gen.generate(["a red apple on a table"])
    fresh.override = "Sorry, I cannot help with that."
    with pytest.raises(HarnessError, match="'a dog in the snow' .*not a JSON list of prompts"):
        gen.generate(["a red apple on a table", "a dog in the snow"])
    fresh.override = None
    sent = len(fresh.requests)
    assert make(fresh, tmp_path).generate(["a red apple on a table"]) == first
    assert len(fresh.requests) == sent
