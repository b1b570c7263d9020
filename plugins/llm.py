"""LLM-written contrastive prompts, in the manner of the TextNorm paper's Algorithm 1.

An instruction asks a chat model for ``n`` prompts that each differ from the input prompt in
exactly one semantic detail (an object, a count, an attribute, a spatial relation, text in the
image). Any OpenAI-compatible server works (OpenAI, vLLM, llama.cpp, Ollama, ...): ``base_url``
and ``model`` are settings; the key comes from ``api_key`` or ``OPENAI_API_KEY``.

The reply must be JSON (``{"prompts": [...]}``; a bare list, code fences and text around the JSON
are tolerated). Invalid replies, server errors and timeouts are retried with exponential backoff;
duplicates (ignoring case, spacing and final punctuation) and copies of the input are removed.
Results are cached on disk keyed by server model, instruction version, prompt, n, temperature and
seed, so a prompt set is never requested twice and sets already generated survive a later
failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from harness.errors import HarnessError
from harness.hookspecs import hookimpl
from harness.types import PromptSetGenerator

log = logging.getLogger("harness.llm")

INSTRUCTION_VERSION = "1"
SYSTEM_PROMPT = (
    "You write prompts for testing whether a text-to-image model follows its prompt. "
    "You answer with JSON only."
)
INSTRUCTION = """Write {n} new image prompts that each differ from the prompt below in exactly ONE \
semantic detail, so that an image matching one of them would NOT match the original.
Change one of: an object (replace it with a different object), a count (a different number), an \
attribute (colour, size, material, shape), a spatial relation or action, or text shown in the image.
Keep everything else the same, keep the same style of wording, and make every prompt different.

Example. For the prompt "a photo of two dogs on a sofa", good answers are:
{{"prompts": ["a photo of three dogs on a sofa", "a photo of two cats on a sofa", \
"a photo of two dogs under a sofa", "a photo of two black dogs on a sofa"]}}

Prompt: "{prompt}"

Answer with JSON only: {{"prompts": [...]}} with {n} prompts."""


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!?")


_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_reply(content: str) -> list[str] | None:
    """Prompts from a model reply, or None when it holds no JSON list of strings.

    A reply cut off by the token limit (``{"prompts": ["a", "b", "c``) keeps its complete strings.
    """
    text = re.sub(r"```(?:json)?", "", content or "").strip()
    decoder = json.JSONDecoder()
    for start in [0] + [m.start() for m in re.finditer(r"[\[{]", text)]:
        try:
            value, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = value.get("prompts", next((v for v in value.values() if isinstance(v, list)), None))
        if isinstance(value, list):
            items = []
            for item in value:
                if isinstance(item, dict):
                    item = item.get("prompt") or item.get("text")
                if isinstance(item, str) and item.strip():
                    items.append(item.strip())
            if items:
                return items
    opened = re.search(r'"prompts"\s*:\s*\[', text) or re.match(r"\s*\[", text)
    if opened:
        tail = text[opened.end():]
        closed = [json.loads(f'"{m.group(1)}"') for m in _STRING.finditer(tail)
                  if tail[m.end():m.end() + 1] in {",", "]", ""} and tail[m.end():].strip()]
        closed = [c for c in closed if c.strip()]
        if closed:
            return closed
    return None


def clean(prompt: str, candidates: Sequence[str], n: int) -> list[str]:
    """Drop empty entries, copies of ``prompt`` and duplicates; keep at most ``n``, in order."""
    seen = {_normal(prompt)}
    out = []
    for c in candidates:
        key = _normal(c)
        if key and re.search(r"[a-z]", key) and key not in seen:  # drop placeholders like "..."
            seen.add(key)
            out.append(c.strip())
    return out[:n]


class PromptCache:
    """SQLite cache of generated prompt sets."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=60)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS sets (key TEXT PRIMARY KEY, prompt TEXT, value TEXT)")

    def get(self, key: str) -> list[str] | None:
        row = self.conn.execute("SELECT value FROM sets WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, prompt: str, value: list[str]) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO sets VALUES (?, ?, ?)", (key, prompt, json.dumps(value)))


class LLMPrompts(PromptSetGenerator):
    """Contrastive prompts written by a chat model behind an OpenAI-compatible API."""

    id: ClassVar[str] = "llm"

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str | None = None,
        api_key: str | None = None,
        n: int = 8,
        temperature: float = 0.7,
        seed: int = 0,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 512,
        min_prompts: int = 1,
        cache: str | Path | None | bool = True,
    ):
        if n < 1:
            raise HarnessError(f"n must be >= 1, got {n}")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not self.api_key:
            raise HarnessError(
                f"no API key for the LLM server {self.base_url}: set OPENAI_API_KEY or pass "
                "--api-key (any non-empty value for a server without authentication)"
            )
        self.n, self.temperature, self.seed = n, temperature, seed
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_tokens, self.min_prompts = max_tokens, min_prompts
        if cache is True:
            from harness.io import cache_dir

            cache = cache_dir() / "prompt_sets.sqlite"
        self.cache = PromptCache(Path(cache)) if cache else None
        self.requests = 0  #: chat-completion requests sent (cache hits send none)
        self._client = None

    def cache_key(self, prompt: str) -> str:
        ident = json.dumps([self.model, INSTRUCTION_VERSION, prompt, self.n, self.temperature, self.seed])
        return hashlib.sha256(ident.encode()).hexdigest()

    def client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key,
                                         timeout=self.timeout, max_retries=0)
        return self._client

    def _ask(self, prompt: str) -> str:
        import openai

        self.requests += 1
        try:
            reply = self.client().chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": INSTRUCTION.format(n=self.n, prompt=prompt)}],
                temperature=self.temperature,
                seed=self.seed,
                max_tokens=self.max_tokens,
                response_format={"type": "json_object"},
            )
        except openai.AuthenticationError as exc:
            raise HarnessError(f"the LLM server {self.base_url} rejected the API key: {exc.message}") from exc
        except openai.NotFoundError as exc:
            raise HarnessError(f"the LLM server {self.base_url} has no model '{self.model}' "
                               f"(or no chat-completions endpoint): {exc.message}") from exc
        return reply.choices[0].message.content or ""

    def contrast(self, prompt: str) -> list[str]:
        import openai

        if not prompt.strip():
            raise HarnessError("cannot write contrastive prompts for an empty prompt")
        key = self.cache_key(prompt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        found: list[str] = []
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                content = self._ask(prompt)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
                last_problem = f"the LLM server {self.base_url} {kind}"
                log.warning("%s (attempt %d of %d)", last_problem, attempt + 1, self.max_retries + 1)
                continue
            except openai.APIStatusError as exc:
                last_problem = f"the LLM server {self.base_url} answered HTTP {exc.status_code}"
                log.warning("%s (attempt %d of %d)", last_problem, attempt + 1, self.max_retries + 1)
                continue
            parsed = parse_reply(content)
            if parsed is None:
                snippet = content.strip().replace("\n", " ")[:80]
                last_problem = f"the LLM reply is not a JSON list of prompts: {snippet!r}"
                log.warning("%s (prompt %r, attempt %d)", last_problem, prompt, attempt + 1)
                continue
            found = clean(prompt, found + parsed, self.n)
            if len(found) >= self.n:
                break
            last_problem = f"only {len(found)} distinct prompts of {self.n}"
        if len(found) < self.min_prompts:
            raise HarnessError(
                f"no contrastive prompts for {prompt!r} from {self.base_url} (model {self.model}) "
                f"after {self.max_retries + 1} attempts: {last_problem}"
            )
        if len(found) < self.n:
            log.warning("prompt %r: %d distinct contrastive prompts of %d requested", prompt, len(found), self.n)
        if self.cache is not None:
            self.cache.put(key, prompt, found)
        return found

    def generate(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        return {p: self.contrast(p) for p in prompts}


@hookimpl
def register_prompt_generators(register):
    register(LLMPrompts)
