"""Server-sent events for a text answer produced piece by piece, in OpenAI's streaming formats:
`chat.completion.chunk`s and `text_completion` chunks ending with `data: [DONE]`, and the typed
events of the Responses API (response.created ... response.completed). The upstream engine needs
none of this (it relays the upstream's own events); the embedded engines do."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from overnight.engines import responses_api

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class TextOutcome:
    """How a text answer ended, and what it cost."""

    finish_reason: str  # "stop", or "length" when the token limit cut it
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def chat_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class TextEvents(Protocol):
    """The events of one answer: `start()` before the first piece, `delta()` per piece, `finish()`
    once. Each returns the bytes to send (possibly none)."""

    def start(self) -> bytes: ...

    def delta(self, text: str) -> bytes: ...

    def finish(self, outcome: TextOutcome) -> bytes: ...

    def fail(self, status: int, error: dict[str, Any]) -> bytes:
        """The answer failed after its first events (a deadline, the engine shut down)."""
        ...


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(status: int, error: dict[str, Any]) -> bytes:
    """An answer that failed after its first events: OpenAI's `data: {"error": ...}` (the SDK raises it)."""
    return _data({"error": error if error else {"message": f"The engine failed ({status}).",
                                                "type": "server_error", "param": None, "code": None}})


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class ChatEvents:
    """`chat.completion.chunk`s: the role first, then content deltas, then the finish reason; with
    `stream_options.include_usage` every chunk carries `usage: null` and a last chunk with no
    choices carries the usage (as OpenAI does)."""

    def __init__(self, model: str, body: dict[str, Any]) -> None:
        self._base: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                                      "created": int(time.time()), "model": model, "system_fingerprint": None}
        self._usage = _include_usage(body)
        if self._usage:
            self._base["usage"] = None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _data({**self._base, "choices": [choice]})

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def delta(self, text: str) -> bytes:
        return self._chunk({"content": text}, None) if text else b""

    def fail(self, status: int, error: dict[str, Any]) -> bytes:
        return error_event(status, error)

    def finish(self, outcome: TextOutcome) -> bytes:
        out = self._chunk({}, outcome.finish_reason)
        if self._usage:
            out += _data({**self._base, "choices": [], "usage": outcome.chat_usage()})
        return out + DONE


class CompletionEvents:
    """Legacy `text_completion` chunks: text deltas, then the finish reason (and usage, if asked)."""

    def __init__(self, model: str, body: dict[str, Any]) -> None:
        self._base: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                      "created": int(time.time()), "model": model}
        self._usage = _include_usage(body)
        if self._usage:
            self._base["usage"] = None

    def _chunk(self, text: str, finish_reason: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _data({**self._base, "choices": [choice]})

    def start(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return self._chunk(text, None) if text else b""

    def fail(self, status: int, error: dict[str, Any]) -> bytes:
        return error_event(status, error)

    def finish(self, outcome: TextOutcome) -> bytes:
        out = self._chunk("", outcome.finish_reason)
        if self._usage:
            out += _data({**self._base, "choices": [], "usage": outcome.chat_usage()})
        return out + DONE


class ResponseEvents:
    """The Responses API's typed events for one message with one output_text part:
    response.created, response.in_progress, output_item.added, content_part.added, output_text.delta
    per piece, output_text.done, content_part.done, output_item.done, then response.completed (or
    response.incomplete when the token limit cut the answer). The response objects are the ones a
    non-streamed request gets (engines/responses_api.py), with one id throughout."""

    def __init__(self, model: str, body: dict[str, Any]) -> None:
        self._model = model
        self._body = body
        self._sequence = 0
        self._text: list[str] = []
        self._item_id = f"msg_{uuid.uuid4().hex}"
        empty = responses_api.ChatAnswer("", "stop", 0, 0, 0)
        self._response = responses_api.response_object(empty, body, model)

    def _event(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\n" + _data(obj)

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def start(self) -> bytes:
        pending = {**self._response, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
        item = {"id": self._item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        return (self._event("response.created", response=pending)
                + self._event("response.in_progress", response=pending)
                + self._event("response.output_item.added", output_index=0, item=item)
                + self._event("response.content_part.added", **where, part=self._part("")))

    def delta(self, text: str) -> bytes:
        if not text:
            return b""
        self._text.append(text)
        return self._event("response.output_text.delta", item_id=self._item_id, output_index=0, content_index=0,
                           delta=text, logprobs=[])

    def fail(self, status: int, error: dict[str, Any]) -> bytes:
        """OpenAI's `response.failed`: the response so far, `status: failed` and what went wrong
        (a bare `data: {"error": ...}` has no type, so a client dispatching on event types missed it)."""
        failed = {**self._response, "status": "failed", "completed_at": None, "usage": None,
                  # The SDK's ResponseError takes a fixed list of codes: ours map onto two of them.
                  "error": {"code": "rate_limit_exceeded" if status == 429 else "server_error",
                            "message": str(error.get("message") or f"The engine failed ({status}).")},
                  "output": [{"id": self._item_id, "type": "message", "status": "incomplete", "role": "assistant",
                              "content": [self._part("".join(self._text))]}]}
        return self._event("response.failed", response=failed)

    def finish(self, outcome: TextOutcome) -> bytes:
        text = "".join(self._text)
        answer = responses_api.ChatAnswer(text, outcome.finish_reason, outcome.prompt_tokens,
                                          outcome.completion_tokens, outcome.cached_tokens)
        final = {**responses_api.response_object(answer, self._body, self._model, self._response["created_at"]),
                 "id": self._response["id"]}
        item = {**final["output"][0], "id": self._item_id}
        final["output"] = [item]
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        last = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return (self._event("response.output_text.done", **where, text=text, logprobs=[])
                + self._event("response.content_part.done", **where, part=self._part(text))
                + self._event("response.output_item.done", output_index=0, item=item)
                + self._event(last, response=final))
