"""uvicorn's httptools protocol with the two bounds it lacks: how long a client may take to send a
request's headers, and how large they may be. Without them a client that sends one header byte
every two seconds (or never sends anything) holds a connection for as long as it likes, and one
that sends a megabyte of headers has it buffered and handed to the app.

The header clock starts when a connection opens and again at the first byte of each later request,
and stops when the headers are complete: it never runs while the app works or between keep-alive
requests (uvicorn's own keep-alive timeout covers those). Both refusals are written here, before
the app sees the request, in the OpenAI error envelope, and close the connection."""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from overnight.ids import new_request_id
from overnight.observability.logs import bind_request_id, unbind
from overnight.settings import HttpSettings

log = logging.getLogger("overnight.api")


def guarded_protocol(settings: HttpSettings) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn as `http=`, bound to these limits (uvicorn makes one
    instance per connection and passes it only its own config)."""

    class BoundProtocol(GuardedHttpProtocol):
        header_timeout = settings.header_timeout_seconds
        max_header_bytes = settings.max_header_bytes

    return BoundProtocol


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout: float = HttpSettings().header_timeout_seconds
    max_header_bytes: int = HttpSettings().max_header_bytes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        # Between the end of one request and the end of the next one's headers, every byte that
        # arrives is header bytes (give or take the tail of a pipelined body in the same read).
        self._in_headers = True
        self._header_bytes = 0
        self._parsed_header_bytes = 0  # the request line and headers the parser handed over
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what is still in flight is not parsed
        if self._in_headers:
            self._header_bytes += len(data)
            if self.cycle is None or self.cycle.response_complete:
                # uvicorn cancels its keep-alive timer at any byte, and a stray CRLF after a request
                # starts no message (so no clock): the connection was held open for ever. (Not while a
                # response streams: a pipelined byte must not cut a long download.)
                self._start_header_clock()
        super().data_received(data)
        # Checked after parsing, so headers that end within this read are never counted as too
        # large because of the body bytes that follow them; the parser holds at most one read
        # (256 KiB) beyond the limit before this refuses.
        if self._in_headers and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(
                431,
                f"The request's headers are larger than {self.max_header_bytes:,} bytes, the most this "
                "server accepts.",
                "request_header_fields_too_large",
            )

    # httptools parser callbacks (extended)
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_headers = True
        self._start_header_clock()

    def on_url(self, url: bytes) -> None:
        self._parsed_header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_header_bytes += len(name) + len(value)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        parsed, self._parsed_header_bytes = self._parsed_header_bytes, 0
        self._in_headers = False
        self._header_bytes = 0
        self._stop_header_clock()
        if self._refused:
            return
        if parsed > self.max_header_bytes:
            # Headers that end within the read that takes them past the limit: the check after
            # each read (data_received) never sees them over it once they are complete.
            self._refuse(431, f"The request's headers are larger than {self.max_header_bytes:,} bytes, the most "
                         "this server accepts.", "request_header_fields_too_large")
            return  # no request cycle: the app never sees it, and the parser's later callbacks are ignored
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_headers = True
        self._header_bytes = 0

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._header_bytes == 0:
            self.transport.close()  # a silent connection: nothing was asked, nothing to answer
            return
        self._refuse(
            408,
            f"The request's headers did not arrive within {self.header_timeout:g} seconds. Send the whole "
            "request without pauses and try again.",
            "request_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refused = True
        self._stop_header_clock()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers, while the previous response is still being written:
            # an answer here would land inside that response, so the connection is only closed.
            self.transport.close()
            return
        body = orjson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )
        # Every answer carries an x-request-id, these too: it is what a user quotes to the operator,
        # who finds it in the log.
        request_id = new_request_id()
        token = bind_request_id(request_id)
        log.info("refused a request before the app: %d %s", status, code)
        unbind(token)
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()
