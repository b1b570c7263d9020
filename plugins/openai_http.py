"""What every client of an OpenAI-compatible chat-completions server here needs.

Shared by the ``llm`` prompt generator and the ``vlm_judge`` reward model: checking that a 200
answer really is an OpenAI-format chat completion (:func:`first_choice`, :func:`chat_content`),
reading how long an error answer asks to wait (:func:`retry_after`), naming a broken connection
(:func:`connection_problem`), checking numeric settings (:func:`check_settings`) and building the
client with the retries left to the caller (:func:`make_client`). No hooks: not a plugin.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Iterable, Mapping
from typing import Any

from harness.errors import HarnessError


class BadReply(Exception):
    """A 200 answer that is not an OpenAI-format chat completion; the message says why."""


def snippet(body: str) -> str:
    """The start of an answer body, on one line, quoted: for error messages."""
    return repr(" ".join(body.split())[:80])


def first_choice(body: str) -> dict[str, Any]:
    """``choices[0]`` of a chat-completions answer body, or :class:`BadReply` saying why not
    (an empty body, an HTML page, invalid or truncated JSON, JSON without choices)."""
    if not body.strip():
        raise BadReply("an empty body, not OpenAI-format JSON")
    if body.lstrip().startswith("<"):
        raise BadReply(f"an HTML page, not OpenAI-format JSON: {snippet(body)}")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise BadReply(f"invalid JSON ({exc}): {snippet(body)}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise BadReply(f"JSON without choices: {snippet(body)}")
    if not isinstance(choices[0], dict):
        raise BadReply(f"JSON without a text choices[0].message.content: {snippet(body)}")
    return choices[0]


def chat_content(body: str) -> str:
    """``choices[0].message.content`` of a chat-completions answer body, or :class:`BadReply`."""
    message = first_choice(body).get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise BadReply(f"JSON without a text choices[0].message.content: {snippet(body)}")
    return content


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds a server asks to wait (``retry-after-ms``, or ``Retry-After`` in seconds or as an
    HTTP date, counted from ``now``, a Unix time; a date in the past is 0), or None when it asks
    nothing readable."""
    try:
        return max(float(headers["retry-after-ms"]) / 1000, 0.0)
    except (KeyError, TypeError, ValueError):
        pass
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as RFC 5322 means it
        when = when.replace(tzinfo=datetime.UTC)
    return max(when.timestamp() - now, 0.0)


def connection_problem(exc: Exception) -> str:
    """What an ``openai.APIConnectionError`` means, with what httpx saw (refused, reset, a body
    cut off, ...)."""
    cause = exc.__cause__
    why = f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause else getattr(
        exc, "message", str(exc))
    return f"the server is unreachable or broke the connection ({why})"


def check_settings(owner: str, settings: Iterable[tuple[str, Any, float, bool]]) -> None:
    """``(name, value, lowest, whole)`` each: a whole number or a number of seconds >= lowest,
    else one line naming ``owner``'s option."""
    for name, value, low, whole in settings:
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not value >= low:
            want = "a whole number" if whole else "a number of seconds"
            raise HarnessError(f"{owner} option {name} must be {want} >= {low:g}, got {value!r}")


def make_client(base_url: str, api_key: str, timeout: float) -> Any:
    """An ``openai.OpenAI`` client that never retries by itself: the caller's loop does, so it
    honours Retry-After and names what went wrong."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
