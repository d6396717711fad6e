"""A bound on pauses inside a request body, and no keep-alive for a body the app did not read.

A client that sends a multipart upload one byte every two seconds would otherwise hold its
connection, and the upload's temp file, forever. Here each wait for the next piece of the body is
bounded: when it runs out, `receive` raises `RequestTimeout`, so whatever is reading the body stops
and cleans up (the upload's writer removes its temp file), and the client gets a 408 in the OpenAI
envelope with `connection: close`. Once the whole body has arrived, `receive` is passed through
untouched: a long download that listens for a disconnect must not time out.

A response sent before the body was read to its end (a 401 on an upload, a 413) also closes the
connection: uvicorn would otherwise keep reading and discarding the rest of that body for as long
as the client trickles it, with no timeout at all."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from overnight.api.errors import error_response
from overnight.batches.errors import OvernightError

log = logging.getLogger("overnight.api")


class RequestTimeout(OvernightError):
    status_code = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"The request body stalled: nothing arrived for {seconds:g} seconds. Send the body without "
            "pauses and try again.",
            code="request_timeout",
        )
        self.headers = {"connection": "close"}


# A body's average rate, once it has taken longer than the idle timeout, must be at least this:
# a pause bound alone let one byte every 29 s hold a connection (and a JSON body is read before the
# key is checked) for about a year per megabyte.
MIN_BYTES_PER_SECOND = 1024
RATE_GRACE_SECONDS = 10.0  # and not before the idle timeout: a short pause is not a slow body


class BodyTooSlow(RequestTimeout):
    def __init__(self, seconds: float, received: int) -> None:
        super().__init__(seconds)
        self.message = (f"The request body arrived too slowly: {received:,} bytes in {seconds:.0f} seconds, under "
                        f"{MIN_BYTES_PER_SECOND:,} bytes a second. Send the body faster and try again.")
        self.args = (self.message,)


class BodyIdleTimeoutMiddleware:
    """Pure ASGI (no task per request): wraps `receive` and `send` of each HTTP request."""

    def __init__(self, app: ASGIApp, idle_seconds: float) -> None:
        self.app = app
        self.idle_seconds = idle_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = not _has_body(scope)
        timed_out: RequestTimeout | None = None
        answered = False
        started = time.monotonic()
        received = 0

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out, received
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.idle_seconds):
                    message = await receive()
            except TimeoutError:
                timed_out = RequestTimeout(self.idle_seconds)
                raise timed_out from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
                return message
            received += len(message.get("body", b""))
            took = time.monotonic() - started
            if took > max(self.idle_seconds, RATE_GRACE_SECONDS) and received < MIN_BYTES_PER_SECOND * took:
                timed_out = BodyTooSlow(took, received)
                raise timed_out
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if timed_out is not None:
                # Whatever the app makes of the stalled body (FastAPI turns an error while reading
                # a JSON body into a 400), the client is told what happened.
                if message["type"] == "http.response.start" and not answered:
                    answered = True
                    await _send_timeout(scope, receive, send, timed_out)
                return
            if message["type"] == "http.response.start":
                answered = True
                if not body_done:
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if timed_out is None:
                raise
            if not answered:
                await _send_timeout(scope, receive, send, timed_out)
        if timed_out is not None:
            client = scope.get("client")
            log.info("dropped a request whose body stalled or trickled (%s) (from %s)", timed_out.message,
                     client[0] if client else "?")


async def _send_timeout(scope: Scope, receive: Receive, send: Send, error: RequestTimeout) -> None:
    response = error_response(error.status_code, error.message, error.error_type, code=error.code,
                              headers=error.headers)
    await response(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False
