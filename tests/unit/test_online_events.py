"""The Responses API's stream events as the official SDK parses them, for an answer that fails
after its first events."""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from overnight.online.events import ChatEvents, ResponseEvents

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def parsed(stream: bytes) -> list[Any]:
    """The `data:` lines of server-sent events, each parsed as the SDK parses it."""
    return [EVENTS.validate_python(orjson.loads(line[6:])) for line in stream.split(b"\n")
            if line.startswith(b"data: ")]


def test_a_response_that_fails_mid_stream_ends_with_response_failed() -> None:
    """A failure after the first events was a bare `data: {"error": ...}`: no event type and no
    sequence number, so a client dispatching on event types (as OpenAI's docs show) never saw it."""
    events = ResponseEvents("m", {"input": "x"})
    stream = events.start() + events.delta("Half an ans") + events.fail(
        504, {"message": "The request ran past its deadline.", "code": "timeout"})
    seen = parsed(stream)
    assert [e.type for e in seen][-2:] == ["response.output_text.delta", "response.failed"]
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    failed = seen[-1].response
    assert failed.status == "failed" and failed.id == seen[0].response.id
    assert failed.error.code == "server_error" and failed.error.message == "The request ran past its deadline."
    assert b"event: response.failed\n" in stream


def test_chat_streams_keep_openais_error_event() -> None:
    events = ChatEvents("m", {"messages": []})
    chunk = events.fail(500, {"message": "boom", "type": "server_error", "param": None, "code": None})
    assert orjson.loads(chunk[6:]) == {"error": {"message": "boom", "type": "server_error", "param": None,
                                                 "code": None}}
