"""One request line of a batch input file, parsed once, with its `body` kept as the exact bytes
the user wrote.

A body is sent upstream as those bytes, never parsed and serialized again: a re-serialized body
loses digits (`18446744073709551616` becomes `1.8446744073709552e+19`) and can fail outright
(a serializer's nesting limit lower than the parser's once looped a batch). Validation and the
worker both parse with `parse_request_line`, so whatever validation accepts, the worker can send.

The fast path costs one orjson parse: in nearly every file `body` is the last key, so the line
splits into `{..., "body":` + BODY + `}`. If `{..., "body":null}` and BODY each parse, `body`
is a top-level key (a `"body":` inside a string or a nested object leaves the first part
unparseable) and BODY is exactly its value. Other key orders take a slower exact scan.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from overnight.json_text import loads_standard

_BODY_KEY = b'"body"'
_MODEL_KEY = b'"model"'
_JSON_SPACE = b" \t\r\n"
# A JSON string token (the unrolled form: no backtracking), or one structural character.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]', re.DOTALL)
_MAX_BODY_KEY_TRIES = 4


class RequestLineError(ValueError):
    """The line is not one JSON object (the message says why)."""


def parse_request_line(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    """The line as a dict, and its `body` value's exact bytes (None when there is no `body` key
    or the line is not an object). Raises `RequestLineError` for a line that is not valid JSON."""
    end = len(data.rstrip(_JSON_SPACE)) - 1
    if end > 0 and data[end] == 0x7D:  # "}"
        parsed = _split_at_last_body(data, end)
        if parsed is not None:
            return parsed
    obj = loads_line(data)
    if not isinstance(obj, dict) or "body" not in obj:
        return obj, None
    return obj, _scan_body_value(data)


def loads_line(data: bytes) -> Any:
    """JSON text as every check of an input line reads it: orjson, but for valid JSON numbers beyond
    a double (`1e400`, 400 digits), which it refuses and the standard library reads (the body goes
    upstream as written either way). Raises RequestLineError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not str(exc).startswith("number is infinity"):
            raise RequestLineError(str(exc)) from None
        try:
            return loads_standard(data)
        except ValueError:
            raise RequestLineError(str(exc)) from None


def _split_at_last_body(data: bytes, end: int) -> tuple[dict[str, Any], bytes] | None:
    pos = data.rfind(_BODY_KEY, 0, end)
    for _ in range(_MAX_BODY_KEY_TRIES):
        if pos <= 0:
            return None
        colon = _skip_space(data, pos + len(_BODY_KEY))
        if data[colon : colon + 1] == b":":
            start = _skip_space(data, colon + 1)
            try:
                head = orjson.loads(data[:start] + b"null}")
                body_bytes = data[start:end].rstrip(_JSON_SPACE)
                body = loads_line(body_bytes)
            except (orjson.JSONDecodeError, RequestLineError):
                pass
            else:
                if isinstance(head, dict):
                    head["body"] = body
                    return head, body_bytes
        pos = data.rfind(_BODY_KEY, 0, pos)
    return None


def _scan_body_value(data: bytes) -> bytes | None:
    """The top-level `body` value's bytes in a valid JSON object, by a scan of its tokens (no
    recursion, so any nesting depth the parser accepted is fine). The last `body` key wins, as
    it does in the parsed dict."""
    depth = 0
    key: bytes | None = None
    start = -1
    found: bytes | None = None
    for match in _TOKEN.finditer(data):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string: at depth 1 it may be a key
            key = token if depth == 1 else None
        elif first == 0x3A:  # ":" after a top-level key
            if key is not None and orjson.loads(key) == "body":
                start = _skip_space(data, match.end())
            key = None
        elif first in (0x7B, 0x5B):  # "{" or "["
            depth += 1
        elif first in (0x7D, 0x5D, 0x2C):  # "}", "]" or ","
            if start >= 0 and depth == 1:
                found = data[start : match.start()].rstrip(_JSON_SPACE)
                start = -1
            if first != 0x2C:
                depth -= 1
    return found


def _skip_space(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] in _JSON_SPACE:
        pos += 1
    return pos


def with_model(body_bytes: bytes, body: dict[str, Any], model: str) -> bytes:
    """`body_bytes` with its top-level `model` value replaced (an alias resolved), every other
    byte as written. Each candidate splice is checked by parsing the result."""
    new_value = orjson.dumps(model)
    pos = body_bytes.find(_MODEL_KEY)
    while pos >= 0:
        colon = _skip_space(body_bytes, pos + len(_MODEL_KEY))
        if body_bytes[colon : colon + 1] == b":":
            value = _STRING.match(body_bytes, _skip_space(body_bytes, colon + 1))
            if value is not None:
                spliced = body_bytes[: value.start()] + new_value + body_bytes[value.end() :]
                try:
                    check = loads_line(spliced)
                except RequestLineError:
                    check = None
                if isinstance(check, dict) and check.get("model") == model and len(check) == len(body):
                    return spliced
        pos = body_bytes.find(_MODEL_KEY, pos + 1)
    return orjson.dumps({**body, "model": model})
