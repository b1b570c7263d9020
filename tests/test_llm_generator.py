"""The LLM prompt generator against a local OpenAI-compatible server: Retry-After (bounded),
answers that are not OpenAI-format JSON, timeouts, and a cache keyed on the server as well as the
model.

No model is loaded: the server answers scripted replies or fixed text, and waits are recorded by
a fake sleep (never slept), so nothing here depends on wall-clock timing.
"""

from __future__ import annotations

import email.utils
import json
import os
import sqlite3

import pytest
from llm_server import ChatServer, Reply, completion

import harness_plugins.llm as llm
from harness.errors import HarnessError
from harness_plugins.llm import LLMPrompts

PROMPT = "a cat on a mat"
ANSWER = '{"prompts": ["a dog on a mat", "two cats on a mat"]}'
SETS = ["a dog on a mat", "two cats on a mat"]
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def servers():
    pair = ChatServer(), ChatServer()
    yield pair
    for server in pair:
        server.close()


@pytest.fixture
def server(servers):
    for s in servers:
        s.fail_next, s.delay, s.override = 0, 0.0, ANSWER
        s.script.clear()
        s.requests.clear()
        s.replies.clear()
    return servers[0]


@pytest.fixture
def slept(monkeypatch):
    """Every wait the generator asks for, in seconds; none is slept."""
    waits: list[float] = []
    monkeypatch.setattr(llm, "_sleep", waits.append)
    monkeypatch.setattr(llm, "_now", lambda: NOW)
    return waits


def make(server, tmp_path, **kw):
    settings = dict(model="smollm2", base_url=server.url, api_key="test", n=2, backoff=0.5,
                    max_retries=3, cache=tmp_path / "sets.sqlite")
    settings.update(kw)
    return LLMPrompts(**settings)


def failure(server, attempts: int, problem: str) -> str:
    return (f"no contrastive prompts for {PROMPT!r} from {server.url} (model smollm2) after "
            f"{attempts} attempts: {problem}")


# -- Retry-After ----------------------------------------------------------------------------------
def test_retry_after_in_seconds_is_honoured(server, slept, tmp_path):
    server.script += [Reply(429, '{"error": {"message": "slow down"}}', {"Retry-After": "7"}),
                      Reply(503, "busy", {"Retry-After": "2.5"}, "text/plain"),
                      Reply(429, "{}", {"retry-after-ms": "1500", "Retry-After": "2"})]
    gen = make(server, tmp_path)
    assert gen.generate([PROMPT]) == {PROMPT: SETS}
    assert slept == [7.0, 2.5, 1.5]  # the server's waits, not the backoff (0.5, 1, 2)
    assert gen.requests == len(server.requests) == 4


def test_retry_after_as_an_http_date(server, slept, tmp_path):
    server.script += [Reply(503, "busy", {"Retry-After": email.utils.formatdate(NOW + 42, usegmt=True)}),
                      Reply(429, "{}", {"Retry-After": email.utils.formatdate(NOW - 100, usegmt=True)}),
                      Reply(429, "{}", {"Retry-After": email.utils.formatdate(NOW + 5)})]  # -0000
    gen = make(server, tmp_path)
    assert gen.generate([PROMPT]) == {PROMPT: SETS}
    assert slept == [42.0, 0.0, 5.0]  # a date already past: retry at once
    assert gen.requests == 4


def test_without_a_readable_retry_after_the_backoff_applies_bounded_by_max_wait(server, slept, tmp_path):
    server.script += [Reply(429, "{}"), Reply(503, "{}", {"Retry-After": "soon"}),
                      Reply(500, "{}", {"Retry-After": ""})]
    assert make(server, tmp_path).generate([PROMPT]) == {PROMPT: SETS}
    assert slept == [0.5, 1.0, 2.0]
    slept.clear()
    server.script += [Reply(500, "{}")] * 3
    gen = make(server, tmp_path, backoff=25, max_wait=60, cache=False)
    assert gen.generate([PROMPT]) == {PROMPT: SETS}
    assert slept == [25.0, 50.0, 60.0]


def test_a_retry_after_beyond_max_wait_fails_at_once(server, slept, tmp_path):
    server.script += [Reply(429, "{}", {"Retry-After": "3600"})]
    gen = make(server, tmp_path)
    with pytest.raises(HarnessError) as err:
        gen.generate([PROMPT])
    assert str(err.value) == (
        f"no contrastive prompts for {PROMPT!r} from {server.url} (model smollm2): it answered "
        "HTTP 429 asking to retry after 3600 s, more than max_wait=60 s: run again later (sets "
        "already generated are cached), or raise the llm option max_wait")
    assert slept == [] and gen.requests == len(server.requests) == 1
    # An HTTP date past the bound too; a larger max_wait waits as asked.
    server.script += [Reply(503, "{}", {"Retry-After": email.utils.formatdate(NOW + 600, usegmt=True)})]
    with pytest.raises(HarnessError, match="HTTP 503 asking to retry after 600 s, more than max_wait=60 s"):
        make(server, tmp_path).generate([PROMPT])
    server.script += [Reply(429, "{}", {"Retry-After": "3600"})]
    assert make(server, tmp_path, max_wait=7200).generate([PROMPT]) == {PROMPT: SETS}
    assert slept == [3600.0]


# -- answers that are not OpenAI-format JSON ------------------------------------------------------
full = json.dumps(completion(ANSWER))
BAD_ANSWERS = {
    "html": (Reply(200, "<!DOCTYPE html>\n<html><body>Gateway\nTimeout</body></html>", content_type="text/html"),
             "an HTML page, not OpenAI-format JSON: '<!DOCTYPE html> <html><body>Gateway Timeout</body></html>'"),
    "truncated JSON": (Reply(200, '{"choices": [{"message": {"content": "{\\"prompts\\": [\\"a do'),
                       "invalid JSON (Unterminated string starting at: line 1 column 38 (char 37)): "
                       """'{"choices": [{"message": {"content": "{\\\\"prompts\\\\": [\\\\"a do'"""),
    "no choices": (Reply(200, '{"object": "chat.completion", "choices": []}'),
                   """JSON without choices: '{"object": "chat.completion", "choices": []}'"""),
    "no content": (Reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]})),
                   "JSON without a text choices[0].message.content: "
                   """'{"choices": [{"message": {"role": "assistant", "content": null}}]}'"""),
    "empty": (Reply(200, ""), "an empty body, not OpenAI-format JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_200_answer_that_is_not_openai_json_is_a_failed_attempt(server, slept, tmp_path, case):
    reply, problem = BAD_ANSWERS[case]
    server.script += [reply]
    gen = make(server, tmp_path)
    assert gen.generate([PROMPT]) == {PROMPT: SETS}  # retried, and the next answer is used
    assert gen.requests == 2 and slept == [0.5]

    server.script += [reply] * 3
    gen = make(server, tmp_path, max_retries=2, seed=1)
    with pytest.raises(HarnessError) as err:
        gen.generate([PROMPT])
    assert str(err.value) == failure(server, 3, f"the server answered HTTP 200 with {problem}")
    assert "\n" not in str(err.value)
    assert gen.requests == 3 and slept == [0.5, 0.5, 1.0]
    assert gen.cache.get(gen.cache_key(PROMPT)) is None  # nothing cached for the failed prompt


def test_a_body_cut_off_in_transport(server, slept, tmp_path):
    server.script += [Reply(200, full, sent=40)] * 2
    gen = make(server, tmp_path, max_retries=1)
    with pytest.raises(HarnessError) as err:
        gen.generate([PROMPT])
    assert str(err.value).startswith(failure(
        server, 2, "the server is unreachable or broke the connection (RemoteProtocolError: "))
    assert gen.requests == 2 and slept == [0.5]


def test_timeouts_are_one_line_naming_the_setting(server, slept, tmp_path):
    server.delay = 1.0
    gen = make(server, tmp_path, timeout=0.2, max_retries=1)
    with pytest.raises(HarnessError) as err:
        gen.generate([PROMPT])
    assert str(err.value) == failure(server, 2, "the server timed out after 0.2 s (llm option timeout)")
    assert gen.requests == 2 and slept == [0.5]


# -- the cache ------------------------------------------------------------------------------------
def test_the_cache_is_keyed_on_the_server_as_well_as_the_model(servers, server, tmp_path):
    a, b = servers
    b.override = '{"prompts": ["a cat under a mat", "a black cat on a mat"]}'
    first = make(a, tmp_path).generate([PROMPT])
    other = make(b, tmp_path).generate([PROMPT])  # same model name, same cache file
    assert first == {PROMPT: SETS}
    assert other == {PROMPT: ["a cat under a mat", "a black cat on a mat"]}
    assert (len(a.requests), len(b.requests)) == (1, 1)
    # Each server's answer is cached under its own URL (a trailing slash is the same server).
    assert make(a, tmp_path, base_url=a.url + "/").generate([PROMPT]) == first
    assert make(b, tmp_path).generate([PROMPT]) == other
    assert (len(a.requests), len(b.requests)) == (1, 1)
    keys = {make(s, tmp_path).cache_key(PROMPT) for s in servers}
    assert len(keys) == 2


def test_a_damaged_or_older_prompt_set_cache(tmp_path, server):
    path = tmp_path / "sets.sqlite"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(HarnessError) as err:
        make(server, tmp_path)
    assert str(err.value) == (
        f"prompt-set cache {path} is damaged (file is not a database): delete it (with its -wal and "
        "-shm files) to start an empty cache, or give the llm generator the option "
        "cache=ANOTHER.sqlite, or cache=false")
    # A cache the generator wrote before caches were checked opens, and its sets are read.
    path.unlink()
    gen = make(server, tmp_path, cache=False)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS sets (key TEXT PRIMARY KEY, prompt TEXT, value TEXT)")
    conn.execute("INSERT INTO sets VALUES (?, ?, ?)", (gen.cache_key(PROMPT), PROMPT, '["x y"]'))
    conn.commit()
    conn.close()
    assert make(server, tmp_path).generate([PROMPT]) == {PROMPT: ["x y"]}
    assert server.requests == []


@pytest.mark.parametrize("option, value, expected", [
    ("max_wait", -1, "llm option max_wait must be a number of seconds >= 0, got -1"),
    ("timeout", 0, "llm option timeout must be a number of seconds >= 0.001, got 0"),
    ("max_retries", "3", "llm option max_retries must be a whole number >= 0, got '3'"),
    ("n", True, "llm option n must be a whole number >= 1, got True"),
])
def test_settings_are_checked(server, tmp_path, option, value, expected):
    with pytest.raises(HarnessError) as err:
        make(server, tmp_path, **{option: value})
    assert str(err.value) == expected
