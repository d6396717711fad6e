"""Output and error lines, byte for byte as OpenAI writes them."""

from __future__ import annotations

from typing import Any

import orjson

_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


def response_line(
    line_id: str, custom_id: str, status_code: int, request_id: str, body: dict[str, Any] | None,
    raw_body: bytes | None = None,
) -> bytes:
    """`raw_body`, when given, is `body` as compact JSON bytes: embedded as is."""
    return orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": {
                "status_code": status_code,
                "request_id": request_id,
                "body": body if raw_body is None else orjson.Fragment(raw_body),
            },
            "error": None,
        }
    )


def error_line(line_id: str, custom_id: str, code: str, message: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message or _MESSAGES.get(code, code)},
        }
    )
