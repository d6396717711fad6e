"""/v1/batches: the whole lifecycle through the official SDK against a real server and upstream."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import openai
import pytest

from conftest import (
    ADMIN_KEY,
    API_KEY,
    OTHER_KEY,
    Server,
    chat_line,
    raw_request,
    read_jsonl,
    results_by_id,
    run_batch,
    until,
    upload,
    wait_status,
    wait_terminal,
)

pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3

BATCH_KEYS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage",
    "metadata", "outcome", "deadline_warning", "retry_of",  # overnight's documented extensions:
    "throughput", "eta_seconds",  # the SDK keeps extra fields
}


def test_lifecycle_outputs_errors_counts_usage(client: openai.OpenAI, server: Server) -> None:
    lines = [chat_line(i) for i in range(120)]
    for i in (3, 50, 99):
        lines[i]["body"]["x_fault"] = "400"  # a permanent upstream error: lands in the error file
    file_id = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress"  # its input was validated as it was uploaded
    assert batch.expires_at == batch.created_at + 86400
    assert batch.request_counts.total == 120 and batch.output_file_id is None
    status, _, raw = raw_request("GET", f"{server.base_url}/batches/{batch.id}",
                                 {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and set(json.loads(raw)) == BATCH_KEYS

    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    assert done.metadata == {"job": "nightly"}
    assert done.model == "gpt-4o-mini"
    assert done.request_counts.total == 120
    assert done.request_counts.completed == 117 and done.request_counts.failed == 3
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.failed_at is None and done.cancelled_at is None and done.errors is None

    outputs, errors = results_by_id(client, done)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(120)}
    assert set(errors) == {"req-3", "req-50", "req-99"}
    line = outputs["req-7"]
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 200
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: question 7"
    bad = errors["req-50"]
    assert bad["response"]["status_code"] == 400 and bad["error"] is None
    assert bad["response"]["body"]["error"]["code"] == "invalid_value"
    # files are written in input order
    out_order = [x["custom_id"] for x in read_jsonl(client, done.output_file_id)]
    assert out_order == [f"req-{i}" for i in range(120) if i not in (3, 50, 99)]
    # usage totals are the sums of the responses' usage
    usage_in = sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in outputs.values())
    usage_out = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in outputs.values())
    assert done.usage.input_tokens == usage_in and done.usage.output_tokens == usage_out
    assert done.usage.total_tokens == usage_in + usage_out
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.filename == f"{batch.id}_output.jsonl"


def test_body_passes_through_unchanged_and_lines_route_by_model(client: openai.OpenAI) -> None:
    lines = [chat_line(1, model="model-a", vendor_knob={"x": [1, 2]}), chat_line(2, model="model-b")]
    done = run_batch(client, lines)
    outputs, _ = results_by_id(client, done)
    assert outputs["req-1"]["response"]["body"]["model"] == "model-a"
    assert outputs["req-2"]["response"]["body"]["model"] == "model-b"


def test_completions_and_embeddings_endpoints(client: openai.OpenAI) -> None:
    completions = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "hi"}}
        for i in range(3)
    ]
    done = run_batch(client, completions, endpoint="/v1/completions")
    assert done.request_counts.completed == 3
    embeddings = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": ["a b", "c"]}}
        for i in range(3)
    ]
    done = run_batch(client, embeddings, endpoint="/v1/embeddings")
    outputs, _ = results_by_id(client, done)
    assert len(outputs["e1"]["response"]["body"]["data"]) == 2
    assert done.usage.input_tokens == 9


def test_all_lines_failing_still_completes_without_output_file(client: openai.OpenAI) -> None:
    done = run_batch(client, [chat_line(i, x_fault="422") for i in range(4)])
    assert done.status == "completed"
    assert done.output_file_id is None and done.error_file_id is not None
    assert done.request_counts.failed == 4 and done.request_counts.completed == 0


def test_create_parameter_errors(client: openai.OpenAI) -> None:
    file_id = upload(client, [chat_line(1)])
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"endpoint": "/v1/audio/speech"}, "endpoint", "invalid_value"),  # not a batch endpoint on OpenAI either
        ({"completion_window": "48h"}, "completion_window", "invalid_value"),
        ({"metadata": {"k": 5}}, "metadata.k", "invalid_type"),
        ({"metadata": {"k": "x" * 513}}, "metadata.k", "string_above_max_length"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65, "invalid_value"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_size"),
    ]
    for override, param, code in cases:
        args = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                **override}
        with pytest.raises(openai.BadRequestError) as exc:
            client.batches.create(**args)
        assert (exc.value.body["param"], exc.value.body["code"]) == (param, code), override
        assert exc.value.request_id and exc.value.request_id.startswith("req_")


def test_create_missing_field_and_bad_json(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    status, _, raw = raw_request("POST", f"{server.base_url}/batches", headers,
                                 json.dumps({"endpoint": "/v1/chat/completions", "completion_window": "24h"}).encode())
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "input_file_id" and error["code"] == "missing_required_parameter"
    status, _, raw = raw_request("POST", f"{server.base_url}/batches", headers, b"{nope")
    error = json.loads(raw)["error"]
    assert status == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_json" and error["param"] is None  # was the byte offset of the fault
    for body in (b"[]", b"null", b'"x"', b""):  # JSON, but not an object: was "Invalid value for 'None'"
        status, _, raw = raw_request("POST", f"{server.base_url}/batches", headers, body)
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] is None and error["message"] == "The request body must be a JSON object."


def test_create_with_missing_or_foreign_file_is_404(server: Server) -> None:
    alice, bob = server.client(API_KEY), server.client(OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        alice.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    bobs_file = upload(bob, [chat_line(1)])
    with pytest.raises(openai.NotFoundError):
        alice.batches.create(input_file_id=bobs_file, endpoint="/v1/chat/completions", completion_window="24h")


def test_list_newest_first_with_pagination(server: Server) -> None:
    client = server.client(OTHER_KEY)
    file_id = upload(client, [chat_line(1)])
    created = [
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(5)
    ]
    listed = [b.id for b in client.batches.list(limit=2)]  # auto-pagination over 2-item pages
    assert listed[:5] == list(reversed(created))
    first = client.batches.list(limit=2)
    assert first.has_more and len(first.data) == 2
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == list(reversed(created))[2:4]
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.list(after="batch_unknown")
    assert exc.value.body["param"] == "after"
    for batch_id in created:
        wait_terminal(client, batch_id)


def test_isolation_between_keys_and_admin_view(server: Server) -> None:
    alice, bob, admin = server.client(API_KEY), server.client(OTHER_KEY), server.client(ADMIN_KEY)
    file_id = upload(alice, [chat_line(1)])
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: bob.files.retrieve(file_id),
        lambda: bob.files.content(file_id),
        lambda: bob.files.delete(file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):  # 404, never 403: existence does not leak
            call()
    assert file_id not in {f.id for f in bob.files.list()}
    assert batch.id not in {b.id for b in bob.batches.list()}
    assert admin.batches.retrieve(batch.id).id == batch.id
    assert file_id in {f.id for f in admin.files.list()}
    done = wait_terminal(alice, batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)


def test_authentication_errors(server: Server) -> None:
    for key in ("sk-wrong", ""):
        status, headers, raw = raw_request(
            "GET", f"{server.base_url}/batches", {"Authorization": f"Bearer {key}"} if key else {}
        )
        error = json.loads(raw)["error"]
        assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "x-request-id" in headers
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").batches.list()


def test_unknown_route_uses_envelope(server: Server) -> None:
    status, headers, raw = raw_request("GET", f"{server.base_url}/nothing-here", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 404 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")


def test_cancel_in_progress_keeps_partial_output(make_server: Any) -> None:
    srv = make_server("--shard-lines", "10", "--max-shards", "1")
    client = srv.client()
    lines = [chat_line(i, x_fault="slow:150") for i in range(200)]
    file_id = upload(client, lines)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, batch.id, {"in_progress"})
    until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    outputs, errors = results_by_id(client, done)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(200)}
    assert len(outputs) >= 10
    cancelled = [e for e in errors.values() if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) == len(errors) > 0
    assert done.request_counts.completed == len(outputs) and done.request_counts.failed == len(errors)
    # cancelling again returns it unchanged; a finished batch answers 409, not retried by the SDK
    assert client.batches.cancel(batch.id).status == "cancelled"
    finished = run_batch(client, [chat_line(1)])
    with pytest.raises(openai.ConflictError) as exc:
        client.batches.cancel(finished.id)
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert "completed" in exc.value.message


def test_the_cancel_answer_counts_the_running_shards_progress(make_server: Any) -> None:
    """retrieve showed the lines a running shard had done (7), the cancel's answer 0 (only what
    shards had committed), and the next retrieve 7 again: counts that went backwards."""
    client = make_server("--shard-lines", "20", "--lease-seconds", "3").client()
    lines = [chat_line(i) for i in range(10)] + [chat_line(i, x_fault="slow:6000") for i in range(10, 20)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, timeout=60)  # type: ignore[union-attr]
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.request_counts is not None and cancelled.request_counts.completed >= 10
    wait_terminal(client, batch.id, timeout=120)


def test_cancel_while_validating(make_server: Any) -> None:
    srv = make_server("--no-validate-on-upload")  # the worker validates after create
    client = srv.client()
    file_id = upload(client, [chat_line(i) for i in range(20000)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled"
    outputs, errors = results_by_id(client, done)
    # Cancelled while validating, nothing was planned and both files are absent; if validation won
    # the race, every line is still reported exactly once (a few may have run before the cancel).
    assert (not outputs and not errors) or set(outputs) | set(errors) == {f"req-{i}" for i in range(20000)}
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors.values())


def test_expired_batch_keeps_finished_work(make_server: Any) -> None:
    srv = make_server("--completion-window-seconds", "3", "--shard-lines", "5", "--max-shards", "1")
    client = srv.client()
    lines = [chat_line(i, x_fault="slow:100") for i in range(300)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.expires_at == batch.created_at + 3
    done = wait_terminal(client, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    outputs, errors = results_by_id(client, done)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(300)}
    assert outputs, "finished work is kept"
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert done.request_counts.completed == len(outputs) and done.request_counts.failed == len(errors)


def test_async_client_round_trip(server: Server) -> None:
    async def scenario() -> Any:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY)
        created = await client.files.create(file=("a.jsonl", b'{"custom_id":"a","method":"POST",'
                                                  b'"url":"/v1/chat/completions","body":{"model":"m",'
                                                  b'"messages":[{"role":"user","content":"hi"}]}}\n'),
                                            purpose="batch")
        batch = await client.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        for _ in range(600):  # bounded: 30 s
            if batch.status in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
            batch = await client.batches.retrieve(batch.id)
        content = await client.files.content(batch.output_file_id)
        ids = [b.id async for b in client.batches.list(limit=3)]
        await client.close()
        return batch, content.read(), ids

    batch, content, ids = asyncio.run(scenario())
    assert batch.status == "completed" and json.loads(content)["custom_id"] == "a"
    assert batch.id in ids


def test_models_endpoint_and_openapi(server: Server) -> None:
    status, _, raw = raw_request("GET", f"{server.base_url}/models", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and json.loads(raw)["object"] == "list"
    status, _, raw = raw_request("GET", f"{server.base_url[:-3]}/openapi.json")
    paths = json.loads(raw)["paths"]
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
                 "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel", "/v1/models"):
        assert path in paths
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]


def test_request_counts_move_before_a_shard_commits(make_server: Any) -> None:
    # A longer lease than the suite's 2 s: under a loaded CI box a heartbeat can land late, the lease
    # run out and the shard start over (its progress back to 0), which is not what this test is about.
    srv = make_server("--shard-lines", "1000", "--max-shards", "1", "--lease-seconds", "10")
    client = srv.client()
    # ~3 s even at the limiter's maximum of 64 at a time: heartbeats (every second) land mid-shard
    lines = [chat_line(i, x_fault="slow:300") for i in range(600)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    seen = []
    for _ in range(20_000):  # bounded
        if (current := client.batches.retrieve(batch.id)).status in ("completed", "failed"):
            break
        seen.append(current.request_counts.completed)
    assert any(0 < n < 600 for n in seen), seen  # one 600-line shard, yet progress was visible
    assert seen == sorted(seen)
    assert current.request_counts.completed == 600


def test_rate_limit_per_key_and_body_size_limit(make_server: Any, tmp_path: Any) -> None:
    config = tmp_path / "rate.toml"
    config.write_text("[limits]\nrequests_per_minute = 60\nmax_json_body_bytes = 2048\n")
    srv = make_server("--config", str(config))
    limited = srv.client(max_retries=0)
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(30):  # burst is 10 at 60/min
            limited.batches.list()
    assert exc.value.body["code"] == "rate_limit_exceeded"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    srv.client(OTHER_KEY, max_retries=0).batches.list()  # another key has its own budget
    status, headers, raw = raw_request(
        "POST", f"{srv.base_url}/batches",
        {"Authorization": f"Bearer {OTHER_KEY}", "Content-Type": "application/json"},
        json.dumps({"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                    "metadata": {"k": "v" * 4000}}).encode(),
    )
    assert status == 413 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")
    # The same body sent chunked (no length to check up front): a 413 too, not FastAPI's 400
    # "There was an error parsing the body".
    body = json.dumps({"input_file_id": "f", "metadata": {"k": "v" * 4000}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v1/batches", body=iter([body[:1000], body[1000:]]), encode_chunked=True,
                 headers={"Authorization": f"Bearer {OTHER_KEY}", "Content-Type": "application/json"})
    answer = conn.getresponse()
    error = json.loads(answer.read())["error"]
    conn.close()
    assert answer.status == 413 and "larger than 2,048 bytes" in error["message"]
    assert answer.getheader("x-request-id", "").startswith("req_")
