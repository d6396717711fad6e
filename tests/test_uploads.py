"""/v1/uploads through the official SDK against a real server: a file sent in parts, completed into
a File that a batch runs on; checksums, cancel, refusals, tenants, expiry and housekeeping."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import OTHER_KEY, Server, chat_line, jsonl, results_by_id, until, wait_terminal

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3

UPLOAD_KEYS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "file"}


def split(data: bytes, parts: int) -> list[bytes]:
    """Cut at byte offsets (mid-line, mid-character even): parts are bytes, not lines."""
    size = math.ceil(len(data) / parts)
    return [data[i : i + size] for i in range(0, len(data), size)]


def part_keys(server: Server, upload_id: str) -> list[str]:
    return list(server.file_store().list_keys(f"uploads/{upload_id}/", time.time() + 60))


def send_parts(client: openai.OpenAI, upload_id: str, chunks: list[bytes]) -> list[str]:
    return [client.uploads.parts.create(upload_id, data=chunk).id for chunk in chunks]


def new_upload(client: openai.OpenAI, size: int, purpose: Any = "batch", name: str = "big.jsonl") -> Any:
    return client.uploads.create(bytes=size, filename=name, mime_type="text/jsonl", purpose=purpose)


def test_parts_complete_into_a_file_that_runs_as_a_batch(client: openai.OpenAI, server: Server) -> None:
    data = jsonl([chat_line(i) for i in range(120)])
    chunks = split(data, 3)
    upload = new_upload(client, len(data))
    assert upload.object == "upload" and upload.id.startswith("upload_")
    assert upload.status == "pending" and upload.file is None
    assert upload.bytes == len(data) and upload.filename == "big.jsonl" and upload.purpose == "batch"
    assert upload.expires_at == upload.created_at + 3600
    assert set(upload.model_dump()) == UPLOAD_KEYS

    part = client.uploads.parts.create(upload.id, data=chunks[0])
    assert part.object == "upload.part" and part.id.startswith("part_") and part.upload_id == upload.id
    part_ids = [part.id, *send_parts(client, upload.id, chunks[1:])]
    assert len(part_keys(server, upload.id)) == 3

    done = client.uploads.complete(upload.id, part_ids=part_ids, md5=hashlib.md5(data).hexdigest())
    assert done.status == "completed" and done.id == upload.id
    assert done.file is not None and done.file.bytes == len(data) and done.file.purpose == "batch"
    assert done.file.filename == "big.jsonl"
    assert client.files.retrieve(done.file.id).bytes == len(data)
    assert client.files.content(done.file.id).read() == data
    assert part_keys(server, upload.id) == []  # the parts are gone once the File exists

    batch = client.batches.create(input_file_id=done.file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_terminal(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 120
    out, err = results_by_id(client, batch)
    assert set(out) == {f"req-{i}" for i in range(120)} and not err


def test_parts_are_assembled_in_the_order_listed(client: openai.OpenAI, server: Server) -> None:
    """Larger than an S3 multipart part (8 MiB), so the assembled File is itself a multipart
    upload there; parts sent out of order are put together in the order `part_ids` gives."""
    data = bytes(range(256)) * (9 * 4096 + 7)  # just over 9 MiB
    chunks = split(data, 3)
    upload = new_upload(client, len(data), purpose="user_data", name="blob.bin")
    last, first, middle = (client.uploads.parts.create(upload.id, data=c).id for c in (chunks[2], chunks[0], chunks[1]))
    done = client.uploads.complete(upload.id, part_ids=[first, middle, last])
    assert done.file is not None and done.file.bytes == len(data)
    with client.files.with_streaming_response.content(done.file.id) as resp:
        assert hashlib.sha256(b"".join(resp.iter_bytes())).digest() == hashlib.sha256(data).digest()


def test_sdk_chunked_helper(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i) for i in range(40)])
    done = client.uploads.upload_file_chunked(
        file=data, filename="helper.jsonl", bytes=len(data), mime_type="text/jsonl", purpose="batch",
        part_size=1000,
    )
    assert done.status == "completed" and done.file is not None
    assert client.files.content(done.file.id).read() == data


def test_md5_mismatch_is_refused_and_the_upload_stays_open(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i) for i in range(10)])
    upload = new_upload(client, len(data))
    part_ids = send_parts(client, upload.id, split(data, 2))
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=part_ids, md5=hashlib.md5(b"other").hexdigest())
    assert exc.value.status_code == 400 and exc.value.body["param"] == "md5"
    assert "md5" in exc.value.body["message"]
    done = client.uploads.complete(upload.id, part_ids=part_ids, md5=hashlib.md5(data).hexdigest().upper())
    assert done.status == "completed" and done.file is not None
    assert client.files.content(done.file.id).read() == data


def test_declared_bytes_must_match_the_parts(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i) for i in range(10)])
    upload = new_upload(client, len(data) + 1)
    part_ids = send_parts(client, upload.id, split(data, 2))
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=part_ids)
    assert f"{len(data) + 1:,}" in exc.value.body["message"] and exc.value.body["param"] == "part_ids"
    with pytest.raises(openai.BadRequestError):  # a part left out is a mismatch too
        client.uploads.complete(upload.id, part_ids=part_ids[:1])
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=[part_ids[0], part_ids[0]])
    assert exc.value.body["param"] == "part_ids"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=[*part_ids, "part_unknown"])
    assert "part_unknown" in exc.value.body["message"]


def test_a_batch_upload_that_is_not_jsonl_is_refused_at_complete(client: openai.OpenAI) -> None:
    data = b"this is not json\n"
    upload = new_upload(client, len(data))
    part_ids = send_parts(client, upload.id, [data])
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=part_ids)
    assert "Invalid file format for Batch API" in exc.value.body["message"]


def test_cancel_removes_the_parts_and_closes_the_upload(client: openai.OpenAI, server: Server) -> None:
    data = jsonl([chat_line(i) for i in range(10)])
    upload = new_upload(client, len(data))
    part_ids = send_parts(client, upload.id, split(data, 2))
    assert len(part_keys(server, upload.id)) == 2
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None and cancelled.id == upload.id
    assert part_keys(server, upload.id) == []
    assert client.uploads.cancel(upload.id).status == "cancelled"  # cancelling again answers the same
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.parts.create(upload.id, data=b"more")
    assert "cancelled" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=part_ids)
    assert "cancelled" in exc.value.body["message"]
    assert part_keys(server, upload.id) == []  # the refused part left no bytes behind


def test_a_completed_upload_takes_no_more_parts(client: openai.OpenAI, server: Server) -> None:
    data = jsonl([chat_line(i) for i in range(4)])
    upload = new_upload(client, len(data))
    part_ids = send_parts(client, upload.id, [data])
    client.uploads.complete(upload.id, part_ids=part_ids)
    for call in (lambda: client.uploads.parts.create(upload.id, data=b"x"),
                 lambda: client.uploads.complete(upload.id, part_ids=part_ids),
                 lambda: client.uploads.cancel(upload.id)):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert "already completed" in exc.value.body["message"]
    assert part_keys(server, upload.id) == []


def test_another_tenants_upload_is_not_found(client: openai.OpenAI, server: Server) -> None:
    data = jsonl([chat_line(1)])
    upload = new_upload(client, len(data))
    part_ids = send_parts(client, upload.id, [data])
    bob = server.client(OTHER_KEY)
    for call in (lambda: bob.uploads.parts.create(upload.id, data=b"x"),
                 lambda: bob.uploads.complete(upload.id, part_ids=part_ids),
                 lambda: bob.uploads.cancel(upload.id)):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["message"] == f"No such Upload object: {upload.id}"
    other = new_upload(bob, len(data))  # and a part of someone else's upload cannot be listed
    with pytest.raises(openai.BadRequestError):
        bob.uploads.complete(other.id, part_ids=part_ids)
    assert client.uploads.complete(upload.id, part_ids=part_ids).status == "completed"


def test_create_checks_its_parameters(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=10, filename="x.jsonl", mime_type="text/jsonl", purpose="nonsense")  # type: ignore[arg-type]
    assert exc.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=-1, filename="x.jsonl", mime_type="text/jsonl", purpose="batch")
    assert exc.value.body["param"] == "bytes"
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.create(bytes=1, filename="x.jsonl", mime_type="text/jsonl", purpose="batch",
                              expires_after={"anchor": "created_at", "seconds": 5})
    assert exc.value.body["param"] == "expires_after.seconds"


def test_expires_after_applies_to_the_file(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(1)])
    upload = client.uploads.create(bytes=len(data), filename="x.jsonl", mime_type="text/jsonl", purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 7200})
    done = client.uploads.complete(upload.id, part_ids=send_parts(client, upload.id, [data]))
    assert done.file is not None and done.file.expires_at == done.file.created_at + 7200


def test_limits_on_total_and_part_size(make_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nmax_file_bytes = 1000\n")
    client = make_server("--config", str(config)).client()
    with pytest.raises(openai.BadRequestError) as exc:
        new_upload(client, 1001, purpose="user_data")
    assert exc.value.body["param"] == "bytes" and "1,000" in exc.value.body["message"]
    upload = new_upload(client, 1000, purpose="user_data")
    with pytest.raises(openai.APIStatusError) as too_big:
        client.uploads.parts.create(upload.id, data=b"x" * 1001)
    assert too_big.value.status_code == 413 and too_big.value.body["param"] == "data"
    first = client.uploads.parts.create(upload.id, data=b"x" * 600).id
    with pytest.raises(openai.APIStatusError) as past:  # 600 + 600 would pass the limit
        client.uploads.parts.create(upload.id, data=b"y" * 600)
    assert past.value.status_code == 413
    second = client.uploads.parts.create(upload.id, data=b"y" * 400).id
    done = client.uploads.complete(upload.id, part_ids=[first, second])
    assert done.file is not None and client.files.content(done.file.id).read() == b"x" * 600 + b"y" * 400


def cleanup(server: Server) -> str:
    """`overnight cleanup` on the server's database and file store (what the worker's janitor runs)."""
    args = ["--data-dir", str(server.data_dir)]
    for flag in ("--database-url", "--storage-url"):
        if flag in server.args:
            args += [flag, server.args[server.args.index(flag) + 1]]
    result = subprocess.run([sys.executable, "-m", "overnight", "cleanup", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_an_upload_expires_and_housekeeping_removes_its_parts(make_server: Any) -> None:
    server = make_server("--upload-expiry-seconds", "2")
    client = server.client()
    data = jsonl([chat_line(1)])
    upload = new_upload(client, len(data))
    assert upload.expires_at == upload.created_at + 2
    part_ids = send_parts(client, upload.id, [data])
    assert len(part_keys(server, upload.id)) == 1

    def expired() -> bool:  # completing with no parts: a bytes mismatch while pending, then expired
        with pytest.raises(openai.BadRequestError) as exc:
            client.uploads.complete(upload.id, part_ids=[])
        return "expired" in exc.value.body["message"]

    until(expired, timeout=10, interval=0.2)
    for call in (lambda: client.uploads.parts.create(upload.id, data=b"x"),
                 lambda: client.uploads.complete(upload.id, part_ids=part_ids),
                 lambda: client.uploads.cancel(upload.id)):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert "expired" in exc.value.body["message"]
    # The parts stay until housekeeping comes by: the worker's janitor (at start, then once a
    # minute) or `overnight cleanup`; on a slow machine the janitor may have been first.
    if part_keys(server, upload.id):
        assert "removed 1 objects" in cleanup(server)
    assert part_keys(server, upload.id) == []
    with pytest.raises(openai.BadRequestError) as exc:
        client.uploads.complete(upload.id, part_ids=part_ids)
    assert "expired" in exc.value.body["message"]
