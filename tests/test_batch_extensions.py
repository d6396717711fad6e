"""overnight's extensions to the Batch API, end to end with the official SDK where it reaches and
plain HTTP where it does not: results while running, retries and joined results, completion
windows with deadline-aware scheduling, and the outcome summary of a finished batch."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import openai
import pytest

from conftest import (
    ADMIN_KEY,
    API_KEY,
    Server,
    chat_line,
    raw_request,
    read_jsonl,
    results_by_id,
    run_batch,
    serve_refused,
    upload,
    wait_status,
    wait_terminal,
)

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _live(server: Server, batch_id: str, kind: str, after: int = 0) -> tuple[int, dict[str, str], bytes]:
    return raw_request("GET", f"{server.base_url}/batches/{batch_id}/{kind}?after={after}", AUTH)


def _post(server: Server, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {**AUTH, "Content-Type": "application/json"} if data is not None else AUTH
    status, _, raw = raw_request("POST", f"{server.base_url}{path}", headers, data if data is not None else b"")
    return status, json.loads(raw)


def test_results_while_running_are_the_final_files_prefix(make_server: Any) -> None:
    server = make_server("--shard-lines", "5", "--max-shards", "1")
    client = server.client()
    lines = [chat_line(i, x_fault="400" if i % 7 == 3 else "slow:120") for i in range(60)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    early: dict[str, bytes] = {}
    cursor = {"output": 0, "errors": 0}
    chunks: dict[str, list[bytes]] = {"output": [], "errors": []}
    seen_partial = False
    while True:
        running = client.batches.retrieve(batch.id).status == "in_progress"
        finished = {}
        for kind in ("output", "errors"):
            status, headers, body = _live(server, batch.id, kind, cursor[kind])
            assert status == 200 and headers["content-type"].startswith("application/jsonl")
            through = int(headers["x-overnight-complete-through"])
            assert int(headers["x-overnight-next-cursor"]) == through >= cursor[kind]
            chunks[kind].append(body)
            cursor[kind] = through
            finished[kind] = headers["x-overnight-finished"] == "true"
            if running and 0 < through < 60 and kind == "output" and finished[kind] is False:
                seen_partial = True
                early.setdefault("output", b"".join(chunks["output"]))
        if all(finished.values()):
            break
        # Three requests a round: without a pause, a fast machine went past the key's 100 requests
        # a second (a 1,000-request burst) and got 429s.
        time.sleep(0.05)
    assert seen_partial, "never saw a partial result while the batch ran"
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    final_out = client.files.content(done.output_file_id).content
    final_err = client.files.content(done.error_file_id).content
    # What came while running, then resumed by cursor, is the final files exactly: each line once.
    assert b"".join(chunks["output"]) == final_out
    assert b"".join(chunks["errors"]) == final_err
    assert final_out.startswith(early["output"]) and early["output"]
    outputs, errors = results_by_id(client, done)
    assert len(outputs) + len(errors) == 60 and len(errors) == len([i for i in range(60) if i % 7 == 3])
    # After finalize, a cursor into the final file serves what follows it, in input order.
    status, headers, tail = _live(server, batch.id, "output", 30)
    tail_ids = [json.loads(x)["custom_id"] for x in tail.splitlines()]
    assert status == 200 and headers["x-overnight-finished"] == "true"
    assert tail_ids == [f"req-{i}" for i in range(30, 60) if i % 7 != 3]


def test_live_results_of_unknown_batch_and_bad_cursor(server: Server) -> None:
    status, _, raw = _live(server, "batch_nope", "output")
    assert status == 404 and json.loads(raw)["error"]["message"] == "No batch found with id 'batch_nope'."
    client = server.client()
    batch = run_batch(client, [chat_line(1)])
    status, _, raw = _live(server, batch.id, "errors", -1)
    assert status == 400 and json.loads(raw)["error"]["param"] == "after"
    running = client.batches.create(input_file_id=upload(client, [chat_line(i, x_fault="slow:300") for i in range(6)]),
                                    endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, running.id, {"in_progress"})
    status, headers, raw = _live(server, running.id, "output", 2**63)  # beyond a 64-bit integer: was a 500
    assert status == 200 and raw == b"" and headers["x-overnight-complete-through"] == "6"
    client.batches.cancel(running.id)


def test_retry_runs_failed_lines_again_and_joined_takes_the_latest(client: openai.OpenAI, server: Server) -> None:
    key = uuid.uuid4().hex  # the upstream counts "400:1" per key across batches (and tiers)
    lines = [chat_line(i) for i in range(12)]
    for i in (2, 5, 9):
        lines[i]["body"].update(x_fault="400:1", x_fault_key=f"{key}-{i}")  # fails once, then answers
    lines[11]["body"]["x_fault"] = "404"  # fails every time
    first = run_batch(client, lines)
    assert first.status == "completed" and first.request_counts.failed == 4
    status, body = _post(server, f"/batches/{first.id}/retry")
    assert status == 200, body
    retry = client.batches.retrieve(body["id"])
    assert retry.metadata == {"overnight_retry_of": first.id}
    assert retry.model_dump()["retry_of"] == first.id
    assert retry.completion_window == first.completion_window and retry.endpoint == first.endpoint
    # The new input is the original lines of the failed requests, byte for byte, without an upload.
    retried_input = read_jsonl(client, retry.input_file_id)
    assert retried_input == [lines[i] for i in (2, 5, 9, 11)]
    retry = wait_terminal(client, retry.id)
    outputs, errors = results_by_id(client, retry)
    assert set(outputs) == {"req-2", "req-5", "req-9"} and set(errors) == {"req-11"}

    status, headers, joined = raw_request("GET", f"{server.base_url}/batches/{first.id}/joined", AUTH)
    assert status == 200 and headers["x-overnight-attempts"] == "2"
    rows = [json.loads(x) for x in joined.splitlines()]
    by_id = {r["custom_id"]: r for r in rows}
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(12)]  # input order, as the files
    assert all(by_id[f"req-{i}"]["response"]["status_code"] == 200 for i in range(11))
    assert by_id["req-11"]["response"]["status_code"] == 404
    assert by_id["req-5"]["id"].startswith("batch_req_" + retry.id.removeprefix("batch_"))  # the retry's line

    # The same batch retried once more (a sibling of the first retry): joined takes every finished
    # attempt, the newest line per custom_id (it followed one chain: the newest retry and its own)
    status, body = _post(server, f"/batches/{first.id}/retry")
    assert status == 200, body
    again = wait_terminal(client, body["id"])
    status, headers, joined = raw_request("GET", f"{server.base_url}/batches/{first.id}/joined", AUTH)
    assert status == 200 and headers["x-overnight-attempts"] == "3"
    by_id = {r["custom_id"]: r for r in (json.loads(x) for x in joined.splitlines())}
    assert len(by_id) == 12 and by_id["req-5"]["id"].startswith("batch_req_" + again.id.removeprefix("batch_"))
    # an admin may read any key's batch but not retry it: a retry creates a batch in the owner's name
    status, _, raw = raw_request("POST", f"{server.base_url}/batches/{first.id}/retry",
                                 {"Authorization": f"Bearer {ADMIN_KEY}"}, b"")
    assert status == 404, raw
    assert [b.id for b in client.batches.list(limit=3)][:2] == [again.id, retry.id]


def test_retry_refuses_unfinished_batches_and_batches_without_failures(client: openai.OpenAI, server: Server) -> None:
    lines = [chat_line(i, x_fault="slow:300") for i in range(3)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    status, body = _post(server, f"/batches/{batch.id}/retry", {"include": ["failed", "expired"]})
    assert status == 409 and body["error"]["type"] == "invalid_request_error"
    assert "Cannot retry a batch with status" in body["error"]["message"]
    done = wait_terminal(client, batch.id)
    status, body = _post(server, f"/batches/{done.id}/retry")
    assert status == 400 and body["error"]["param"] == "include"
    status, body = _post(server, f"/batches/{done.id}/retry", {"include": ["everything"]})
    assert status == 400
    status, body = _post(server, "/batches/batch_nope/retry")
    assert status == 404


def test_retry_of_a_cancelled_batch_can_include_the_cancelled_lines(make_server: Any) -> None:
    server = make_server("--shard-lines", "2", "--max-shards", "1")
    client = server.client()
    lines = [chat_line(i, x_fault="slow:150") for i in range(20)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_status(client, batch.id, {"in_progress"})
    client.batches.cancel(batch.id)
    cancelled = wait_terminal(client, batch.id)
    assert cancelled.status == "cancelled"
    outcome = cancelled.model_dump()["outcome"]
    assert outcome["errors_by_code"]["batch_cancelled"] == outcome["failed"] > 0
    status, body = _post(server, f"/batches/{batch.id}/retry")  # only "failed": none
    assert status == 400
    status, body = _post(server, f"/batches/{batch.id}/retry", {"include": ["cancelled"]})
    assert status == 200, body
    retry = wait_terminal(client, body["id"])
    assert retry.status == "completed" and retry.request_counts.total == outcome["failed"]
    status, _, joined = raw_request("GET", f"{server.base_url}/batches/{batch.id}/joined", AUTH)
    rows = [json.loads(x) for x in joined.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(20))
    assert all(r["response"] and r["response"]["status_code"] == 200 for r in rows)


def test_outcome_counts_errors_by_code(client: openai.OpenAI) -> None:
    lines = [chat_line(i) for i in range(30)]
    for i in (1, 4, 7):
        lines[i]["body"]["x_fault"] = "400"  # invalid_value
    for i in (10, 20):
        lines[i]["body"]["x_fault"] = "404"  # model_not_found
    done = run_batch(client, lines)
    dumped = client.batches.retrieve(done.id).model_dump()
    assert dumped["outcome"] == {"completed": 25, "failed": 5,
                                 "errors_by_code": {"invalid_value": 3, "model_not_found": 2}}
    listed = {b.id: b.model_dump() for b in client.batches.list(limit=20).data}
    assert listed[done.id]["outcome"] == dumped["outcome"]
    clean = run_batch(client, [chat_line(1)])
    assert clean.model_dump()["outcome"] == {"completed": 1, "failed": 0, "errors_by_code": {}}


def test_configured_windows_and_deadline_first(make_server: Any) -> None:
    server = make_server("--completion-window", "1h=3600", "--completion-window", "7d=604800",
                         "--shard-lines", "5", "--max-shards", "1")
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=upload(client, [chat_line(0)]), endpoint="/v1/chat/completions",
                              completion_window="2h")
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["message"] == "Invalid value: '2h'. Supported values are: '24h', '1h', '7d'."
    assert error["param"] == "completion_window" and error["code"] == "invalid_value"

    slow = [chat_line(i, x_fault="slow:150") for i in range(40)]  # 8 shards each
    week = client.batches.create(input_file_id=upload(client, slow), endpoint="/v1/chat/completions",
                                 completion_window="7d")
    assert week.expires_at == week.created_at + 604800
    wait_status(client, week.id, {"in_progress"})
    hour = client.batches.create(input_file_id=upload(client, slow), endpoint="/v1/chat/completions",
                                 completion_window="1h")
    assert hour.expires_at == hour.created_at + 3600
    hour = wait_terminal(client, hour.id)
    week_then = client.batches.retrieve(week.id)
    # The 1h batch, created later, overtook the 7d one: shards are not round-robin across tiers.
    assert hour.status == "completed" and week_then.status == "in_progress"
    assert week_then.request_counts.completed < 40
    assert wait_terminal(client, week.id).status == "completed"


def test_windows_from_the_config_file(make_server: Any, tmp_path: Any) -> None:
    config = tmp_path / "windows.toml"
    config.write_text('[limits]\ncompletion_windows = {"7d" = 604800, "24h" = 7200}\n')
    client = make_server("--config", str(config)).client()
    file_id = upload(client, [chat_line(0)])
    week = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="7d")
    day = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert week.expires_at - week.created_at == 604800 and day.expires_at - day.created_at == 7200
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\ncompletion_windows = {"1h" = -5}\n')
    assert "completion window '1h' = -5" in serve_refused("--config", str(bad), "--no-embedded")
    assert "expected NAME=SECONDS" in serve_refused("--completion-window", "1h", "--no-embedded")


def test_a_batch_that_cannot_make_its_deadline_says_so(make_server: Any) -> None:
    # One line at a time, a second each: 30 lines need 30 s, the window is 20 s.
    server = make_server("--completion-window-seconds", "20", "--shard-lines", "1", "--max-shards", "1")
    client = server.client()
    lines = [chat_line(i, x_fault="slow:1000") for i in range(30)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    first = wait_status(client, batch.id, {"in_progress"})
    assert first.model_dump()["deadline_warning"] is None  # too early to judge
    deadline = first.in_progress_at + 12
    warning = None
    while warning is None and time.time() < deadline:
        warning = client.batches.retrieve(batch.id).model_dump()["deadline_warning"]
        time.sleep(0.2)
    assert warning is not None and "batch_expired" in warning, "no warning for a batch that cannot finish"
    client.batches.cancel(batch.id)
    assert wait_terminal(client, batch.id).model_dump()["deadline_warning"] is None
