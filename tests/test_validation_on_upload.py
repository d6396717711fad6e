"""Batch inputs validated as they are uploaded: `batches.create` on a clean file answers
`in_progress` with every request counted, through /v1/files and /v1/uploads alike; a file with a
bad line, a batch on another endpoint, a server whose routing or limits changed since the upload,
and a server with `--no-validate-on-upload` go through the worker's validation as before."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from conftest import chat_line, jsonl, results_by_id, upload, wait_terminal

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def _create(client: openai.OpenAI, file_id: str, endpoint: str = "/v1/chat/completions") -> Any:
    return client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")


def _all_ran(client: openai.OpenAI, batch_id: str, total: int) -> None:
    done = wait_terminal(client, batch_id)
    assert done.status == "completed" and done.request_counts.completed == total
    outputs, errors = results_by_id(client, done)
    assert list(outputs) == [f"req-{i}" for i in range(total)] and not errors  # input order


def test_a_clean_upload_starts_at_create(client: openai.OpenAI) -> None:
    batch = _create(client, upload(client, [chat_line(i) for i in range(130)]))
    assert batch.status == "in_progress"
    assert batch.in_progress_at == batch.created_at or batch.in_progress_at == batch.created_at + 1
    assert batch.request_counts.total == 130
    _all_ran(client, batch.id, 130)


def test_a_clean_multipart_upload_starts_at_create(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i) for i in range(90)])
    up = client.uploads.create(bytes=len(data), filename="in.jsonl", mime_type="text/jsonl", purpose="batch")
    # cut mid-line: the parts are checked as one stream
    parts = [client.uploads.parts.create(up.id, data=data[i : i + 1000]).id for i in range(0, len(data), 1000)]
    done = client.uploads.complete(up.id, part_ids=parts)
    assert done.file is not None
    batch = _create(client, done.file.id)
    assert batch.status == "in_progress" and batch.request_counts.total == 90
    _all_ran(client, batch.id, 90)


def test_what_upload_validation_cannot_vouch_for_is_validated_by_the_worker(client: openai.OpenAI) -> None:
    bad = _create(client, upload(client, [chat_line(0), "{not json", chat_line(2)]))
    assert bad.status == "validating"
    failed = wait_terminal(client, bad.id)
    assert failed.status == "failed" and [(e.line, e.code) for e in failed.errors.data] == [(2, "invalid_json_line")]

    clean = upload(client, [chat_line(i) for i in range(3)])
    other_endpoint = _create(client, clean, endpoint="/v1/embeddings")  # the lines say chat completions
    assert other_endpoint.status == "validating"
    failed = wait_terminal(client, other_endpoint.id)
    assert failed.status == "failed" and "invalid_url" in {e.code for e in failed.errors.data}


def test_a_check_made_under_other_settings_is_not_trusted(make_server: Any) -> None:
    srv = make_server("--shard-lines", "10")
    client = srv.client()
    file_id = upload(client, [chat_line(i) for i in range(40)])
    srv.stop()
    srv.args[srv.args.index("--shard-lines") + 1] = "25"  # the stored plan has shards of 10
    srv.start()
    client = srv.client()
    batch = _create(client, file_id)
    assert batch.status == "validating"
    _all_ran(client, batch.id, 40)
    again = _create(client, upload(client, [chat_line(i) for i in range(40)]))  # checked under 25
    assert again.status == "in_progress"
    _all_ran(client, again.id, 40)


def test_validation_on_upload_can_be_turned_off(make_server: Any) -> None:
    client = make_server("--no-validate-on-upload").client()
    batch = _create(client, upload(client, [chat_line(i) for i in range(20)]))
    assert batch.status == "validating" and batch.request_counts.total == 0
    _all_ran(client, batch.id, 20)
