"""The online service's logic over engine doubles: events for an engine that answers in one piece,
an engine that fails mid-stream, and the checks made before any engine is asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from overnight.engines.online import OnlineReply
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.router import Route, Router
from overnight.online.service import OnlineService

CHAT = {"id": "c", "object": "chat.completion", "created": 1, "model": "double",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole answer"},
                     "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


class WholeAnswers:
    """Answers in one piece; records what it was asked."""

    name = "double"
    max_in_flight = 1
    owned_by = "test"
    shard_lines = 1

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def served_models(self) -> list[str]:
        return ["double"]

    async def execute(self, request: EngineRequest) -> EngineResponse:
        self.requests.append(request)
        return EngineResponse(200, CHAT)


class FailsMidStream(WholeAnswers):
    async def stream(self, request: EngineRequest) -> AsyncIterator[str | EngineResponse]:
        yield "partial"
        yield EngineResponse.failure("engine_error", "the decode step failed")


def _answer(engine: WholeAnswers, body: Any) -> OnlineReply:
    service = OnlineService(Router([Route("*", engine)]))
    return asyncio.run(service.answer("/v1/chat/completions", orjson.dumps(body)))


def _events(engine: WholeAnswers, body: Any) -> tuple[OnlineReply, list[bytes]]:
    """The reply and its events, read in the loop that made it (an engine's stream lives there)."""
    service = OnlineService(Router([Route("*", engine)]))

    async def run() -> tuple[OnlineReply, bytes]:
        reply = await service.answer("/v1/chat/completions", orjson.dumps(body))
        try:
            return reply, await reply.read()
        finally:
            await reply.aclose()

    reply, data = asyncio.run(run())
    return reply, [e for e in data.split(b"\n\n") if e]


def test_an_engine_without_a_stream_is_streamed_in_one_piece() -> None:
    engine = WholeAnswers()
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    reply, events = _events(engine, body)
    assert reply.status == 200 and reply.media_type == "text/event-stream"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]"
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": "", "refusal": None}, {"content": "whole answer"}, {}]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 2
    asked = engine.requests[0]
    assert asked.online and "stream" not in asked.body and "stream_options" not in asked.body


def test_a_failure_mid_stream_ends_with_an_error_event() -> None:
    _, events = _events(FailsMidStream(), {"model": "m", "messages": [], "stream": True})
    assert b'"content":"partial"' in events[1]
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "engine_error" and error["message"] == "the decode step failed"


def test_bad_bodies_never_reach_the_engine() -> None:
    engine = WholeAnswers()
    assert _answer(engine, {"model": "m", "messages": [], "stream": "yes"}).status == 400
    assert _answer(engine, {"model": 7, "messages": []}).status == 400
    assert _answer(engine, {"model": "m"}).status == 400
    assert engine.requests == []
