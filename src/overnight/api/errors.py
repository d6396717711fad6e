"""The OpenAI error envelope on every failure, one table from exception to wire, and the
`x-request-id` header on every response."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from overnight.batches.errors import OvernightError
from overnight.files.port import StorageFullError
from overnight.ids import new_request_id
from overnight.observability.logs import bind_request_id, unbind

log = logging.getLogger("overnight.api")


def error_response(
    status: int,
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    all_headers = dict(headers or {})
    if 400 <= status < 500 and status not in (408, 429):
        # The SDK retries 409s and others unless told not to; these answers will not change.
        all_headers.setdefault("x-should-retry", "false")
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=all_headers)


async def _overnight_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OvernightError)
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


_VALIDATION_CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json"}


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    kind = str(first.get("type", ""))
    # For invalid JSON the location is the byte offset of the fault, not a parameter.
    loc = [] if kind == "json_invalid" else [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request. Send a valid JSON object."
    elif param is None:  # the body itself: empty, or JSON that is not an object
        message = "The request body must be a JSON object."
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
    code = _VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return error_response(400, message, param=param, code=code)


async def _storage_full(_request: Request, exc: Exception) -> Response:
    log.error("storage full: %s", exc)
    return error_response(
        507,
        "The server's storage is full: nothing was saved. Delete files you no longer need "
        "(DELETE /v1/files/{id}) or ask the operator to free space, then try again.",
        error_type="server_error",
        code="insufficient_storage",
    )


def _unexpected_error(exc: Exception) -> Response:
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(
        500,
        "The server had an error while processing your request. Try again; if it persists, check the server log.",
        error_type="server_error",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Errors the routes raise on purpose. Anything else is answered by RequestIdMiddleware: a
    handler for `Exception` runs in Starlette's outermost middleware, outside the one that gives
    every response its x-request-id (and after the request id is unbound from the log)."""
    app.add_exception_handler(OvernightError, _overnight_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StorageFullError, _storage_full)


class RequestIdMiddleware:
    """Adds `x-request-id` to every HTTP response, errors included (pure ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        text_id = new_request_id()
        request_id = text_id.encode()
        # For the routes (a batch keeps its creator's id) and for log lines written meanwhile.
        scope.setdefault("state", {})["request_id"] = text_id
        token = bind_request_id(text_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away mid-body (a dropped upload): no one to answer, nothing broken
            # here. It was logged as an unhandled error with a traceback and counted as a 500.
            log.info("the client disconnected before its request body ended")
        except Exception as exc:
            if started:  # the answer is on its way: the server can only close the connection
                raise
            await _unexpected_error(exc)(scope, receive, send_with_id)  # logged with its request id
        finally:
            unbind(token)


def request_id_of(request: Request) -> str | None:
    """The x-request-id this request is answered with."""
    return getattr(request.state, "request_id", None)


class BodySizeLimitMiddleware:
    """413 for JSON bodies over the limit (file uploads and upload parts enforce their own, larger,
    limits)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    def _streams_a_file(path: str) -> bool:
        return path == "/v1/files" or (path.startswith("/v1/uploads/") and path.endswith("/parts"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._streams_a_file(scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # An HTTPException: FastAPI turns anything else raised while it reads the body into
                # a 400 "There was an error parsing the body" (a chunked body has no length to check first).
                raise StarletteHTTPException(413, self._too_large)
            return message

        await self.app(scope, counting_receive, send)

    @property
    def _too_large(self) -> str:
        return f"The request body is larger than {self.max_bytes:,} bytes, the most this endpoint accepts."

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, self._too_large)(scope, receive, send)
