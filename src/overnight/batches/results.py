"""Output and error lines, byte for byte as OpenAI writes them, safe for line-based readers:
U+2028 and U+2029 are escaped (valid raw in JSON, but Python's `str.splitlines()` splits on them,
which breaks the common `for line in content.text.splitlines()` loop)."""

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
    """`raw_body`, when given, is `body` as JSON text without line breaks: embedded as is."""
    if raw_body is not None:  # the hot path (every upstream answer): joined, not built as a dict (0.4 vs 1.4 us)
        return _one_line(b"".join((
            b'{"id":', orjson.dumps(line_id), b',"custom_id":', orjson.dumps(custom_id),
            b',"response":{"status_code":', b"%d" % status_code, b',"request_id":', orjson.dumps(request_id),
            b',"body":', raw_body, b'},"error":null}',
        )))
    return _one_line(orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": {
                "status_code": status_code,
                "request_id": request_id,
                "body": body,
            },
            "error": None,
        }
    ))


def error_line(line_id: str, custom_id: str, code: str, message: str | None = None) -> bytes:
    return _one_line(orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message or _MESSAGES.get(code, code)},
        }
    ))


def response_error_code(status_code: int, body: dict[str, Any] | None) -> str:
    """What an upstream's non-2xx answer counts as in a batch's outcome: the `error.code` of
    its body when it names one, else `http_<status>`."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code else f"http_{status_code}"


def _one_line(line: bytes) -> bytes:
    # U+2028 and U+2029 are E2 80 A8 and E2 80 A9 in UTF-8; outside strings JSON has no use for them.
    if b"\xe2\x80" in line:
        line = line.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    return line
