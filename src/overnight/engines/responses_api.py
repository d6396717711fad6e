"""The Responses API (`/v1/responses`) on a chat engine: a request body mapped onto chat messages
and sampling parameters, and the chat engine's answer written back as a `response` object that the
SDK's `Response` model parses.

Only what a chat template can express is taken: text input (a string, or messages whose content is
a string or `input_text`/`output_text` parts), `instructions` (a system message), `max_output_tokens`,
`temperature`, `top_p` and `truncation` ("auto" drops the oldest input items until the rest fits
the context window, as OpenAI does). Whatever needs more (tools, images, files, stored conversations, reasoning
settings, structured output) is refused for that line with a 400 that names the parameter, rather
than silently answered as if it had not been asked for. Parameters that change nothing about the
answer (`metadata`, `store`, `user`, ...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

# Roles a chat template knows; `developer` is the newer name of `system`.
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Content parts that are plain text: the user's, and an earlier answer's (a conversation's history).
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# Refused when present and truthy: each needs something a chat template cannot give.
_UNSUPPORTED_TRUTHY = {
    "tools": "tools are not supported by the embedded engine.",
    "previous_response_id": "The embedded engine keeps no responses; send the whole conversation in 'input'.",
    "conversation": "The embedded engine keeps no conversations; send the whole conversation in 'input'.",
    "prompt": "Prompt templates are not supported by the embedded engine; send the text in 'input'.",
    "background": "background is not supported by the embedded engine.",
    "top_logprobs": "top_logprobs are not supported by the embedded engine.",
    "stream": "streaming is not supported in a batch.",
}
# Every parameter of a Responses request; any other is refused as OpenAI refuses it ("Unknown
# parameter"): a typo such as max_output_token ran without a limit.
_KNOWN = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "metadata", "store", "user",
    "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls", "previous_response_id", "conversation",
    "prompt", "background", "include", "top_logprobs", "stream", "stream_options", "reasoning", "text",
    "truncation", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
})
# `include` values that would ask the engine for something: the rest add fields to items it never makes.
_INCLUDE_NEEDING_LOGPROBS = "message.output_text.logprobs"
# Chat completions parameters that a Responses request does not take (OpenAI: "Unknown parameter").
_CHAT_ONLY = ("messages", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "presence_penalty",
              "frequency_penalty", "logit_bias", "logprobs", "response_format")
MIN_OUTPUT_TOKENS = 16  # OpenAI's minimum for max_output_tokens
# What a chat-side parameter is called in a Responses request, for the messages of chat-side checks.
RESPONSES_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens"}


class UnsupportedRequest(ValueError):
    """A Responses request the engine cannot answer as asked: a 400 for that line."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body that asks the chat engine for the same answer."""
    _check_unsupported(body)
    messages = _input_messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise UnsupportedRequest("'instructions' must be a string.", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"messages": messages}
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if isinstance(max_output, bool) or not isinstance(max_output, int):
            raise UnsupportedRequest("'max_output_tokens' must be an integer.", "max_output_tokens", "invalid_type")
        if max_output < MIN_OUTPUT_TOKENS:
            raise UnsupportedRequest(
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                f"{MIN_OUTPUT_TOKENS}, but got {max_output} instead.", "max_output_tokens", "integer_below_min_value")
        chat["max_completion_tokens"] = max_output
    for name in ("temperature", "top_p"):  # checked by the chat engine, with the same names
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat


def _check_unsupported(body: dict[str, Any]) -> None:
    for name in _CHAT_ONLY:  # chat parameters the Responses API does not have: OpenAI refuses them
        if name in body:
            raise UnsupportedRequest(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    for name in body:
        if name not in _KNOWN and not name.startswith("x_"):  # x_: test and extension fields, as elsewhere
            raise UnsupportedRequest(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    for name, message in _UNSUPPORTED_TRUTHY.items():
        if body.get(name):
            raise UnsupportedRequest(message, name)
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
            raise UnsupportedRequest("'include' must be a list of strings.", "include", "invalid_type")
        if _INCLUDE_NEEDING_LOGPROBS in include:
            raise UnsupportedRequest(f"include '{_INCLUDE_NEEDING_LOGPROBS}' needs logprobs, which the embedded "
                                     "engine does not return.", "include")
    for name in ("reasoning", "text"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise UnsupportedRequest(f"'{name}' must be an object.", name, "invalid_type")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise UnsupportedRequest("tool_choice needs tools, which the embedded engine does not support.",
                                 "tool_choice")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and any(v is not None for v in reasoning.values()):
        raise UnsupportedRequest("reasoning settings are not supported by the embedded engine's model.",
                                 "reasoning")
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise UnsupportedRequest("Only text.format {'type': 'text'} is supported by the embedded engine.",
                                 "text.format")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled", "auto"):
        raise UnsupportedRequest(f"Invalid value: {truncation!r}. Supported values are: 'auto' and 'disabled'.",
                                 "truncation")


def _instructions(body: dict[str, Any]) -> int:
    """How many leading chat messages `to_chat_body` made of `instructions` (never dropped)."""
    return 1 if body.get("instructions") is not None else 0


def droppable_inputs(chat: dict[str, Any], body: dict[str, Any]) -> int:
    """How many of the oldest input items `truncation: "auto"` may drop from `chat` (the body
    `to_chat_body` made of `body`): all but the newest."""
    return max(0, len(chat["messages"]) - _instructions(body) - 1)


def without_oldest_inputs(chat: dict[str, Any], body: dict[str, Any], dropped: int) -> dict[str, Any]:
    """`chat` without its `dropped` oldest input items (the instructions stay first)."""
    kept, messages = _instructions(body), chat["messages"]
    return {**chat, "messages": messages[:kept] + messages[kept + dropped:]}


def _input_messages(items: Any) -> list[dict[str, str]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise UnsupportedRequest("'input' must be a string or a non-empty list of messages.", "input")
    return [_input_message(item, i) for i, item in enumerate(items)]


def _input_message(item: Any, index: int) -> dict[str, str]:
    if not isinstance(item, dict):
        raise UnsupportedRequest("Each input item must be an object.", f"input[{index}]")
    kind = item.get("type", "message")
    if kind != "message":
        raise UnsupportedRequest(f"Input items of type '{kind}' are not supported by the embedded engine; "
                                 "it takes messages only.", f"input[{index}].type")
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise UnsupportedRequest(f"Unsupported role {item.get('role')!r}: use user, assistant, system or "
                                 "developer.", f"input[{index}].role")
    return {"role": role, "content": _content_text(item.get("content"), index)}


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UnsupportedRequest("Message content must be a string or a list of content parts.",
                                 f"input[{index}].content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None or not isinstance(part.get(key), str):
            raise UnsupportedRequest(f"Content parts of type {kind!r} are not supported by the embedded engine; "
                                     "it takes input_text only.", f"input[{index}].content[{j}]")
        texts.append(part[key])
    return "".join(texts)


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    """What the chat engine produced for one request."""

    text: str
    finish_reason: str  # "stop", or "length" when the token limit cut it
    input_tokens: int
    output_tokens: int
    cached_tokens: int


def response_object(answer: ChatAnswer, body: dict[str, Any], model: str, created_at: int | None = None
                    ) -> dict[str, Any]:
    """A complete `response` object, with the request's settings echoed as OpenAI does;
    `created_at`: when the request was received (default now)."""
    now = int(time.time())
    text: dict[str, Any] = body["text"] if isinstance(body.get("text"), dict) else {}
    verbosity = {"verbosity": text["verbosity"]} if isinstance(text.get("verbosity"), str) else {}
    cut = answer.finish_reason == "length"
    status = "incomplete" if cut else "completed"
    message = {
        "type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": answer.text, "annotations": [], "logprobs": []}],
    }
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": now if created_at is None else created_at,
        "status": status,
        "completed_at": None if cut else now,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": model,
        "output": [message],
        "parallel_tool_calls": _flag(body.get("parallel_tool_calls"), True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": body["service_tier"] if isinstance(body.get("service_tier"), str) else "default",
        "store": False,  # nothing is kept: GET /v1/responses/{id} does not exist here
        "temperature": _number(body.get("temperature"), 1.0),
        "text": {"format": {"type": "text"}, **verbosity},
        "tool_choice": body["tool_choice"] if body.get("tool_choice") in ("none", "auto") else "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": _number(body.get("top_p"), 1.0),
        "truncation": "auto" if body.get("truncation") == "auto" else "disabled",
        "usage": {
            "input_tokens": answer.input_tokens,
            # No cache is written on purpose (no retention to pay for): reused prefixes are `cached_tokens`.
            "input_tokens_details": {"cached_tokens": answer.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": answer.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": answer.input_tokens + answer.output_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
    }


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _flag(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default
