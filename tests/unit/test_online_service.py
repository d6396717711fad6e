"""The online service's logic over engine doubles: events for an engine that answers in one piece,
an engine that fails mid-stream, and the checks made before any engine is asked."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

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


class SlowAnswers(WholeAnswers):
    """Takes `seconds` to answer; records whether it was cancelled first."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    async def execute(self, request: EngineRequest) -> EngineResponse:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return await super().execute(request)


def test_a_client_that_leaves_before_the_answer_cancels_it() -> None:
    """The online route on a real uvicorn server on loopback, the SDK timing out after 0.5 s: the
    engine's work is cancelled then (uvicorn cancels no handler; it ran to its end beside the SDK's
    retries, holding an engine slot each)."""
    import openai
    import uvicorn
    from fastapi import FastAPI

    from conftest import free_port, until
    from overnight.api import routes_online
    from overnight.api.auth import Principal, principal

    engine = SlowAnswers(seconds=5.0)
    app = FastAPI()
    app.include_router(routes_online.router)
    app.dependency_overrides[principal] = lambda: Principal(owner="alice")
    app.state.services = SimpleNamespace(online=OnlineService(Router([Route("*", engine)])))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        until(lambda: server.started, timeout=10)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="double", messages=[{"role": "user", "content": "hi"}])
        assert engine.cancelled.wait(2.0), "the abandoned request went on"
        assert not engine.finished.is_set()
    finally:
        server.should_exit = True
        thread.join(10)
