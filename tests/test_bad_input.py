"""A corpus of bad inputs, each with the error it must get; nothing is lost and the server stays up."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from conftest import API_KEY, Server, chat_line, jsonl, raw_request, run_batch, upload

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def _errors(batch: Any) -> list[tuple[int | None, str, str | None]]:
    return [(e.line, e.code, e.param) for e in batch.errors.data]


def test_a_100_mb_single_line(client: openai.OpenAI) -> None:
    huge = b'{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", ' \
           b'"messages": [{"role": "user", "content": "' + b"x" * (100 * 1024 * 1024) + b'"}]}}\n'
    batch = run_batch(client, jsonl([chat_line(1)]) + huge + jsonl([chat_line(3)]))
    assert _errors(batch) == [(2, "line_too_long", None)]


def test_a_million_and_one_tiny_lines(client: openai.OpenAI) -> None:
    line = b'{"custom_id":"%d","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}\n'
    data = b"".join(line % i for i in range(1_000_001))
    batch = run_batch(client, data, endpoint="/v1/embeddings", timeout=180)
    assert _errors(batch) == [(None, "too_many_tasks", None)]


def test_duplicates_far_apart(client: openai.OpenAI) -> None:
    lines = [chat_line(i) for i in range(30_000)]
    lines[29_999]["custom_id"] = "req-0"
    batch = run_batch(client, lines, timeout=120)
    assert _errors(batch) == [(30_000, "duplicate_custom_id", "custom_id")]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": 5}, "method"),
        ({"url": ["/v1/chat/completions"]}, "url"),
        ({"body": ["not", "an", "object"]}, "body"),
        ({"body": {"model": 7, "messages": [{"role": "user", "content": "x"}]}}, "body.model"),
        ({"body": {"model": "m", "messages": {"role": "user"}}}, "body.messages"),
        ({"body": {"model": "m", "messages": []}}, "body.messages"),
        ({"custom_id": ""}, "custom_id"),
        ({"custom_id": None}, "custom_id"),
    ],
)
def test_wrong_types(client: openai.OpenAI, change: dict[str, Any], expected: str) -> None:
    batch = run_batch(client, [chat_line(0), {**chat_line(1), **change}])
    assert batch.status == "failed"
    assert [(e.line, e.param) for e in batch.errors.data] == [(2, expected)]


def test_deeply_nested_garbage_in_body(client: openai.OpenAI) -> None:
    nested = "[" * 5000 + "]" * 5000
    line = '{"custom_id": "n", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", ' \
           '"messages": [{"role": "user", "content": "x"}], "junk": ' + nested + "}}"
    batch = run_batch(client, jsonl([chat_line(0)]) + line.encode() + b"\n")
    assert _errors(batch) == [(2, "invalid_json_line", None)]


def test_unknown_fields_pass_through(client: openai.OpenAI) -> None:
    line = {**chat_line(0), "extra_top_level": {"ignored": True}}
    line["body"]["provider_knob"] = {"top_k": 3}
    batch = run_batch(client, [line])
    assert batch.status == "completed" and batch.request_counts.completed == 1


def test_ids_that_do_not_exist_or_are_malformed(server: Server) -> None:
    client = server.client()
    for bad in ("file-nope", "../../etc/passwd", "file-" + "x" * 500, "%00"):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(bad)
    for bad in ("batch_nope", "batch_" + "0" * 400):
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(bad)
    status, _, raw = raw_request("GET", f"{server.base_url}/batches?limit=abc", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "limit"
    status, _, raw = raw_request("GET", f"{server.base_url}/files?order=sideways",
                                 {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "order"


def test_create_with_a_non_batch_file(client: openai.OpenAI) -> None:
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data").id
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=other, endpoint="/v1/chat/completions", completion_window="24h")
    assert exc.value.body["param"] == "input_file_id"
    assert upload(client, [chat_line(1)])  # the server is still fine
