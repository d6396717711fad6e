"""Reading one request and its result: the input text, the answer, the usage and the error, for
each endpoint the Batch API serves. Only fields OpenAI documents are read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUCCEEDED = "succeeded"
FAILED = "failed"
# An input line the batch reported nothing for (OpenAI may drop unrun lines of a cancelled batch).
MISSING = "missing"
NO_RESULT_CODE = "no_result"

CSV_FIELDS = ("custom_id", "status", "input", "answer", "input_tokens", "output_tokens", "total_tokens",
              "status_code", "error_code", "error_message")


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One input line joined to its result by custom_id."""

    custom_id: str
    status: str  # SUCCEEDED, FAILED or MISSING
    input: Any  # the prompt text (or the request's input value); None when the input was not read
    answer: Any  # text; an embedding (list of floats, or a list of them); None for a failed line
    usage: Mapping[str, Any] | None
    status_code: int | None
    error_code: str | None
    error_message: str | None

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def as_dict(self) -> dict[str, Any]:
        """The record for results.jsonl."""
        return {name: getattr(self, name) for name in self.__slots__}

    def as_row(self) -> dict[str, Any]:
        """The record for results.csv: flat, usage split into token counts, JSON for non-text values."""
        tokens = normalized_usage(self.usage)
        row = {**self.as_dict(), **tokens}
        for name in ("input", "answer"):
            value = row[name]
            row[name] = value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return {name: row.get(name) for name in CSV_FIELDS}


def normalized_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Token counts under one set of names: chat/completions say prompt/completion, responses say input/output."""
    usage = usage or {}
    return {
        "input_tokens": usage.get("prompt_tokens", usage.get("input_tokens")),
        "output_tokens": usage.get("completion_tokens", usage.get("output_tokens")),
        "total_tokens": usage.get("total_tokens"),
    }


def input_of(body: Any) -> Any:
    """What a request asked, readably: the last user message, the prompt, or the input."""
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        return _content_text((users or messages)[-1].get("content"))
    for key in ("prompt", "input"):
        if key in body:
            value = body[key]
            if key == "input" and isinstance(value, list) and value and isinstance(value[-1], Mapping):
                return _content_text(value[-1].get("content"))  # responses: a list of messages
            return value
    return _compact(body)


def answer_of(body: Any) -> Any:
    """The answer in a successful response body, whichever endpoint produced it."""
    if not isinstance(body, Mapping):
        return None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        texts = [_choice_text(c) for c in choices if isinstance(c, Mapping)]
        return texts[0] if len(texts) == 1 else texts
    if body.get("object") == "response" or isinstance(body.get("output"), list):
        return _response_text(body)
    data = body.get("data")
    if isinstance(data, list) and data and isinstance(data[0], Mapping) and "embedding" in data[0]:
        vectors = [item.get("embedding") for item in data]
        return vectors[0] if len(vectors) == 1 else vectors
    return _compact(body)


def result_of(custom_id: str, line: Mapping[str, Any] | None, request_input: Any) -> ResultRecord:
    """Join an output- or error-file line (None: the batch reported nothing) to its request."""
    if line is None:
        return ResultRecord(custom_id, MISSING, request_input, None, None, None, NO_RESULT_CODE,
                            "the batch reported no result for this request")
    response = line.get("response") if isinstance(line.get("response"), Mapping) else None
    status_code = response.get("status_code") if response is not None else None
    body = response.get("body") if response is not None else None
    usage = body.get("usage") if isinstance(body, Mapping) and isinstance(body.get("usage"), Mapping) else None
    error = line.get("error")
    # Classify by status code, not by `error` alone: an HTTP error's details sit in response.body.
    if not error and isinstance(status_code, int) and 200 <= status_code < 300:
        return ResultRecord(custom_id, SUCCEEDED, request_input, answer_of(body), usage, status_code, None, None)
    code, message = _error_of(error, status_code, body)
    return ResultRecord(custom_id, FAILED, request_input, None, usage, status_code, code, message)


def error_code_of(line: Mapping[str, Any]) -> str:
    """The code a failed line is counted under in summaries."""
    response = line.get("response")
    if not isinstance(response, Mapping):
        response = {}
    return _error_of(line.get("error"), response.get("status_code"), response.get("body"))[0]


def _error_of(error: Any, status_code: Any, body: Any) -> tuple[str, str]:
    if isinstance(error, Mapping):
        return str(error.get("code") or "error"), str(error.get("message") or "")
    detail = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(detail, Mapping):
        code = detail.get("code") or detail.get("type") or f"http_{status_code}"
        return str(code), str(detail.get("message") or "")
    return f"http_{status_code}", _compact(body) if body is not None else ""


def _choice_text(choice: Mapping[str, Any]) -> Any:
    message = choice.get("message")
    if isinstance(message, Mapping):
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            return _compact(message["tool_calls"])
        return content if content is not None else message.get("refusal")
    return choice.get("text")


def _response_text(body: Mapping[str, Any]) -> str:
    texts = [
        part.get("text", "")
        for item in body.get("output") or []
        if isinstance(item, Mapping) and item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, Mapping) and part.get("type") == "output_text"
    ]
    return "".join(texts)


def _content_text(content: Any) -> Any:
    """Message content as text: a string, or the text parts of a list of parts joined."""
    if isinstance(content, list):
        texts = [str(p["text"]) for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else _compact(content)
    return content


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
