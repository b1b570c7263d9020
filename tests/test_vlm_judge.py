"""The vlm_judge reward model against OpenAI-compatible servers on 127.0.0.1 (tests/llm_server.py).

Fast tests: the server answers with a "brightness judge" (``judge`` below): for an image of mean
grey level ``q`` (in [0, 1], taken from the PNG the client sent), its first token's top
log-probabilities hold yes- and no-variants whose probabilities sum to ``q`` and ``1 - q``
(``1 - q`` and ``q`` for a prompt saying "dark"), so the exact expected score is ``q``, computed
here from the image file independently of the plugin. Prompts naming a failure class make it
answer that failure. Waits are recorded by a fake sleep (never slept).

The slow test runs SmolLM2-135M-Instruct behind the same server and checks that the plugin's
score equals P(yes) / (P(yes) + P(no)) computed here from the model's own logits. SmolLM2 reads
text only: the server drops the image part, so that test proves real log-probabilities flow
through the real client path, not that the model looks at the image.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import time

import numpy as np
import pytest
from llm_server import ChatServer, Reply, completion, logprob_completion
from PIL import Image

import harness_plugins.vlm_judge as vlm
from harness.errors import HarnessError
from harness.scoring import score_images
from harness.scoring.cache import ScoreCache
from harness.scoring.plan import model_cache_key
from harness.scoring.specs import load_reward_model, parse_model_spec
from harness.testing import check_reward_model, image_modes
from harness.types import ImageFailure, to_rgb
from harness_plugins.vlm_judge import VLMJudge, answer_word, encode_image, yes_probability

NOW = 1_700_000_000.0


# -- the scripted judge ---------------------------------------------------------------------------
def brightness(image: Image.Image) -> float:
    """The judge's P(yes) for an image (as the client sends it: RGB, transparency on white)."""
    return float(np.clip(np.asarray(to_rgb(image), dtype=np.float64).mean() / 255, 0.02, 0.98))


def expected(image: Image.Image, prompt: str) -> float:
    q = brightness(image)
    return 1 - q if "dark" in prompt else q


def sent(body: dict) -> tuple[Image.Image, str]:
    """The image and the question of a request, as the server received them."""
    parts = body["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image, next(p["text"] for p in parts if p["type"] == "text")


def judge(body: dict) -> Reply:
    image, question = sent(body)
    if "no-logprobs" in question:
        return Reply(200, json.dumps(completion("Yes")))
    if "undecided" in question:
        return Reply(200, json.dumps(logprob_completion([("Maybe", -0.1), ("Perhaps", -2.5)])))
    if "server-error" in question:
        return Reply(500, '{"error": {"message": "boom"}}')
    if "refused" in question:
        return Reply(400, '{"error": {"message": "image too large"}}')
    if "html" in question:
        return Reply(200, "<html><body>Bad gateway</body></html>", content_type="text/html")
    q = brightness(image)
    q = 1 - q if "dark" in question else q
    top = [(" Yes", math.log(0.7 * q)), ("no", math.log(0.1 * (1 - q))), ("YES", math.log(0.3 * q)),
           (" No", math.log(0.9 * (1 - q))), (" maybe", math.log(1e-3))]
    return Reply(200, json.dumps(logprob_completion(top, model=body["model"])))


@pytest.fixture(scope="module")
def servers():
    pair = ChatServer(), ChatServer()
    yield pair
    for server in pair:
        server.close()


@pytest.fixture
def server(servers):
    deadline = time.monotonic() + 10
    while any(s.active for s in servers) and time.monotonic() < deadline:
        time.sleep(0.05)  # answers a test timed out on are still being written
    for s in servers:
        s.fail_next, s.delay, s.override, s.respond = 0, 0.0, None, judge
        s.script.clear()
        s.requests.clear()
        s.max_active = 0
    return servers[0]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")


@pytest.fixture
def slept(monkeypatch):
    """Every wait the judge asks for, in seconds; none is slept."""
    waits: list[float] = []
    monkeypatch.setattr(vlm, "_sleep", waits.append)
    monkeypatch.setattr(vlm, "_now", lambda: NOW)
    return waits


def make(server, tmp_path, **kw) -> VLMJudge:
    settings = dict(model="judge-model", base_url=server.url, backoff=0.5, max_retries=2,
                    concurrency=4, cache=tmp_path / "answers.sqlite")
    settings.update(kw)
    return VLMJudge(**settings)


def pictures(n: int = 3, size: tuple[int, int] = (24, 16)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    low = np.linspace(10, 190, n).astype(int)  # a different brightness for each
    return [Image.fromarray(rng.integers(lo, lo + 60, (size[1], size[0], 3), dtype=np.uint8))
            for lo in low]


def save(images, folder) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for k, im in enumerate(images):
        path = folder / f"{k}.{'tif' if im.mode == 'CMYK' else 'png'}"
        im.save(path)
        paths.append(str(path))
    return paths


def score_one(model, image, prompts):
    return model.score(model.embed_images([model.preprocess(image)]), [prompts])[0]


# -- the score ------------------------------------------------------------------------------------
def test_yes_probability_rule():
    assert answer_word(" Yes") == answer_word("▁YES") == answer_word("ĠYes.") == "yes"
    assert answer_word("No,") == answer_word("\nno ") == "no"
    assert answer_word("Nope") == "nope" and answer_word("Yesterday") == "yesterday"
    top = [(" Yes", math.log(0.5)), ("yes", math.log(0.1)), ("No", math.log(0.2)),
           ("▁no", math.log(0.1)), ("Nope", math.log(0.09)), ("Yesterday", math.log(0.01))]
    assert yes_probability(top) == pytest.approx(0.6 / 0.9, abs=1e-12)
    assert yes_probability([("Yes", -3.0), ("Maybe", -0.1)]) == 1.0  # no absent: counts 0
    assert yes_probability([("no", -3.0)]) == 0.0
    assert yes_probability([("Maybe", -0.1), ("Sure", -1.0)]) is None
    assert yes_probability([("Yes", -math.inf), ("No", -math.inf)]) is None
    # far below zero: relative to the largest term, no underflow and no 0 / 0
    assert yes_probability([("Yes", -1000.0), ("No", -1001.0)]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert yes_probability([("Yes", -math.inf), ("No", -5.0)]) == 0.0


def test_scores_are_p_yes_from_the_servers_logprobs(server, tmp_path):
    base = pictures(3)
    modes = image_modes(base[1])
    images = [*base, modes["L"], modes["P"], modes["RGBA"], modes["CMYK"]]
    paths = save(images, tmp_path / "images")
    prompts = [["a cat", "a dark room"]] * len(paths)
    model = make(server, tmp_path)
    run = score_images(model, paths, prompts, batch_size=4)
    assert not run.failed
    for path, scores in zip(paths, run.scores, strict=True):
        with Image.open(path) as im:
            want = [expected(im, p) for p in ("a cat", "a dark room")]
        np.testing.assert_allclose(scores, want, atol=1e-6, rtol=0)
    # The CMYK copy holds the RGB image's very pixels (PIL's conversion is lossless both ways):
    # answered from the answer cache, not asked twice.
    assert model.requests == len(server.requests) == 2 * (len(paths) - 1)
    assert model.cache_hits == 2
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 1
    assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 20
    # what was sent: the RGB image (RGBA composited onto white) and the question
    got = {sent(b)[1] for b in server.requests}
    assert got == {'Does this figure show "a cat"? Please answer yes or no.',
                   'Does this figure show "a dark room"? Please answer yes or no.'}
    rgba = np.asarray(to_rgb(modes["RGBA"]))
    assert any(np.array_equal(np.asarray(sent(b)[0]), rgba) and sent(b)[0].mode == "RGB"
               for b in server.requests)


def test_contract_checks(server, tmp_path):
    images = pictures(3)
    prompts = [["a cat", "a dark cat"], ["a dog"], ["a dark sky", "a sky", "a bright sky"]]
    scores = check_reward_model(make(server, tmp_path, cache=False), images, prompts)
    for im, ps, s in zip(images, prompts, scores, strict=True):
        np.testing.assert_allclose(s, [expected(im, p) for p in ps], atol=1e-6, rtol=0)


def test_encoding_is_the_same_from_an_array(server):
    image = pictures(1)[0]
    a, b = encode_image(image), encode_image(np.asarray(image, dtype=np.float32))
    assert a == b and a.url.startswith("data:image/png;base64,")


def test_template_option(server, tmp_path):
    model = make(server, tmp_path, template="Is this {prompt}? Answer yes or no.")
    score_one(model, pictures(1)[0], ["a cat"])
    assert sent(server.requests[0])[1] == "Is this a cat? Answer yes or no."


# -- failures: recorded per image, never scores ---------------------------------------------------
def test_failures_are_recorded_never_zeros(server, slept, tmp_path):
    images = pictures(7)
    paths = save(images, tmp_path / "images")
    prompts = [["a cat"], ["a cat", "no-logprobs"], ["undecided"], ["server-error"], ["refused"],
               ["html"], ["a dark cat"]]
    cache = ScoreCache(tmp_path / "scores.sqlite")
    model = make(server, tmp_path)
    run = score_images(model, paths, prompts, cache=cache, batch_size=8)
    reasons = run.failed
    assert set(reasons) == set(paths[1:6])
    head = f"judge {server.url} (model judge-model) gave no yes/no answer for prompt "
    assert reasons[paths[1]] == head + "'no-logprobs': " + (
        "the answer carries no log-probabilities (no choices[0].logprobs.content): use a server "
        "and model that return logprobs (vLLM, SGLang, OpenAI)")
    assert reasons[paths[2]] == head + ("'undecided': neither yes nor no among the top 2 first "
                                        "answer tokens ('Maybe' -0.10, 'Perhaps' -2.50)")
    assert reasons[paths[3]] == head + "'server-error': after 3 attempts: the server answered HTTP 500"
    assert reasons[paths[4]].startswith(head + "'refused': the server refused the request: HTTP 400")
    assert "image too large" in reasons[paths[4]]
    assert reasons[paths[5]] == head + ("'html': after 3 attempts: the server answered HTTP 200 with "
                                        "an HTML page, not OpenAI-format JSON: "
                                        "'<html><body>Bad gateway</body></html>'")
    for k in range(1, 6):
        assert run.scores[k] is None
    for k, p in ((0, "a cat"), (6, "a dark cat")):
        np.testing.assert_allclose(run.scores[k], [expected(images[k], p)], atol=1e-6, rtol=0)
    questions = [sent(b)[1] for b in server.requests]
    count = {word: sum(word in q for q in questions)
             for word in ("no-logprobs", "undecided", "server-error", "refused", "html")}
    # retried: errors that may pass; not retried: answers the server would give again
    assert count == {"no-logprobs": 1, "undecided": 1, "server-error": 3, "refused": 1, "html": 3}
    assert sorted(slept) == [0.5, 0.5, 1.0, 1.0]  # backoff 0.5, 1 for each of the two retried
    # Nothing cached for a failed image: the next run asks again for what failed, and only that
    # ("a cat" of image 1 was answered and kept; "undecided" was an answer: kept too).
    server.requests.clear()
    again = score_images(make(server, tmp_path), paths, prompts, cache=cache, batch_size=8)
    assert set(again.failed) == set(paths[1:6]) and again.cached == 2
    asked = sorted(sent(b)[1] for b in server.requests)
    assert [q.split('"')[1] for q in asked] == sorted(
        ["no-logprobs"] + ["server-error"] * 3 + ["refused"] + ["html"] * 3)


def test_retry_after_is_honoured(server, slept, tmp_path):
    server.script += [Reply(429, '{"error": {"message": "slow down"}}', {"Retry-After": "7"}),
                      Reply(503, "busy", {"retry-after-ms": "1500"}, "text/plain")]
    model = make(server, tmp_path, concurrency=1)
    image = pictures(1)[0]
    np.testing.assert_allclose(score_one(model, image, ["a cat"]), [expected(image, "a cat")], atol=1e-6)
    assert slept == [7.0, 1.5] and model.requests == 3


def test_retry_after_beyond_max_wait_fails_at_once(server, slept, tmp_path):
    server.script += [Reply(429, "{}", {"Retry-After": "3600"})]
    out = score_one(make(server, tmp_path, concurrency=1), pictures(1)[0], ["a cat"])
    assert isinstance(out, ImageFailure) and slept == [] and len(server.requests) == 1
    assert out.reason.endswith(
        "'a cat': it answered HTTP 429 asking to retry after 3600 s, more than max_wait=60 s: run "
        "again later (answers already received are cached), or raise the vlm_judge option max_wait")


def test_backoff_doubles_bounded_by_max_wait(server, slept, tmp_path):
    server.fail_next = 4
    model = make(server, tmp_path, backoff=1.0, max_wait=3.0, max_retries=4, concurrency=1)
    image = pictures(1)[0]
    np.testing.assert_allclose(score_one(model, image, ["a cat"]), [expected(image, "a cat")], atol=1e-6)
    assert slept == [1.0, 2.0, 3.0, 3.0]


def test_timeouts_truncated_bodies_and_unreachable_servers(server, slept, tmp_path):
    image = pictures(1)[0]
    server.delay = 1.0
    out = score_one(make(server, tmp_path, timeout=0.2, max_retries=1), image, ["a cat"])
    assert out.reason.endswith("'a cat': after 2 attempts: the server timed out after 0.2 s "
                               "(vlm_judge option timeout)")
    server.delay = 0.0
    body = json.dumps(logprob_completion([("Yes", -0.1), ("No", -2.0)]))
    server.script += [Reply(200, body, sent=len(body) // 2)] * 2
    out = score_one(make(server, tmp_path, max_retries=1), image, ["a cat"])
    assert "after 2 attempts: the server is unreachable or broke the connection" in out.reason
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = score_one(make(server, tmp_path, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0),
                    image, ["a cat"])
    assert out.reason.startswith(f"judge http://127.0.0.1:{port}/v1 (model judge-model) gave no "
                                 "yes/no answer for prompt 'a cat': after 1 attempts: the server "
                                 "is unreachable or broke the connection (ConnectError")


def test_a_rejected_key_or_an_unknown_model_stops_the_run(server, tmp_path):
    server.respond = lambda body: Reply(401, '{"error": {"message": "Incorrect API key"}}')
    with pytest.raises(HarnessError, match=r"^the judge server .* rejected the API key in "
                                           r"\$OPENAI_API_KEY: .*Incorrect API key"):
        score_one(make(server, tmp_path), pictures(1)[0], ["a cat", "a dog"])
    server.respond = lambda body: Reply(404, '{"error": {"message": "The model does not exist"}}')
    with pytest.raises(HarnessError, match=r"has no model 'judge-model' \(or no chat-completions "
                                           r"endpoint\): .*does not exist"):
        score_one(make(server, tmp_path), pictures(1)[0], ["a cat"])


def test_finetuning_reward_stops_on_a_failed_image(server, tmp_path):
    from harness.finetune.reward import RewardFunction

    reward = RewardFunction(f"vlm_judge:base_url={server.url},model=m,cache=false,max_retries=0",
                            contrastive=None)
    images = pictures(2)
    np.testing.assert_allclose(reward(images, ["a cat", "a dark cat"]),
                               [expected(images[0], "a cat"), expected(images[1], "a dark cat")],
                               atol=1e-6)
    with pytest.raises(HarnessError, match=r"^reward model 'vlm_judge\[.*\]' could not score image 1 of "
                                           r"the batch against 'undecided': judge .* neither yes"):
        reward(images, ["a cat", "undecided"])


# -- concurrency and caches -----------------------------------------------------------------------
def test_requests_run_concurrency_at_a_time(server, tmp_path):
    server.delay = 0.3
    images = pictures(4)
    prompts = [["a cat", "a dog"]] * 4
    model = make(server, tmp_path, concurrency=4, cache=False)
    model.score(model.embed_images([model.preprocess(im) for im in images]), prompts)
    assert server.max_active == 4 and len(server.requests) == 8
    server.max_active = 0
    model = make(server, tmp_path, concurrency=1, cache=False)
    model.score(model.embed_images([model.preprocess(im) for im in images[:1]]), prompts[:1])
    assert server.max_active == 1


def test_answer_cache_keyed_on_server_model_template_and_top_logprobs(servers, server, tmp_path):
    image, other_server = pictures(1)[0], servers[1]
    first = score_one(make(server, tmp_path), image, ["a cat", "a dark cat"])
    assert len(server.requests) == 2
    again = make(server, tmp_path)  # a new instance on the same cache file
    np.testing.assert_array_equal(score_one(again, image, ["a cat", "a dark cat"]), first)
    assert len(server.requests) == 2 and again.requests == 0 and again.cache_hits == 2
    score_one(make(server, tmp_path, base_url=server.url + "/"), image, ["a cat"])  # same server
    assert len(server.requests) == 2
    score_one(make(other_server, tmp_path), image, ["a cat"])
    assert len(other_server.requests) == 1
    for change in ({"model": "other"}, {"template": "Is it {prompt}?"}, {"top_logprobs": 5}):
        before = len(server.requests)
        score_one(make(server, tmp_path, **change), image, ["a cat"])
        assert len(server.requests) == before + 1, change
    other_image = pictures(2)[1]
    score_one(make(server, tmp_path), other_image, ["a cat"])
    assert len(server.requests) == 6


def test_score_cache_key_ignores_runtime_options_only(server, tmp_path):
    def key(text):
        spec = parse_model_spec(f"vlm_judge:base_url={server.url},cache={tmp_path / 'a.sqlite'}{text}")
        return model_cache_key(load_reward_model(spec, device="cpu"), spec)

    base = key("")
    for runtime in (",concurrency=2", ",timeout=5", ",max_retries=0", ",backoff=2", ",max_wait=1",
                    ",api_key_env=OPENAI_API_KEY", ",dtype=float16"):
        assert key(runtime) == base, runtime
    for option in (",model=other", ",template=Is it {prompt}?", ",top_logprobs=5"):
        assert key(option) != base, option
    assert key(",checkpoint=Qwen/Qwen2.5-VL-7B-Instruct") == base


# -- settings -------------------------------------------------------------------------------------
def test_settings_errors(server, tmp_path, monkeypatch):
    bad = [({"template": "Is this a cat?"}, "vlm_judge option template must contain {prompt} "
                                            "(where the prompt goes), got 'Is this a cat?'"),
           ({"concurrency": 0}, "vlm_judge option concurrency must be a whole number >= 1, got 0"),
           ({"top_logprobs": 0}, "vlm_judge option top_logprobs must be a whole number >= 1, got 0"),
           ({"timeout": 0}, "vlm_judge option timeout must be a number of seconds >= 0.001, got 0"),
           ({"base_url": "localhost:8000"}, "vlm_judge option base_url must be an http:// or "
                                            "https:// URL of an OpenAI-compatible server (e.g. "
                                            "http://localhost:8000/v1), got 'localhost:8000'"),
           ({"checkpoint": "a", "model": "b"}, "vlm_judge options checkpoint='a' and model='b' "
                                               "both name the served model: give one"),
           ({"api_key_env": "NO_SUCH_KEY_VAR"}, f"no API key for the judge server {server.url}: "
                                                "set $NO_SUCH_KEY_VAR (any non-empty value for a "
                                                "server without authentication), or name another "
                                                "variable with the vlm_judge option api_key_env")]
    for options, message in bad:
        with pytest.raises(HarnessError) as info:
            make(server, tmp_path, **options)
        assert str(info.value) == message
    with pytest.raises(HarnessError, match=r"reward model 'vlm_judge' has no option 'temperature'"):
        load_reward_model("vlm_judge:temperature=0")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(HarnessError, match=r"^vlm_judge answer cache .* is a folder, not a file: "
                                           r"give vlm_judge the option cache=ANOTHER.sqlite"):
        make(server, tmp_path, cache=folder)
    model = load_reward_model(f"vlm_judge:base_url={server.url},checkpoint=served,cache=false")
    assert (model.model, model.base_url, model.files(), model.dtype) == ("served", server.url, [], None)
    assert os.environ["OPENAI_API_KEY"] == model.api_key


@pytest.mark.slow
def test_failures_through_ray_actors(server, tmp_path):
    ray = pytest.importorskip("ray")
    from harness.scoring.ray import RayExecutor, RayOptions

    images = pictures(4)
    paths = save(images, tmp_path / "images")
    prompts = [["a cat"], ["undecided"], ["a dark cat"], ["a cat", "no-logprobs"]]
    spec = parse_model_spec(f"vlm_judge:base_url={server.url},model=m,cache=false")
    ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        options = RayOptions(actors=1, gpus_per_actor=0,
                             runtime_env={"env_vars": {"OPENAI_API_KEY": "test"}})
        run = score_images(load_reward_model(spec, device="cpu"), paths, prompts, spec=spec,
                           batch_size=4, executor=RayExecutor(options))
    finally:
        ray.shutdown()
    assert set(run.failed) == {paths[1], paths[3]}
    assert "neither yes nor no" in run.failed[paths[1]]
    assert "no log-probabilities" in run.failed[paths[3]]
    for k, p in ((0, "a cat"), (2, "a dark cat")):
        np.testing.assert_allclose(run.scores[k], [expected(images[k], p)], atol=1e-6, rtol=0)


# -- a real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_logprobs_from_smollm2_flow_end_to_end(tmp_path):
    import torch

    server = ChatServer()
    try:
        model = make(server, tmp_path, model="smollm2", concurrency=2)
        images, prompts = pictures(2), ["a cat sitting on a mat", "a red apple"]
        scores = [score_one(model, im, prompts) for im in images]
        lm, tokenizer = server.model, server.tokenizer
        for k, prompt in enumerate(prompts):
            # Independently of the server's generate(): one forward pass, the 20 likeliest first
            # tokens, and the rule of the module docs written out again.
            question = f'Does this figure show "{prompt}"? Please answer yes or no.'
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(lm(ids).logits[0, -1].double(), dim=-1)
            values, index = logprobs.topk(20)
            words = [tokenizer.decode([int(t)]).strip().lower() for t in index]
            p_yes = sum(math.exp(v) for w, v in zip(words, values.tolist(), strict=True) if w == "yes")
            p_no = sum(math.exp(v) for w, v in zip(words, values.tolist(), strict=True) if w == "no")
            assert p_yes > 0 and p_no > 0, words  # both answers among the real top 20
            want = p_yes / (p_yes + p_no)
            # The server's generate() reaches the same logits by another float32 path (a KV
            # cache): they agree to about 1e-6.
            for s in scores:  # the model reads no image: both images get the same answer
                assert s[k] == pytest.approx(want, abs=1e-5)
            assert 0 < want < 1
        answer = server.requests[0]
        assert answer["logprobs"] is True and answer["top_logprobs"] == 20
    finally:
        server.close()
