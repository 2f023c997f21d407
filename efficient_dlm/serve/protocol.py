"""The OpenAI request and response formats of /v1/completions and /v1/chat/completions.

Requests are checked field by field here (not by a pydantic model) so that every mistake is one
OpenAI-style error naming its field: wrong types, non-finite numbers, unsupported features (n > 1,
logprobs, echo, best_of, penalties, logit_bias) are refused, never ignored. Unknown fields are
ignored, as OpenAI-compatible servers do. Extension fields: strategy (must be the served one),
threshold, factor, entropy_bound (the dLM decoding knobs, docs/METHOD.md section 6).
"""
from __future__ import annotations

import math
import secrets
import time
import uuid

from efficient_dlm.serve.engine import RequestError

MAX_STOP_STRINGS = 4


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value):
        raise RequestError(f"{name} must be finite, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    if _integer(body, "n", 1) != 1:
        raise RequestError("n must be 1 (one completion per request)", "n")
    if _integer(body, "best_of", 1) != 1:
        raise RequestError("best_of is not supported", "best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError("logprobs are not supported by this server", "logprobs")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise RequestError(f"{name} is not supported (must be 0)", name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop holds at most {MAX_STOP_STRINGS} strings", "stop")
    return stops


def settings(body: dict, engine) -> dict:
    """The engine settings of a request (decoding knobs, seed, stop ids) from its fields and the engine's defaults."""
    _refuse_unsupported(body)
    strategy = body.get("strategy")
    if strategy is not None and strategy != engine.strategy:
        raise RequestError(f"strategy {strategy!r} is not served here; this server decodes with {engine.strategy!r}",
                           "strategy")
    d = engine.defaults
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise RequestError(f"seed must be in [0, 2**32), got {seed}", "seed")
    return {
        "threshold": _number(body, "threshold", d["threshold"]), "factor": _number(body, "factor", d["factor"]),
        "entropy_bound": _number(body, "entropy_bound", d["entropy_bound"]),
        "temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", 1.0),
        "seed": secrets.randbits(32) if seed is None else seed, "stop_ids": d["stop_ids"],
    }


def common(body: dict, engine) -> tuple[int, dict, list[str], bool]:
    """(max_tokens, settings, stop strings, stream) of either endpoint."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    max_tokens = _integer(body, "max_completion_tokens", None)
    max_tokens = _integer(body, "max_tokens", 16 if max_tokens is None else max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return max_tokens, settings(body, engine), _stops(body), stream


def completion_prompt(body: dict, texts) -> list[int]:
    """/v1/completions: prompt as a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return texts.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with string role and content", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Responder:
    """Builds the response objects of one request (completion or chat, whole or streamed)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage}
