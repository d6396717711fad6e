"""Domain errors. One root; each subclass knows its HTTP status so the API maps them in one table."""

from __future__ import annotations


class OvernightError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}


class InvalidRequest(OvernightError):
    status_code = 400


class NotFound(OvernightError):
    status_code = 404


class Conflict(OvernightError):
    status_code = 409


class PayloadTooLarge(OvernightError):
    status_code = 413
