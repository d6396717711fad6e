"""Result lines and usage totals: the upstream's body passes through byte for byte when it is
compact, and is serialized again when it is not; usage in either shape adds up."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from overnight.batches.results import response_line
from overnight.engines.upstream import _response
from overnight.store.records import ShardResult

BODY = {"id": "cmpl-1", "model": "m", "choices": [{"index": 0, "text": "caf\u00e9 \u2615"}], "x": 1.0e-7}


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps(BODY),
        b'{ "id" : "cmpl-1", "model": "m", "choices": [{"index": 0, "text": "caf\\u00e9 \\u2615"}], "x": 1e-07 }',
        orjson.dumps(BODY) + b"\n",  # a trailing newline, as Go's json.Encoder writes: passed through
        orjson.dumps(BODY, option=orjson.OPT_INDENT_2),  # line breaks: must not reach the JSONL file
        b'{"id":"cmpl-1",\r"model":"m","choices":[{"index":0,"text":"caf\xc3\xa9 \xe2\x98\x95"}],"x":1e-7}',
    ],
)
def test_an_upstream_body_lands_on_one_line_and_means_the_same(raw: bytes) -> None:
    response = _response(200, raw, "req_1")
    assert response.body == BODY
    line = response_line("batch_req_1", "c1", 200, "req_1", response.body, response.raw)
    assert b"\n" not in line and b"\r" not in line
    parsed = orjson.loads(line)
    assert parsed["response"]["body"] == BODY
    assert parsed == orjson.loads(response_line("batch_req_1", "c1", 200, "req_1", BODY))
    if b"\n" not in raw.strip() and b"\r" not in raw:
        assert response.raw is not None and raw.strip() in line  # passed through as sent


def test_a_non_json_upstream_body_becomes_an_error_body() -> None:
    response = _response(502, b"<html>Bad Gateway</html>", None)
    assert response.raw is None and response.body is not None
    assert "non-JSON body: <html>Bad Gateway</html>" in response.body["error"]["message"]


def test_usage_of_either_shape_adds_up() -> None:
    result = ShardResult("k")
    result.add_usage({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4},
                      "completion_tokens_details": {"reasoning_tokens": 2}})
    result.add_usage({"input_tokens": "3", "output_tokens": 1, "input_tokens_details": {"cached_tokens": None},
                      "output_tokens_details": {"reasoning_tokens": 1}})
    result.add_usage({"prompt_tokens": 7, "total_tokens": 7})  # embeddings: no completion tokens
    result.add_usage({"prompt_tokens": None, "prompt_tokens_details": None})
    assert (result.input_tokens, result.output_tokens, result.cached_tokens, result.reasoning_tokens) == (
        20, 6, 4, 3,
    )



@pytest.mark.parametrize("bad", ["1.5", "", [1], {"n": 1}, True, float("nan"), float("inf"), 2.5, "\u00b2"])
def test_a_usage_value_that_is_not_a_count_counts_zero(bad: Any) -> None:
    """An upstream's usage is summed where it holds counts and ignored where it does not: it never
    raises (a raise made the line an engine_error though the upstream had answered)."""
    result = ShardResult("k")
    result.add_usage({"prompt_tokens": bad, "completion_tokens": 4.0, "prompt_tokens_details": {"cached_tokens": bad},
                      "completion_tokens_details": {"reasoning_tokens": bad}})
    assert (result.input_tokens, result.output_tokens, result.cached_tokens, result.reasoning_tokens) == (0, 4, 0, 0)

@pytest.mark.parametrize("custom_id", ["c1", 'quote " and \\ backslash', "caf\u00e9 \u2028 line sep \u2029", "\x00\x1f"])
def test_a_joined_line_is_the_serialized_line_byte_for_byte(custom_id: str) -> None:
    """The hot path joins bytes instead of serializing a dict; both must write the same line."""
    raw = orjson.dumps(BODY)
    joined = response_line("batch_req_1", custom_id, 404, "req_\u2028", BODY, raw)
    serialized = response_line("batch_req_1", custom_id, 404, "req_\u2028", BODY)
    assert joined == serialized
    assert b"\xe2\x80\xa8" not in joined and orjson.loads(joined)["custom_id"] == custom_id


def test_an_answer_is_its_body_as_sent_when_it_is_a_json_object() -> None:
    """Valid JSON that orjson refuses (a lone surrogate escape, a number beyond a double) passes
    through as sent; a 2xx whose body is no JSON object (cut off, NaN, a page) is a failure to
    retry, not an answer: it was counted completed with an error wrapper as its body."""
    for raw in (b'{"a": "ab\\ud83d"}', b'{"n": 1e400, "usage": {"prompt_tokens": 3}}'):
        response = _response(200, raw, "req_1")
        assert response.ok and response.raw == raw and isinstance(response.body, dict)
    for raw in (b'{"id": "chatcmpl-cut", "object": "chat.comp', b'{"x": NaN}', b"<html>login</html>", b"[1]"):
        response = _response(200, raw, "req_1")
        assert not response.ok and response.status_code is None
        assert response.error_code == "upstream_invalid_response"
