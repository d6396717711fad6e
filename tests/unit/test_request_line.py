"""A request line's body is kept as the exact bytes the user wrote, whatever the key order, spacing,
nesting or number spelling; the fast path and the exact scan agree."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overnight.batches.request_line import RequestLineError, _scan_body_value, parse_request_line, with_model


def test_numbers_and_strings_keep_their_spelling() -> None:
    body = b'{"model": "m", "seed": 18446744073709551616, "t": 1.10, "e": 1E+2, "s": "caf\\u00e9 \xe2\x80\xa8"}'
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + b" }"
    obj, raw = parse_request_line(line)
    assert raw == body
    assert obj["custom_id"] == "a" and obj["body"]["model"] == "m"


def test_numbers_beyond_a_double_are_valid_json_and_keep_their_spelling() -> None:
    """orjson refuses them ("number is infinity"): the line was an invalid_json_line and the batch failed."""
    body = b'{"model": "m", "big": 1' + b"0" * 400 + b', "e": 1e400, "n": -1E+999}'
    for line in (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + b"}",
                 b'{"body": ' + body + b', "custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}'):
        obj, raw = parse_request_line(line)
        assert raw == body and obj["custom_id"] == "a" and obj["body"]["big"] == 10**400
    for bad in (b'{"custom_id": "a", "body": {"x": NaN}}', b'{"custom_id": "a", "e": 1e400, "body": {"x": Infinity}}'):
        with pytest.raises(RequestLineError):
            parse_request_line(bad)


@pytest.mark.parametrize(
    "line",
    [
        # body first, in the middle, with a nested "body" key, and "body" spelled in a string
        b'{"body": {"model": "m", "x": {"body": 1}}, "custom_id": "a", "url": "u", "method": "POST"}',
        b'{"custom_id": "a", "body": {"model": "m"}, "url": "u", "method": "POST"}',
        b'{"custom_id": "\\"body\\": {}", "method": "POST", "url": "u", "body": {"model": "m", "body": [1, {"body": 2}]}}',
        b'{"custom_id": "a", "body":\n\t{"model": "m"}\r\n}\r\n',
        b'{"custom_id": "a", "b\\u006fdy": {"model": "m"}, "z": 1}',
    ],
)
def test_any_key_order_finds_the_top_level_body(line: bytes) -> None:
    obj, raw = parse_request_line(line)
    assert raw is not None
    assert orjson.loads(raw) == obj["body"] == orjson.loads(line)["body"]
    assert raw in line


def test_deep_nesting_outside_the_body_is_fine_for_the_exact_scan() -> None:
    junk = b"[" * 900 + b"]" * 900
    line = b'{"body": {"model": "m"}, "junk": ' + junk + b', "custom_id": "a"}'
    obj, raw = parse_request_line(line)
    assert raw == b'{"model": "m"}' and obj["custom_id"] == "a"


def test_lines_without_a_body_or_not_objects() -> None:
    assert parse_request_line(b'{"custom_id": "a"}') == ({"custom_id": "a"}, None)
    assert parse_request_line(b"[1, 2]") == ([1, 2], None)
    for bad in (b'{"body": {"a": 1}', b'{"body": NaN}', b'{"body": "\\ud800"}', b"\xff{}", b""):
        with pytest.raises(RequestLineError):
            parse_request_line(bad)


def test_with_model_replaces_only_the_top_level_model() -> None:
    body = b'{"messages": [{"model": "inner"}], "model" : "gpt-4o-mini", "seed": 18446744073709551616}'
    out = with_model(body, orjson.loads(body), "llama-3")
    assert out == b'{"messages": [{"model": "inner"}], "model" : "llama-3", "seed": 18446744073709551616}'


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["model", "body", "messages", "x"]), _values, max_size=4),
    others=st.dictionaries(st.sampled_from(["custom_id", "method", "url", "meta"]), _values, max_size=4),
    position=st.integers(min_value=0, max_value=4),
    indent=st.sampled_from([None, 1]),
    ascii_only=st.booleans(),
)
def test_generated_lines(body: dict[str, Any], others: dict[str, Any], position: int, indent: int | None,
                         ascii_only: bool) -> None:
    items = list(others.items())
    items.insert(min(position, len(items)), ("body", body))
    text = json.dumps(dict(items), indent=indent, ensure_ascii=ascii_only).encode()
    obj, raw = parse_request_line(text)
    assert obj == orjson.loads(text)
    # (json, not orjson: orjson reads integers beyond 64 bits as floats; the bytes are exact)
    assert raw is not None and json.loads(raw) == body
    assert _scan_body_value(text) == raw  # the exact scan agrees with whichever path answered
