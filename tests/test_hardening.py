"""Inputs that once broke a batch, end to end through the SDK: a deeply nested line, numbers that a
re-serialization changes, line separators in answers, a deadline reached mid-shard, oversized
model names, lone surrogates in metadata."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    ADMIN_KEY,
    API_KEY,
    Server,
    chat_line,
    raw_request,
    results_by_id,
    run_batch,
    upload,
    wait_terminal,
)
from overnight import constants as C

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def _raw_line(custom_id: str, body: bytes) -> bytes:
    return (b'{"custom_id": "' + custom_id.encode() + b'", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": ' + body + b"}\n")


def test_a_deeply_nested_line_runs_once_with_the_rest(client: openai.OpenAI, upstream: Any) -> None:
    """300 levels of nesting passed validation, then failed to serialize in the worker, which retried
    the shard every lease period for 24 hours, re-sending every other line each time."""
    requests_before = upstream.stats()["requests"]
    junk = b"[" * 300 + b"]" * 300
    deep_body = b'{"model": "m", "messages": [{"role": "user", "content": "deep"}], "x_echo_raw": true, "junk": ' + junk + b"}"
    data = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(10)) + _raw_line("deep", deep_body)
    batch = client.batches.create(input_file_id=upload(client, data), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_terminal(client, batch.id, timeout=30)
    assert done.status == "completed"
    outputs, errors = results_by_id(client, done)
    assert len(outputs) == 11 and not errors
    # the upstream received the body byte for byte, and each line exactly once
    text = client.files.content(done.output_file_id).content
    assert b'"x_request":' + deep_body in text
    assert upstream.stats()["requests"] - requests_before == 11


def test_request_and_response_values_pass_through_exactly(client: openai.OpenAI) -> None:
    body = (b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x80\xa8 ok"}], '
            b'"seed": 18446744073709551616, "temperature": 1.10, "top_p": 1E-1, "x_echo_raw": true, "x_extras": true}')
    data = _raw_line("exact", body) + json.dumps(chat_line(1)).encode() + b"\n"
    batch = client.batches.create(input_file_id=upload(client, data), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_terminal(client, batch.id, timeout=30)
    assert done.status == "completed"
    raw = client.files.content(done.output_file_id).content
    # what the upstream received is the line's body as written, digits and escapes and all
    # (the raw U+2028 inside the echoed request is escaped only in the output line)
    assert body.replace(b"\xe2\x80\xa8", b"\\u2028") in raw
    # what the upstream answered comes back with its values unchanged, on one line
    assert b'"big":12345678901234567890123' in raw.replace(b" ", b"")
    assert b'"dec":1.10' in raw.replace(b" ", b"")
    assert b"\xe2\x80\xa8" not in raw and b"\xe2\x80\xa9" not in raw
    lines = raw.decode().splitlines()  # the common client loop: U+2028 would split a line here
    assert len(lines) == 2
    answer = next(json.loads(line) for line in lines if json.loads(line)["custom_id"] == "exact")
    assert answer["response"]["body"]["x_extras"]["sep"] == "a\u2028b\u2029c"


def test_a_deadline_reached_mid_shard_ends_the_batch_expired(make_server: Any) -> None:
    """Every shard was running when the window closed: its late lines came back `batch_expired`
    and the batch still ended `completed`. OpenAI (and the README) say `expired`."""
    srv = make_server("--completion-window-seconds", "4", "--shard-lines", "320")
    client = srv.client()
    # One shard of 1 s lines: at most 64 at a time (the limiter's maximum, reached within a second by
    # its slow start), so at least 5 s of work in a window of 3-4 s (created_at is whole seconds)
    lines = [chat_line(i, x_fault="slow:1000") for i in range(320)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_terminal(client, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at is not None and done.completed_at is None
    outputs, errors = results_by_id(client, done)
    assert outputs, "finished work is kept"
    assert errors and {e["error"]["code"] for e in errors.values()} == {C.BATCH_EXPIRED}
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(320)}


def test_an_oversized_model_name_is_a_line_error_not_a_cache_entry(client: openai.OpenAI) -> None:
    long_name = "m" * (C.MAX_MODEL_NAME_CHARS + 1)
    done = run_batch(client, [chat_line(0), chat_line(1, model=long_name)])
    assert done.status == "failed"
    assert done.errors is not None
    [error] = done.errors.data
    assert (error.line, error.param) == (2, "body.model")
    assert f"at most {C.MAX_MODEL_NAME_CHARS} characters" in (error.message or "")


@pytest.mark.parametrize(
    "body",
    [
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
        b'"metadata": {"k": "\\ud800"}}',
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
        b'"metadata": {"\\udfff": "v"}}',
        b'{"input_file_id": "\\ud800", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
        b'{"input_file_id": "file-x", "endpoint": "\\ud83d", "completion_window": "24h"}',
        b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
        b'"output_expires_after": {"anchor": "\\udc00", "seconds": 3600}}',
    ],
)
def test_lone_surrogates_in_a_json_body_are_a_400(server: Server, body: bytes) -> None:
    for key in (API_KEY, ADMIN_KEY):
        status, headers, answer = raw_request(
            "POST", server.base_url + "/batches",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, body,
        )
        assert status == 400, answer
        assert headers.get("x-request-id")
        error = json.loads(answer)["error"]
        assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]


_with_surrogates = st.text(st.characters(categories=["Cs", "Ll", "Nd"]), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.dictionaries(
        st.sampled_from(["input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after", "x"]),
        _with_surrogates | st.dictionaries(_with_surrogates, _with_surrogates, max_size=2),
        min_size=1,
    )
)
def test_fuzzed_bodies_with_surrogates_never_answer_500(server: Server, fields: dict[str, Any]) -> None:
    body = json.dumps({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                       **fields}).encode()  # ensure_ascii: surrogates become \udXXX escapes
    status, headers, answer = raw_request(
        "POST", server.base_url + "/batches", {"Authorization": f"Bearer {API_KEY}",
                                               "Content-Type": "application/json"}, body,
    )
    assert status in (400, 404), answer
    assert headers.get("x-request-id") and json.loads(answer)["error"]["message"]
