"""The OpenAI chat-completions request, validated: every bad input is an ApiError with a 4xx status and a
message naming the field, rendered as OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`.

Supported: messages (system/developer, user, assistant; content a string or a list of text parts; an
assistant message may also use daychat's tool_call/tool_output parts, or show its calculator exchanges as
`[calculator: expr = result]`, which are read back as the tool calls they were), temperature, top_p, top_k
(an extension), max_tokens / max_completion_tokens, seed, stop, stream, stream_options.include_usage, n = 1.
Refused with a message: tools / functions (the calculator is built in), n > 1, logprobs, logit_bias,
penalties other than 0, a response_format other than text. Other fields (user, metadata, ...) are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from daychat.chat.display import parts_of_shown
from daychat.chat.format import ConversationError, normalize, render_prompt

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (documented in the README and `python -m daychat.serve --help`)."""

    max_messages: int = 256
    max_body_bytes: int = 1_000_000
    max_stop: int = 4  # as OpenAI
    max_stop_chars: int = 256
    max_temperature: float = 2.0  # as OpenAI


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    conversation: list[dict]
    prompt: list[int]  # the rendered prompt ids
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{key} must be a number, got {value!r}", key)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{key} must be in {interval}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{key} must be an integer, got {value!r}", key)
    if not low <= value <= high:
        raise bad(f"{key} must be between {low} and {high}, got {value}", key)
    return value


def _content(message: dict, i: int) -> str | list[dict]:
    role, content = message["role"], message.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return parts_of_shown(content) if role == "assistant" else content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of text parts, got {type(content).__name__}", where)
    allowed = ("text", "tool_call", "tool_output") if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(f"{where}[{j}] must be {{'type': one of {', '.join(allowed)}, 'text': str}}, got type "
                      f"{kind!r} (this model reads text only)", f"{where}[{j}]")
        parts.append({"type": part["type"], "text": part["text"]})
    if role != "assistant":
        return "".join(p["text"] for p in parts)
    return parts


def conversation_of(body: dict, limits: Limits) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("messages is required: a list of {role, content} messages", "messages")
    if not messages:
        raise bad("messages must hold at least one message", "messages")
    if len(messages) > limits.max_messages:
        raise bad(f"messages holds {len(messages)} messages; at most {limits.max_messages} are allowed", "messages")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role in ("tool", "function"):
            raise bad(f"messages[{i}].role {role!r} is not supported: this model's one tool, the calculator, "
                      "runs inside the server", f"messages[{i}].role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of system, user, assistant, got {role!r}", f"messages[{i}].role")
        role = "system" if role == "developer" else role
        conversation.append({"role": role, "content": _content({**message, "role": role}, i)})
    if conversation[-1]["role"] != "user":
        raise bad(f"the last message must be from the user, got {conversation[-1]['role']}", "messages")
    try:
        normalize(conversation, for_training=False)
    except ConversationError as e:
        raise bad(f"messages: {e}", "messages") from None
    return conversation


def parse_request(body: Any, *, tokenizer, context: int, limits: Limits) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError(400) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for key in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(key) not in (None, [], "none"):
            raise bad(f"{key} is not supported: the calculator is built in and runs inside the server", key)
    if body.get("n") not in (None, 1):
        raise bad(f"n must be 1 (one reply per request), got {body.get('n')!r}", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad(f"{key} is not supported (only 0)", key)
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise bad("response_format must be {'type': 'text'}: this model writes plain text", "response_format")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))

    conversation = conversation_of(body, limits)
    prompt = render_prompt(conversation, tokenizer)
    if len(prompt) >= context:
        raise bad(f"the conversation is {len(prompt)} tokens, and the model's context is {context} tokens "
                  "(the reply needs at least one more): shorten or drop earlier messages", "messages",
                  "context_length_exceeded")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, 1, context)
    temperature = _number(body, "temperature", DEFAULTS["temperature"], 0.0, limits.max_temperature)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, tokenizer.vocab_size)
    seed = _integer(body, "seed", 0, SEED_MAX)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise bad(f"stop takes at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters", "stop")
    return ChatRequest(conversation=conversation, prompt=prompt,
                       max_tokens=max_tokens if max_tokens is not None else context - len(prompt),
                       temperature=temperature, top_k=DEFAULTS["top_k"] if top_k is None else top_k, top_p=top_p,
                       seed=seed, stop=stops, stream=stream, include_usage=include_usage)


# When a request leaves them out: the chat CLI's defaults (sampling, but not far from greedy), not
# OpenAI's temperature 1, which a small model does not take well. top_k 0 = the whole vocabulary.
DEFAULTS = {"temperature": 0.6, "top_k": 50}
