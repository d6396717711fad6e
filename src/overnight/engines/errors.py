"""Errors the embedded engines raise while reading a request body, before it reaches a worker thread."""

from __future__ import annotations

from overnight.engines.port import EngineResponse


class BadRequest(Exception):
    """A per-request problem, answered as an HTTP 400 in OpenAI's error envelope."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def response(self) -> EngineResponse:
        return EngineResponse.http_error(400, str(self), code=self.code, param=self.param)
