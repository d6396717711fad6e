"""Seeing batches run: GET /metrics (Prometheus text, the API and every worker process in one
scrape), JSON logs that tie an API call to its batch's worker events, and the progress fields
(`throughput`, `eta_seconds`) of an in-progress batch. Against `overnight serve --workers 2`."""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, chat_line, raw_request, results_by_id, until, upload, wait_status, wait_terminal

pytestmark = pytest.mark.both_tiers

CHAT = "/v1/chat/completions"


def scrape(srv: Server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name of each sample -> [(labels, value)], parsed by prometheus-client's own text parser."""
    status, headers, body = raw_request("GET", f"http://127.0.0.1:{srv.port}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


def test_metrics_count_a_batch_run_by_two_worker_processes(make_server: Any) -> None:
    # validated by a worker (not on upload), so that its validation is timed too
    srv = make_server("--workers", "2", "--shard-lines", "10", "--no-validate-on-upload")
    client = srv.client()
    lines = [chat_line(i) for i in range(55)] + [chat_line(100 + i, x_fault="400") for i in range(5)]
    # each retried once, then answered (fault keys of this run only: the fake upstream outlives tests)
    run = uuid.uuid4().hex
    lines += [chat_line(200 + i, x_fault="503:1", x_fault_key=f"{run}-{i}") for i in range(3)]
    file_id = upload(client, lines)
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    outputs, errors = results_by_id(client, done)
    assert (len(outputs), len(errors)) == (58, 5)

    scrape(srv)  # the last poll's request is counted just after its answer went out: let it land
    samples = scrape(srv)
    # Lines, counted at shard commits in the worker processes, match the batch's files.
    assert value(samples, "overnight_lines_total", endpoint=CHAT, outcome="completed") == 58
    assert value(samples, "overnight_lines_total", endpoint=CHAT, outcome="failed", code="http_400") == 5
    assert value(samples, "overnight_lines_total", outcome="failed") == 5
    assert value(samples, "overnight_batches_total", status="completed") == 1
    assert value(samples, "overnight_batch_duration_seconds_count", status="completed") == 1
    assert value(samples, "overnight_validation_duration_seconds_count") == 1
    assert value(samples, "overnight_finalize_duration_seconds_count") == 1
    assert value(samples, "overnight_shard_claims_total") >= 7  # 63 lines in shards of 10
    # The API's own requests, by route template (never by id).
    assert value(samples, "overnight_api_requests_total", route="/v1/files", method="POST", status="200") == 1
    assert value(samples, "overnight_api_requests_total", route="/v1/batches", method="POST", status="200") == 1
    polls = value(samples, "overnight_api_requests_total", route="/v1/batches/{batch_id}", method="GET")
    assert polls >= 1
    assert value(samples, "overnight_api_request_duration_seconds_count", route="/v1/batches/{batch_id}") == polls
    assert not [labels for labels, _ in samples["overnight_api_requests_total"] if batch.id in labels["route"]]
    # Nothing is queued once the batch is done (the gauge is read from the store at scrape time).
    assert value(samples, "overnight_queued_lines") == 0

    # Engine numbers are published at the workers' heartbeats (each under a second).
    def engines_published() -> bool:
        now = scrape(srv)
        return value(now, "overnight_upstream_request_duration_seconds_count") >= 66
    until(engines_published, timeout=10)
    # Both worker processes write to the registry: each holds live gauges of its own (published at
    # its heartbeats; on SQLite a heartbeat can wait a while for the write lock).
    def gauge_pids() -> set[str]:
        (ours,) = (srv.data_dir / "metrics").glob(f"{srv.proc.pid}-*")
        files = ours.iterdir()
        return {m.group(1) for f in files if (m := re.match(r"gauge_livesum_(\d+)\.db", f.name))}

    until(lambda: len(gauge_pids()) == 2, timeout=15)
    samples = scrape(srv)
    assert value(samples, "overnight_upstream_request_duration_seconds_count") == 66  # 63 lines + 3 retries
    assert value(samples, "overnight_upstream_retries_total") == 3
    assert value(samples, "overnight_upstream_errors_total", kind="http_503") == 3
    assert value(samples, "overnight_upstream_errors_total", kind="http_400") == 5
    assert value(samples, "overnight_upstream_concurrency_allowed") >= 1
    assert value(samples, "overnight_upstream_in_flight") == 0



def test_progress_fields_and_queue_depth_while_a_batch_runs(make_server: Any) -> None:
    srv = make_server("--workers", "2", "--shard-lines", "20")
    client = srv.client()
    lines = [chat_line(i, x_fault="slow:250") for i in range(600)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
    wait_status(client, batch.id, {"in_progress"})
    seen: dict[str, Any] = {}

    def measured() -> bool:
        current = client.batches.retrieve(batch.id)
        dumped = current.model_dump()
        if current.status == "in_progress" and (dumped.get("throughput") or 0) > 0 and dumped["eta_seconds"]:
            seen.update(dumped)
            seen["queued"] = value(scrape(srv), "overnight_queued_lines")
            return True
        assert current.status == "in_progress", "the batch ended before its progress was seen"
        return False

    until(measured, timeout=30, interval=0.2)
    assert 0 < seen["throughput"] < 10_000
    done = seen["request_counts"]["completed"] + seen["request_counts"]["failed"]
    assert seen["eta_seconds"] == pytest.approx((600 - done) / seen["throughput"], rel=0.05, abs=0.2)
    assert 0 < seen["queued"] <= 600
    listed = {b.id: b.model_dump() for b in client.batches.list(limit=5).data}
    assert "throughput" in listed[batch.id] and "eta_seconds" in listed[batch.id]

    finished = wait_terminal(client, batch.id)
    assert finished.status == "completed"
    dumped = finished.model_dump()
    assert dumped["throughput"] is None and dumped["eta_seconds"] is None


def test_json_logs_tie_the_create_call_to_its_batch_in_the_workers(make_server: Any) -> None:
    srv = make_server("--workers", "2", "--log-format", "json")
    client = srv.client()
    file_id = upload(client, [chat_line(i) for i in range(30)])
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    request_id = raw.headers["x-request-id"]
    batch = raw.parse()
    assert wait_terminal(client, batch.id).status == "completed"
    srv.stop()  # flush what every process had to say

    entries = [json.loads(line) for line in srv.log.read_text().splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message", "process"} <= entry.keys()
    about = [e for e in entries if e.get("batch_id") == batch.id]
    api = [e for e in about if e["process"] == "api"]
    worker = [e for e in about if e["process"] == "worker"]
    assert api and all(e["request_id"] == request_id for e in api)
    assert worker and all(e["request_id"] == request_id for e in worker)
    assert any("in_progress (its input was validated on upload)" in e["message"] for e in api)
    assert any("finalized" in e["message"] for e in worker)


def test_a_worker_on_its_own_serves_its_metrics(make_server: Any, upstream: Any, tmp_path: Any) -> None:
    """A worker on another machine has no API process to be scraped through: `overnight worker
    --metrics-port` serves its own counts, plus the store's queue gauges."""
    import subprocess
    import sys

    from conftest import free_port, wait_http

    srv = make_server("--no-worker", "--shard-lines", "10")
    tier = [a for i, a in enumerate(srv.args) if a in ("--database-url", "--storage-url")
            or (i and srv.args[i - 1] in ("--database-url", "--storage-url"))]
    port = free_port()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "overnight", "worker", "--data-dir", str(srv.data_dir), "--no-embedded",
         "--upstream", f"*={upstream.base_url}", "--metrics-port", str(port), *tier],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", worker, log)
        client = srv.client()
        run = uuid.uuid4().hex
        lines = [chat_line(i) for i in range(27)] + [chat_line(100 + i, x_fault="400", x_fault_key=f"{run}-{i}")
                                                      for i in range(3)]
        done = wait_terminal(client, client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT,
                                                           completion_window="24h").id)
        assert done.status == "completed"

        def scrape_worker() -> dict[str, list[tuple[dict[str, str], float]]]:
            status, _, body = raw_request("GET", f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
            for family in text_string_to_metric_families(body.decode()):
                for sample in family.samples:
                    found[sample.name].append((sample.labels, sample.value))
            return found

        # The batch is completed once its finalize commits; the worker counts it a moment later.
        until(lambda: value(scrape_worker(), "overnight_batches_total", status="completed") == 1, timeout=10)
        samples = scrape_worker()
        assert value(samples, "overnight_lines_total", endpoint=CHAT, outcome="completed") == 27
        assert value(samples, "overnight_lines_total", endpoint=CHAT, outcome="failed", code="http_400") == 3
        assert value(samples, "overnight_batches_total", status="completed") == 1
        assert value(samples, "overnight_queued_lines") == 0
    finally:
        worker.terminate()
        worker.wait(20)


def test_an_unexpected_error_is_a_500_envelope_with_its_request_id_in_the_log(make_server: Any) -> None:
    """A failure no handler expects (here the database loses a table under the server) answers the
    OpenAI envelope with an x-request-id, as every response does, and the log line says which
    request it was. The 500 used to come from Starlette's outermost middleware, outside the one
    that adds the id (and after the id was unbound from the log)."""
    import openai
    import sqlalchemy as sa

    srv = make_server("--log-format", "json")
    url = srv.args[srv.args.index("--database-url") + 1] if "--database-url" in srv.args else \
        f"sqlite:///{srv.data_dir / 'overnight.db'}"
    engine = sa.create_engine(url)
    client = srv.client(max_retries=0)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE batches RENAME TO batches_away"))
        with pytest.raises(openai.InternalServerError) as exc:
            client.batches.list()
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE batches_away RENAME TO batches"))
        engine.dispose()
    request_id = exc.value.request_id
    assert request_id is not None and request_id.startswith("req_")
    assert exc.value.body["type"] == "server_error" and "check the server log" in exc.value.message
    client.batches.list()  # the server carries on
    srv.stop()
    logged = [json.loads(line) for line in srv.log.read_text().splitlines() if line.strip()]
    assert any(e["message"].startswith("unhandled error") and e.get("request_id") == request_id for e in logged)
