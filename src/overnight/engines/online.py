"""What an online request gets back: an HTTP answer whose body may still be arriving (a stream of
server-sent events, or an upstream's body relayed as it comes), and the engines that answer with an
HTTP server's own bytes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import orjson

from overnight.engines.port import EngineRequest

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
# An upstream's answer headers that reach the client: the OpenAI SDK times its retries by
# retry-after(-ms) and follows x-should-retry; x-ratelimit-* tell a client its budget.
RELAYED_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
RELAYED_HEADER_PREFIX = "x-ratelimit-"


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an upstream's answer that a client of overnight gets as they are."""
    return {name.lower(): value for name, value in headers.items()
            if name.lower() in RELAYED_HEADERS or name.lower().startswith(RELAYED_HEADER_PREFIX)}


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


async def _nothing() -> None:
    return None


@dataclass(slots=True, eq=False)
class OnlineReply:
    """Status, media type, and the body: `body` when it is whole, else `chunks` as they arrive.
    `aclose()` must be called once the reply is sent or abandoned: it frees what the answer holds
    (an upstream connection and its concurrency slot, an embedded engine's sequence slot)."""

    status: int
    media_type: str = JSON
    body: bytes | None = None
    chunks: AsyncIterator[bytes] = field(default_factory=_no_chunks)
    # The upstream's headers that tell a client when and whether to retry (see RELAYED_HEADERS).
    headers: dict[str, str] = field(default_factory=dict)
    on_close: Callable[[], Awaitable[None]] = _nothing
    _closed: bool = False

    async def read(self) -> bytes:
        """The whole body (for a body that is one JSON object, never for an event stream)."""
        if self.body is not None:
            return self.body
        return b"".join([chunk async for chunk in self.chunks])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        finally:
            await self.on_close()

    @classmethod
    def error(cls, status: int, message: str, error_type: str = "invalid_request_error",
              param: str | None = None, code: str | None = None) -> OnlineReply:
        """An answer in the OpenAI error envelope."""
        body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        return cls(status, JSON, orjson.dumps(body))


@runtime_checkable
class PassThroughEngine(Protocol):
    """An engine in front of an OpenAI-compatible HTTP server (the upstream): an online request is
    sent as its bytes and answered with the server's status, media type and bytes, relayed as they
    arrive (a streamed answer's events too)."""

    async def send_online(self, request: EngineRequest) -> OnlineReply: ...
