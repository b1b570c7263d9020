"""A vision-language model behind any OpenAI-compatible server, asked a yes/no question, as a
reward model.

Each (image, prompt) pair is one chat-completions request to ``base_url`` (vLLM, SGLang, a hosted
API): one user message holding the image, as a base64 PNG data URL, then the question
``template`` with ``{prompt}`` replaced by the prompt (default, VQAScore's question: ``Does this
figure show "{prompt}"? Please answer yes or no.``), sent with ``max_tokens=1``,
``temperature=0``, ``logprobs=true`` and ``top_logprobs=N``. Images are sent as RGB, transparent
ones composited onto white (:func:`harness.types.to_rgb`, as transformers' processors do, and as
vLLM converts RGBA), so every server sees the same pixels.

Score, in [0, 1]: ``P(yes) / (P(yes) + P(no))`` at the first answer token, where ``P(yes)`` is the
sum of ``exp(logprob)`` over the entries of that token's ``top_logprobs`` whose text, with
surrounding whitespace, a leading SentencePiece ``▁`` or byte-level BPE ``Ġ`` marker and
trailing ``.``, ``,`` or ``!`` removed, is ``yes`` ignoring case (``Yes``, `` yes``, ``YES``,
``▁Yes``, ``Yes.``; one entry per distinct token); ``P(no)`` likewise for ``no``. A word absent
from the top ``N`` counts 0, so an answer listing only yes-variants scores 1 and only no-variants
0. The ratio is computed relative to the largest listed probability, so log-probabilities far
below zero neither underflow nor divide by zero.

Failures are never scores: an answer without log-probabilities, one whose top ``N`` first tokens
hold neither yes nor no, an answer that is not OpenAI-format JSON, timeouts, refused connections
and HTTP errors still failing after ``max_retries`` retries make the image a
:class:`harness.types.ImageFailure` (listed in ``ScoreRun.failed`` with the reason; the score
cache keeps nothing for it, so a later run tries it again). Answers without log-probabilities or without yes/no and refusals of the request
(HTTP 400, 413, 422, ...) are not retried: the server would answer the same. A rejected API key
(401, 403) or an unknown model (404) stops the run with one line, since every image would fail.

Requests run ``concurrency`` at a time (a thread pool), so give ``harness score`` a batch size of
at least ``concurrency`` images. Timeouts, connection errors, answers that are not
chat completions, HTTP 408, 409, 429 and 5xx are retried with exponential backoff (``backoff``
seconds, doubling, at most ``max_wait``); an error answer carrying ``Retry-After`` (or
``retry-after-ms``) is retried after exactly that wait, and one asking for more than
``max_wait`` fails the image at once (a spent quota would fail the next attempts too).

Every answer's top log-probabilities are cached on disk (an SQLite file, ``cache``; default
``<cache>/vlm_judge.sqlite``) keyed by base URL, model, question template, ``top_logprobs``, the
sha256 of the image's RGB pixels and the prompt, so a pair is never asked twice, answers received
before a failure survive it, and two servers serving models of the same name never share
answers. An answer holding neither yes nor no is kept too (asked again at temperature 0 it would
come back the same); failed requests are not. The score cache keys on the same settings (they
are spec options). A server restarted with other weights under the same model name would get
the old answers from both caches: serve them under another name, or pass ``cache=false`` and
``--no-cache``.

Options: ``model`` (the served model name; ``checkpoint`` is the same option under the
harness's generic name), ``base_url`` (default ``http://localhost:8000/v1``, where
``vllm serve`` listens), ``api_key_env`` (the environment variable holding the key, default
``OPENAI_API_KEY``; any non-empty value for a server without authentication), ``template``,
``top_logprobs`` (default 20, the most OpenAI and vLLM's default ``--max-logprobs`` allow),
``concurrency``, ``timeout``, ``max_retries``, ``backoff``, ``max_wait``, ``cache``. ``device`` and
``dtype`` are accepted and ignored: the server runs the model.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.scoring.cache import SQLiteCache
from harness.types import ImageFailure, ModelCard, RewardModel, to_rgb
from harness_plugins import openai_http
from harness_plugins.openai_http import BadReply

log = logging.getLogger("harness.vlm_judge")
# Indirections so tests can fake waiting and the clock without touching the time module.
_sleep = time.sleep
_now = time.time

QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
DEFAULT_URL = "http://localhost:8000/v1"
#: How the question is put (message layout, image encoding, request parameters): keys the cache.
PROTOCOL_VERSION = "1"
#: Statuses worth asking again: the server may answer otherwise a moment later.
RETRIED_STATUSES = frozenset({408, 409, 429})


class NoAnswer(Exception):
    """A well-formed answer with no usable yes/no in it; asking again would give the same."""


# -- reading the answer ---------------------------------------------------------------------------
def answer_word(token: str) -> str:
    """A token's text as compared with ``yes`` and ``no``: surrounding whitespace, a leading
    SentencePiece ``▁`` or byte-level BPE ``Ġ`` marker and trailing ``.``, ``,``, ``!`` removed,
    lower-cased."""
    return token.strip().lstrip("▁Ġ").strip().rstrip(".,!").lower()


def yes_probability(top: Sequence[tuple[str, float]]) -> float | None:
    """``P(yes) / (P(yes) + P(no))`` over ``(token, logprob)`` pairs (see the module docs), or
    None when no entry is a yes or a no with a finite log-probability."""
    yes = [lp for token, lp in top if answer_word(token) == "yes"]
    no = [lp for token, lp in top if answer_word(token) == "no"]
    finite = [lp for lp in yes + no if math.isfinite(lp)]
    if not finite:
        return None
    peak = max(finite)  # the largest term becomes exp(0) = 1: no underflow, no 0 / 0
    p_yes = sum(math.exp(lp - peak) for lp in yes if math.isfinite(lp))
    p_no = sum(math.exp(lp - peak) for lp in no if math.isfinite(lp))
    return p_yes / (p_yes + p_no)


def first_token_logprobs(body: str) -> list[tuple[str, float]]:
    """``(token, logprob)`` of the first answer token's ``top_logprobs`` in a chat-completions
    answer body; :class:`BadReply` when it is not a chat completion, :class:`NoAnswer` when it
    carries no log-probabilities."""
    choice = openai_http.first_choice(body)
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        raise NoAnswer("the answer carries no log-probabilities (no choices[0].logprobs.content): "
                       "use a server and model that return logprobs (vLLM, SGLang, OpenAI)")
    top = content[0].get("top_logprobs")
    if not isinstance(top, list) or not top:
        raise NoAnswer("the answer's first token has no top_logprobs: use a server that returns "
                       "them (vLLM needs --max-logprobs >= top_logprobs)")
    pairs = []
    for entry in top:
        token = entry.get("token") if isinstance(entry, dict) else None
        value = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or isinstance(value, bool) or not isinstance(value, int | float) \
                or math.isnan(value):
            raise BadReply(f"a top_logprobs entry without a token and a logprob: {entry!r:.80}")
        pairs.append((token, float(value)))
    return pairs


def _listing(top: Sequence[tuple[str, float]], n: int = 5) -> str:
    return ", ".join(f"{token!r} {lp:.2f}" for token, lp in top[:n])


# -- images ---------------------------------------------------------------------------------------
def rgb_image(image: Any) -> Any:
    """One image as opened -> a plain RGB ``PIL.Image`` (transparency composited onto white)."""
    rgb = to_rgb(image)
    return rgb.copy() if rgb is image else rgb  # a plain Image pickles to data-loader workers


@dataclass(frozen=True)
class EncodedImage:
    """What is sent: ``url`` (a ``data:image/png;base64,...`` URL) and ``sha256`` (of the RGB
    pixels and size: the answer cache's image key)."""

    url: str
    sha256: str


def encode_image(image: Any) -> EncodedImage:
    """A PIL RGB image, or a ``[H, W, 3]`` array of 0-255 values (what Ray actors receive)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        pixels = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    digest = hashlib.sha256(f"RGB {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return EncodedImage(url, digest.hexdigest())


# -- the answer cache -----------------------------------------------------------------------------
class AnswerCache(SQLiteCache):
    """SQLite cache of the judge's answers: key -> the first token's top log-probabilities."""

    what = "vlm_judge answer cache"
    table = "answers"
    create = "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, prompt TEXT, value TEXT)"
    columns = (("key", "TEXT", 1), ("prompt", "TEXT", 0), ("value", "TEXT", 0))
    version = 1
    fix = "give vlm_judge the option cache=ANOTHER.sqlite, or cache=false"

    def get_many(self, keys: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
        out: dict[str, list[tuple[str, float]]] = {}
        unique = list(dict.fromkeys(keys))
        for lo in range(0, len(unique), 500):
            chunk = unique[lo:lo + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self.read(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk):
                out[key] = [(str(t), float(lp)) for t, lp in json.loads(value)]
        return out

    def put(self, key: str, prompt: str, top: Sequence[tuple[str, float]]) -> None:
        doing = f" while storing the answer for {prompt!r} (answers stored before are kept)"
        with self.transaction(doing) as conn:
            conn.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                         (key, prompt, json.dumps([list(pair) for pair in top])))


# -- the reward model -----------------------------------------------------------------------------
class VLMJudge(RewardModel):
    """P(yes) in [0, 1] of a VLM on an OpenAI-compatible server asked if the image shows the prompt.

    See the module docs for the exact rule, the failures and the options."""

    id: ClassVar[str] = "vlm_judge"
    default_checkpoint: ClassVar[str] = "Qwen/Qwen2.5-VL-7B-Instruct"
    preprocessing_version: ClassVar[str] = "1"
    runtime_options: ClassVar[frozenset[str]] = RewardModel.runtime_options | frozenset(
        {"api_key_env", "concurrency", "timeout", "max_retries", "backoff", "max_wait", "cache"})
    score_is_probability: ClassVar[bool] = True
    card: ClassVar[ModelCard] = ModelCard(
        checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",  # the served model's name; the server pins weights
        license="Apache-2.0 (Qwen2.5-VL-7B-Instruct); a hosted model: its provider's terms",
        score_range="[0, 1]",
        meaning="P(yes) / (P(yes) + P(no)) of the first answer token to 'Does this figure show "
                "\"{prompt}\"? Please answer yes or no.', from the server's top log-probabilities",
        paper="question as in VQAScore: Lin et al., Evaluating Text-to-Visual Generation with "
              "Image-to-Text Generation, ECCV 2024",
        source="any OpenAI-compatible chat-completions server returning logprobs (vLLM, SGLang, "
               "a hosted API) serving the model; no weights are loaded here",
        variants={"Qwen/Qwen2.5-VL-72B-Instruct": "Qwen/Qwen2.5-VL-72B-Instruct",
                  "gpt-4o-mini": "gpt-4o-mini (base_url=https://api.openai.com/v1)"},
    )

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        model: str | None = None,
        base_url: str = DEFAULT_URL,
        api_key_env: str = "OPENAI_API_KEY",
        template: str = QUESTION,
        top_logprobs: int = 20,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_wait: float = 60.0,
        cache: str | Path | bool | None = True,
    ):
        openai_http.check_settings("vlm_judge", (
            ("top_logprobs", top_logprobs, 1, True), ("concurrency", concurrency, 1, True),
            ("max_retries", max_retries, 0, True), ("timeout", timeout, 1e-3, False),
            ("backoff", backoff, 0, False), ("max_wait", max_wait, 0, False),
        ))
        if checkpoint and model and checkpoint != model:
            raise HarnessError(f"vlm_judge options checkpoint={checkpoint!r} and model={model!r} both "
                               "name the served model: give one")
        served = model or checkpoint or self.default_checkpoint
        if not isinstance(served, str) or not served.strip():
            raise HarnessError(f"vlm_judge option model must name the served model, got {served!r}")
        if not isinstance(template, str) or "{prompt}" not in template:
            raise HarnessError(f"vlm_judge option template must contain {{prompt}} (where the "
                               f"prompt goes), got {template!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise HarnessError(f"vlm_judge option base_url must be an http:// or https:// URL of "
                               f"an OpenAI-compatible server (e.g. {DEFAULT_URL}), got {base_url!r}")
        # The key is read here, never taken as an option: specs and manifests are written down.
        self.api_key = os.environ.get(str(api_key_env)) or ""
        if not self.api_key:
            raise HarnessError(
                f"no API key for the judge server {base_url}: set ${api_key_env} (any non-empty "
                "value for a server without authentication), or name another variable with the "
                "vlm_judge option api_key_env"
            )
        super().__init__(served, device, dtype)
        self.dtype = None  # the server runs the model: the local dtype changes no number
        self.model = served
        self.base_url = base_url.rstrip("/")  # one server, one cache key, with or without it
        self.api_key_env = api_key_env
        self.template = template
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_wait = backoff, max_wait
        if cache is True:
            from harness.io import cache_dir

            cache = cache_dir() / "vlm_judge.sqlite"
        self.cache_path = Path(cache).expanduser() if cache else None
        self._caches: dict[int, AnswerCache] = {}  # SQLite connections belong to one thread
        if self.cache_path is not None:
            self._cache()  # a cache that cannot be used fails now, not after the first answers
        self._client = None
        self._lock = threading.Lock()
        self.requests = 0  #: chat-completion requests sent (cache hits send none)
        self.cache_hits = 0  #: pairs answered from the answer cache

    # -- the contract ---------------------------------------------------------------------------
    def preprocess(self, image: Any) -> Any:
        """One image as opened -> a plain RGB ``PIL.Image`` (encoded by :meth:`embed_images`)."""
        return rgb_image(image)

    def preprocessor(self) -> Any:
        return rgb_image  # self holds a client and a database connection: not picklable

    def embed_images(self, batch: Any) -> list[EncodedImage]:
        """``B`` RGB images (a list, or a ``[B, H, W, 3]`` array) -> ``B`` encoded images, PNG
        encoded on ``concurrency`` threads."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(encode_image, list(batch)))

    def score(self, features: Sequence[EncodedImage], prompts: Sequence[Sequence[str]]
              ) -> list[np.ndarray | ImageFailure]:
        """``B`` encoded images and their prompt lists -> ``B`` float32 arrays of P(yes), or an
        :class:`~harness.types.ImageFailure` for an image with any prompt left unanswered."""
        pairs = [(i, prompt) for i, ps in enumerate(prompts) for prompt in ps]
        keys = [self.cache_key(features[i], prompt) for i, prompt in pairs]
        cache = self._cache()
        found = cache.get_many(keys) if cache is not None else {}
        with self._lock:
            self.cache_hits += sum(key in found for key in keys)
        answers: dict[int, list[tuple[str, float]]] = {}
        problems: dict[int, str] = {}
        todo = [k for k, key in enumerate(keys) if key not in found]
        if todo:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                futures: dict[Future, int] = {
                    pool.submit(self._ask_with_retries, features[pairs[k][0]], pairs[k][1]): k
                    for k in todo}
                for future in as_completed(futures):  # stored as they come: a kill loses little
                    k = futures[future]
                    try:
                        top = future.result()
                    except HarnessError:  # every image would fail alike: stop the run
                        for other in futures:
                            other.cancel()
                        raise
                    except (NoAnswer, _Failed) as exc:
                        problems[k] = str(exc)
                        continue
                    answers[k] = top
                    if cache is not None:
                        cache.put(keys[k], pairs[k][1], top)
        out: list[np.ndarray | ImageFailure] = []
        start = 0
        for ps in prompts:
            values = np.empty(len(ps), dtype=np.float32)
            failed: list[str] = []
            for j in range(len(ps)):
                k = start + j
                top = found.get(keys[k]) if k not in answers else answers[k]
                p = None if top is None else yes_probability(top)
                if p is None and k not in problems:
                    problems[k] = (f"neither yes nor no among the top {len(top or ())} first "
                                   f"answer tokens ({_listing(top or [])})")
                if k in problems:
                    failed.append(f"prompt {ps[j]!r}: {problems[k]}")
                else:
                    values[j] = p
            start += len(ps)
            if failed:
                more = "" if len(failed) == 1 else f" (and {len(failed) - 1} more of its {len(ps)} prompts)"
                out.append(ImageFailure(f"judge {self.base_url} (model {self.model}) gave no "
                                        f"yes/no answer for {failed[0]}{more}"))
            else:
                out.append(values)
        return out

    def files(self) -> list[Path]:
        return []  # nothing is loaded here: the server holds the weights

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "checkpoint": self.model, "base_url": self.base_url,
                "template": self.template, "top_logprobs": self.top_logprobs,
                "protocol_version": PROTOCOL_VERSION,
                "preprocessing_version": self.preprocessing_version}

    # -- requests ------------------------------------------------------------------------------
    def cache_key(self, image: EncodedImage, prompt: str) -> str:
        ident = json.dumps([self.base_url, self.model, self.template, self.top_logprobs,
                            PROTOCOL_VERSION, image.sha256, prompt])
        return hashlib.sha256(ident.encode()).hexdigest()

    def question(self, prompt: str) -> str:
        return self.template.replace("{prompt}", prompt)

    def _cache(self) -> AnswerCache | None:
        if self.cache_path is None:
            return None
        thread = threading.get_ident()
        if thread not in self._caches:
            self._caches[thread] = AnswerCache(self.cache_path)
        return self._caches[thread]

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = openai_http.make_client(self.base_url, self.api_key, self.timeout)
            return self._client

    def _ask(self, image: EncodedImage, prompt: str) -> list[tuple[str, float]]:
        """One request: the first token's top log-probabilities, or the client's exceptions,
        :class:`BadReply` or :class:`NoAnswer`."""
        import openai

        with self._lock:
            self.requests += 1
        try:
            # The raw answer: the client would hand back an HTML page as a string, or fail on
            # truncated JSON with a traceback; first_token_logprobs checks it instead.
            reply = self.client().chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image.url}},
                    {"type": "text", "text": self.question(prompt)},
                ]}],
                max_tokens=1,
                temperature=0.0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise HarnessError(f"the judge server {self.base_url} rejected the API key in "
                               f"${self.api_key_env}: {exc.message}") from exc
        except openai.NotFoundError as exc:
            raise HarnessError(f"the judge server {self.base_url} has no model '{self.model}' (or "
                               f"no chat-completions endpoint): {exc.message}") from exc
        return first_token_logprobs(reply.text)  # read whole: a body cut off is a connection error

    def _ask_with_retries(self, image: EncodedImage, prompt: str) -> list[tuple[str, float]]:
        """The answer to one pair, asked up to ``max_retries + 1`` times; :class:`_Failed` or
        :class:`NoAnswer` say why there is none, :class:`HarnessError` stops the run."""
        import openai

        attempts = self.max_retries + 1
        problem = ""
        asked: float | None = None  # what the server asked to wait after the last failure
        for attempt in range(attempts):
            if attempt:
                backoff = min(self.backoff * 2 ** (attempt - 1), self.max_wait)
                _sleep(asked if asked is not None else backoff)
            asked = None
            try:
                return self._ask(image, prompt)
            except openai.APITimeoutError:
                problem = f"the server timed out after {self.timeout:g} s (vlm_judge option timeout)"
            except openai.APIConnectionError as exc:
                problem = openai_http.connection_problem(exc)
            except openai.APIStatusError as exc:
                status = exc.status_code
                said = " ".join(str(exc.message).split())[:200]
                if status not in RETRIED_STATUSES and status < 500:
                    raise _Failed(f"the server refused the request: HTTP {status} ({said})") from None
                problem = f"the server answered HTTP {status}"
                asked = openai_http.retry_after(exc.response.headers, _now())
                if asked is not None and asked > self.max_wait:
                    raise _Failed(
                        f"it answered HTTP {status} asking to retry after {asked:.0f} s, more than "
                        f"max_wait={self.max_wait:g} s: run again later (answers already received "
                        "are cached), or raise the vlm_judge option max_wait") from None
                if asked is not None:
                    problem += f", asking to retry after {asked:g} s"
            except BadReply as exc:
                problem = f"the server answered HTTP 200 with {exc}"
            log.warning("judge server %s (model %s), prompt %r: %s (attempt %d of %d)",
                        self.base_url, self.model, prompt, problem, attempt + 1, attempts)
        raise _Failed(f"after {attempts} attempts: {problem}")


class _Failed(Exception):
    """No answer for one pair after the retries (or a refusal not worth retrying)."""


@hookimpl
def register_reward_models(register):
    register(VLMJudge)
