"""Online requests: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and
`/v1/responses` answered now, on the engines that batch lines run on, routed the same way (a
body's `model`, aliases, the embedded default for models no route names).

An upstream answers with its own bytes: the request body goes as the client sent it (an alias
applied), the answer comes back as the upstream sent it, events relayed as they arrive. An embedded
engine answers with a body this server writes; asked to stream, its answer goes out as OpenAI's
server-sent events. Every request runs in the engine's online lane, ahead of batch lines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import orjson

from overnight import constants as C
from overnight.batches.endpoints import REQUIRED_BODY_FIELDS
from overnight.batches.request_line import RequestLineError, loads_line, with_model
from overnight.engines.online import EVENT_STREAM, JSON, OnlineReply, PassThroughEngine
from overnight.engines.port import Engine, EngineRequest, EngineResponse
from overnight.engines.router import Router
from overnight.online.events import (
    ChatEvents,
    CompletionEvents,
    ResponseEvents,
    TextEvents,
    TextOutcome,
)

ONLINE_ENDPOINTS = (C.CHAT_COMPLETIONS, C.COMPLETIONS, C.EMBEDDINGS, C.RESPONSES)
# How long an online request may take, retries included (as an upstream's default timeout).
ONLINE_TIMEOUT_SECONDS = 600.0
# Endpoints whose answer can be streamed as events.
_TEXT_EVENTS: dict[str, type[ChatEvents] | type[CompletionEvents] | type[ResponseEvents]] = {
    C.CHAT_COMPLETIONS: ChatEvents, C.COMPLETIONS: CompletionEvents, C.RESPONSES: ResponseEvents,
}
# An engine failure with no HTTP answer behind it, as the status a client gets.
_FAILURE_STATUS = {"upstream_unreachable": 502, "upstream_timeout": 504, C.BATCH_EXPIRED: 504,
                   "engine_closed": 503}
_NOT_JSON = "We could not parse the JSON body of your request. Send a valid JSON object."


class OnlineService:
    """Answers online requests on this process's engines (started on first use)."""

    def __init__(self, router: Router, timeout_seconds: float = ONLINE_TIMEOUT_SECONDS) -> None:
        self.router = router
        self.timeout_seconds = timeout_seconds
        self._started: set[int] = set()

    async def answer(self, endpoint: str, raw: bytes) -> OnlineReply:
        """The answer to `raw`, a request body sent to `endpoint`; never raises for a bad request."""
        try:
            body = loads_line(raw)  # numbers beyond a double are valid JSON, sent on as written
        except RequestLineError:
            body = None
        if not isinstance(body, dict):
            return OnlineReply.error(400, _NOT_JSON, code="invalid_json")
        problem = _check_body(endpoint, body)
        if problem is not None:
            return problem
        model: str = body["model"]
        resolved = self.router.resolve(model, endpoint)
        if resolved is None:
            return OnlineReply.error(404, f"The model `{model}` does not exist or you do not have access to it.",
                                     code="model_not_found")
        if resolved.model != model:  # an alias: the engine is asked for the model it names
            raw = with_model(raw, body, resolved.model)
            body = {**body, "model": resolved.model}
        await self._start(resolved.engine)
        deadline = time.time() + self.timeout_seconds
        engine = resolved.engine
        if isinstance(engine, PassThroughEngine):
            return await engine.send_online(EngineRequest(endpoint, body, deadline, raw, online=True))
        if body.get("stream") is True and endpoint in _TEXT_EVENTS:
            return await _answer_as_events(engine, endpoint, body, deadline, resolved.model)
        response = await engine.execute(EngineRequest(endpoint, body, deadline, online=True))
        if not response.ok:
            return _failure(response)
        return OnlineReply(response.status_code or 200, JSON, response.raw or orjson.dumps(response.body))

    async def _start(self, engine: Engine) -> None:
        if id(engine) not in self._started:
            await engine.start()  # idempotent; the first request waits for a model to load
            self._started.add(id(engine))


@runtime_checkable
class TextStreamingEngine(Protocol):
    """An engine that yields an answer's text as it is generated, then the whole response (the one
    `execute` returns); a request that fails yields only its error response. Closing the iterator
    early cancels the request."""

    def stream(self, request: EngineRequest) -> AsyncIterator[str | EngineResponse]: ...


async def _answer_as_events(engine: Engine, endpoint: str, body: dict[str, Any], deadline: float,
                            routed: str) -> OnlineReply:
    """A streamed request to an engine that writes its own answers: the engine writes the text,
    the events are ours (as it is generated where the engine can stream, else in one piece)."""
    engine_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    request = EngineRequest(endpoint, engine_body, deadline, online=True)
    events = _TEXT_EVENTS[endpoint](_model_name(engine, routed), body)
    if isinstance(engine, TextStreamingEngine):
        return await _streamed(events, endpoint, engine.stream(request))
    response = await engine.execute(request)
    if not response.ok:
        return _failure(response)
    return _whole_answer_as_events(events, endpoint, response.body or {})


def _model_name(engine: Engine, routed: str) -> str:
    """The name an engine answers with: its own model's (an embedded engine's), else the routed one."""
    served = engine.served_models()
    return served[0] if len(served) == 1 else routed


async def _streamed(events: TextEvents, endpoint: str, items: AsyncIterator[str | EngineResponse]) -> OnlineReply:
    """The engine's pieces as events. Its first item is awaited before answering: a request it
    refuses is then answered with the error's status and body, as OpenAI does, not with an event."""
    try:
        first = await anext(items)
    except BaseException:
        await _close(items)
        raise
    if isinstance(first, EngineResponse):
        await _close(items)
        if not first.ok:
            return _failure(first)
        return _whole_answer_as_events(events, endpoint, first.body or {})

    async def chunks() -> AsyncIterator[bytes]:
        yield events.start() + events.delta(first)
        async for item in items:
            if isinstance(item, str):
                yield events.delta(item)
            elif item.ok:  # the whole response: how the answer ended and its usage
                yield events.finish(_text_and_outcome(endpoint, item.body or {})[1])
                return
            else:
                failure = _failure(item)
                yield events.fail(failure.status, orjson.loads(failure.body or b"{}").get("error", {}))
                return

    return OnlineReply(200, EVENT_STREAM, chunks=chunks(), on_close=lambda: _close(items))


async def _close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


def _check_body(endpoint: str, body: dict[str, Any]) -> OnlineReply | None:
    model = body.get("model")
    if model is None:
        return OnlineReply.error(400, "you must provide a model parameter")
    if not isinstance(model, str) or not model or len(model) > C.MAX_MODEL_NAME_CHARS:
        return OnlineReply.error(400, "Invalid value for 'model': expected a model name.", param="model",
                                 code="invalid_value" if isinstance(model, str) else "invalid_type")
    for name in REQUIRED_BODY_FIELDS.get(endpoint, ()):
        if name not in body:
            return OnlineReply.error(400, f"Missing required parameter: '{name}'.", param=name,
                                     code="missing_required_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return OnlineReply.error(400, "Invalid type for 'stream': expected a boolean.", param="stream",
                                 code="invalid_type")
    return None


def _failure(response: EngineResponse) -> OnlineReply:
    if response.status_code is not None:  # an HTTP answer (a 400 for a bad parameter, ...)
        return OnlineReply(response.status_code, JSON, response.raw or orjson.dumps(response.body))
    code = response.error_code or C.ENGINE_ERROR
    return OnlineReply.error(_FAILURE_STATUS.get(code, 500), response.error_message or "The engine failed.",
                             "server_error", code=code)


def _whole_answer_as_events(events: TextEvents, endpoint: str, body: dict[str, Any]) -> OnlineReply:
    """An engine that answered in one piece, streamed as the events of a one-piece answer."""
    text, outcome = _text_and_outcome(endpoint, body)

    async def chunks() -> AsyncIterator[bytes]:
        yield events.start() + events.delta(text) + events.finish(outcome)

    return OnlineReply(200, EVENT_STREAM, chunks=chunks())


def _text_and_outcome(endpoint: str, body: dict[str, Any]) -> tuple[str, TextOutcome]:
    usage = body.get("usage") or {}
    if endpoint == C.RESPONSES:
        content = body["output"][0]["content"][0]
        cut = body.get("status") == "incomplete"
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
        return content["text"], TextOutcome("length" if cut else "stop", usage.get("input_tokens", 0),
                                            usage.get("output_tokens", 0), cached)
    choice = body["choices"][0]
    text = choice["message"]["content"] if endpoint == C.CHAT_COMPLETIONS else choice["text"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return text or "", TextOutcome(choice.get("finish_reason") or "stop", usage.get("prompt_tokens", 0),
                                   usage.get("completion_tokens", 0), cached)
