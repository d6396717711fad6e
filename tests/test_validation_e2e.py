"""Every validation code, seen as a client sees it: the batch fails, nothing runs, every bad line
is reported with its 1-based line number."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from conftest import Upstream, chat_line, jsonl, run_batch, upload, wait_status, wait_terminal

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def _errors(batch: Any) -> list[tuple[int | None, str, str | None]]:
    return [(e.line, e.code, e.param) for e in batch.errors.data]


def test_every_bad_line_is_reported_and_nothing_runs(client: openai.OpenAI, upstream: Upstream) -> None:
    upstream.reset()
    good = chat_line(0)
    lines: list[Any] = [
        good,                                                              # 1 ok
        "{not json",                                                       # 2
        {k: v for k, v in chat_line(3).items() if k != "custom_id"},       # 3
        {**chat_line(4), "url": "/v1/embeddings"},                          # 4
        {**chat_line(5), "custom_id": "req-0"},                             # 5 duplicate of line 1
        chat_line(6, stream=True),                                         # 6
        {**chat_line(7), "method": "GET"},                                 # 7
        {**chat_line(8), "body": {"messages": [{"role": "user", "content": "x"}]}},  # 8 no model
        {**chat_line(9), "body": {"model": "m"}},                           # 9 no messages
        {**chat_line(10), "body": "text"},                                  # 10
        "[1, 2]",                                                          # 11
        {k: v for k, v in chat_line(12).items() if k != "body"},           # 12
        {**chat_line(13), "custom_id": 13},                                 # 13
        chat_line(14),                                                     # 14 ok
    ]
    batch = run_batch(client, lines)
    assert batch.status == "failed" and batch.failed_at is not None and batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert _errors(batch) == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "invalid_url", "url"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "streaming_unsupported", "body.stream"),
        (7, "invalid_request", "method"),
        (8, "invalid_request", "body.model"),
        (9, "invalid_request", "body.messages"),
        (10, "invalid_request", "body"),
        (11, "invalid_request", None),
        (12, "missing_required_parameter", "body"),
        (13, "invalid_request", "custom_id"),
    ]
    assert all(e.message for e in batch.errors.data)
    assert "line 1" in batch.errors.data[3].message  # says which line it duplicates
    assert upstream.stats()["requests"] == 0  # nothing ran


def test_model_not_found_with_exact_routes(make_server: Any) -> None:
    client = make_server("--no-fallback", routes=("gpt-*", "exact-model")).client()
    lines = [chat_line(1, model="gpt-4o"), chat_line(2, model="llama-3"), chat_line(3, model="exact-model")]
    batch = run_batch(client, lines)
    assert _errors(batch) == [(2, "model_not_found", "body.model")]
    assert "llama-3" in batch.errors.data[0].message
    assert run_batch(client, [lines[0], lines[2]]).status == "completed"


def test_empty_and_blank_only_files(client: openai.OpenAI) -> None:
    # Upload refuses an empty file; a file with a good first line then only blanks is fine.
    file_id = upload(client, jsonl([chat_line(1)]) + b"\n  \n\r\n")
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_terminal(client, batch.id)
    assert done.status == "completed" and done.request_counts.total == 1


def test_bom_crlf_and_missing_final_newline(client: openai.OpenAI) -> None:
    data = b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(chat_line(i)).encode() for i in range(5))
    file_id = upload(client, data)
    done = wait_terminal(client, client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.completed == 5
    # a BOM is not content: before a blank first line, or alone in a file (it was a bad first line)
    file_id = upload(client, b"\xef\xbb\xbf\n" + jsonl([chat_line(1)]))
    done = wait_terminal(client, client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert done.status == "completed" and (done.request_counts.total, done.request_counts.completed) == (1, 1)
    refused = []
    for data in (b"\r\n", b"\xef\xbb\xbf\r\n"):  # blank, and blank after a BOM: the same answer
        with pytest.raises(openai.BadRequestError) as exc:
            upload(client, data)
        refused.append((exc.value.code, exc.value.message))
    assert refused[0] == refused[1]


def test_numbers_beyond_a_double_are_valid_input(client: openai.OpenAI) -> None:
    """`1e400` is valid JSON that orjson refuses: the line was invalid_json_line and the batch
    failed. Now it is sent as written (this test upstream parses with orjson and refuses it: a
    400 from the upstream, reported as that line's answer)."""
    line = json.dumps(chat_line(1)).encode()[:-2] + b', "x_huge": 1e400}}\n'
    done = run_batch(client, line + jsonl([chat_line(2)]))  # type: ignore[arg-type]
    assert done.status == "completed" and done.request_counts.total == 2
    assert done.request_counts.completed + done.request_counts.failed == 2


def test_numbers_beyond_a_double_pass_an_alias_and_a_cancel(make_server: Any, tmp_path: Any) -> None:
    """Valid lines with `1e400`: an aliased one was an engine_error (the worker parsed it with
    orjson to splice the model), and a cancelled batch holding one never finished (finalize read
    each unrun line's custom_id with orjson, raised, and retried for ever: stuck `cancelling`)."""
    config = tmp_path / "overnight.toml"
    config.write_text('[aliases]\n"huge-alias" = "gpt-4o-mini"\n\n[limits]\nshard_max_lines = 1\n\n'
                      "[worker]\nmax_shards_in_flight = 1\n")
    client = make_server("--config", str(config)).client()
    huge = json.dumps({**chat_line(1), "custom_id": "huge"}).encode()[:-2] + b', "x_huge": 1e400}}'
    aliased = huge.replace(b'"gpt-4o-mini"', b'"huge-alias"')
    assert aliased != huge
    done = run_batch(client, aliased + b"\n")  # type: ignore[arg-type]
    [answer] = [json.loads(line) for line in client.files.content(done.error_file_id or done.output_file_id).read()
                .splitlines()]
    assert answer["custom_id"] == "huge" and answer["response"]["status_code"] == 400  # the upstream's own answer
    assert "overnight could not run" not in json.dumps(answer)

    slow = {**chat_line(0), "custom_id": "slow"}
    slow["body"]["x_fault"] = "slow:3000"
    batch = client.batches.create(input_file_id=upload(client, jsonl([slow]) + huge + b"\n" + huge.replace(
        b'"huge"', b'"huge-2"') + b"\n"), endpoint="/v1/chat/completions", completion_window="24h")  # type: ignore[arg-type]
    wait_status(client, batch.id, {"in_progress"})
    client.batches.cancel(batch.id)
    cancelled = wait_terminal(client, batch.id, 30)
    assert cancelled.status == "cancelled"
    errors = {x["custom_id"]: x for x in map(json.loads, client.files.content(cancelled.error_file_id).read()
                                             .splitlines())}
    assert {"huge", "huge-2"} <= errors.keys()
    assert errors["huge"]["error"]["code"] == "batch_cancelled"


def test_too_many_requests(make_server: Any, tmp_path: Any) -> None:
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nmax_requests_per_batch = 10\n")
    client = make_server("--config", str(config)).client()
    batch = run_batch(client, [chat_line(i) for i in range(11)])
    assert batch.status == "failed"
    assert _errors(batch) == [(None, "too_many_tasks", None)]


def test_non_utf8_line(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(1)]) + b'{"custom_id": "\xff\xfe", "method": "POST"}\n'
    batch = run_batch(client, data)  # type: ignore[arg-type]
    assert _errors(batch) == [(2, "invalid_json_line", None)]
