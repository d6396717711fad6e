"""`overnight batch ...` as a subprocess and `overnight.client` as a library, against a real
`overnight serve`: build from prompts or records and a template, submit, wait, status, ls, cancel,
download with joined results, and the exit codes scripts test."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import API_KEY, Server, until
from overnight import client as batches

pytestmark = pytest.mark.both_tiers  # the client's calls reach the store and the file bytes

CHAT_TEMPLATE = {"model": "gpt-4o-mini", "max_tokens": 16,
                 "messages": [{"role": "system", "content": 'Answer in JSON like {"answer": 1}.'},
                              {"role": "user", "content": "{prompt}"}]}
PROMPTS = ["What is 2+2?", 'Say "hi" in {braces}', "Ünïcode ✓", "Name a colour.", "Last one"]


def batch_cli(server: Server, *args: str, key: str | None = API_KEY, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m overnight batch ARGS`, reaching `server` through the SDK's own environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_BASE_URL"] = server.base_url
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "overnight", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x.strip()]  # not splitlines: U+2028


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_build_submit_wait_status_ls_and_download(server: Server, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    (tmp_path / "template.json").write_text(json.dumps(CHAT_TEMPLATE))
    built = batch_cli(server, "build", "--prompts", str(tmp_path / "prompts.txt"), "--template",
                      str(tmp_path / "template.json"), "-o", str(tmp_path / "batch.jsonl"))
    assert built.returncode == 0, built.stderr
    lines = read_lines(tmp_path / "batch.jsonl")
    assert [x["custom_id"] for x in lines] == [f"request-{i}" for i in range(1, 6)]  # the empty line is skipped
    assert {x["url"] for x in lines} == {"/v1/chat/completions"} and {x["method"] for x in lines} == {"POST"}
    assert [x["body"]["messages"][1]["content"] for x in lines] == PROMPTS
    assert lines[1]["body"]["messages"][0] == CHAT_TEMPLATE["messages"][0] and lines[1]["body"]["max_tokens"] == 16

    out = tmp_path / "out"
    submitted = batch_cli(server, "submit", str(tmp_path / "batch.jsonl"), "--wait", "-o", str(out),
                          "--metadata", "job=nightly", "--poll-seconds", "0.2")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    assert "completed: 5 of 5 succeeded, 0 failed" in submitted.stderr
    rows = read_csv(out / "results.csv")
    assert [r["custom_id"] for r in rows] == [f"request-{i}" for i in range(1, 6)]  # input order
    assert [r["input"] for r in rows] == PROMPTS
    assert [r["answer"] for r in rows] == [f"echo: {p}" for p in PROMPTS]  # the fake upstream echoes
    assert {r["status"] for r in rows} == {"succeeded"} and all(int(r["total_tokens"]) > 0 for r in rows)
    assert len(read_lines(out / "output.jsonl")) == 5 and (out / "errors.jsonl").read_text() == ""

    status = batch_cli(server, "status", batch_id)
    assert status.returncode == 0 and "completed: 5 of 5 succeeded, 0 failed" in status.stdout
    as_json = json.loads(batch_cli(server, "status", batch_id, "--json").stdout)
    assert as_json["id"] == batch_id and as_json["metadata"] == {"job": "nightly"}
    listed = batch_cli(server, "ls", "--limit", "100")
    assert listed.returncode == 0 and any(line.startswith(f"{batch_id}  completed") for line in listed.stdout.splitlines())
    assert batch_id in [json.loads(x)["id"] for x in batch_cli(server, "ls", "--json").stdout.splitlines()]


def test_failed_lines_are_counted_and_joined_with_their_errors(server: Server, tmp_path: Path) -> None:
    records = [{"custom_id": f"q-{i}", "prompt": f"question {i}", "fault": "400" if i % 4 == 0 else "slow:1"}
               for i in range(10)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "template.json").write_text(json.dumps({**CHAT_TEMPLATE, "x_fault": "{fault}"}))
    assert batch_cli(server, "build", "--records", str(tmp_path / "records.jsonl"), "--template",
                     str(tmp_path / "template.json"), "-o", str(tmp_path / "batch.jsonl")).returncode == 0
    submitted = batch_cli(server, "submit", str(tmp_path / "batch.jsonl"))
    assert submitted.returncode == 0 and "submitted" in submitted.stderr
    batch_id = submitted.stdout.strip()

    waited = batch_cli(server, "wait", batch_id, "--poll-seconds", "0.2")
    assert waited.returncode == 1, waited.stderr  # completed, but some lines failed
    assert "completed: 7 of 10 succeeded, 3 failed (invalid_value: 3)" in waited.stderr

    out = tmp_path / "out"
    downloaded = batch_cli(server, "download", batch_id, "-o", str(out))
    assert downloaded.returncode == 1 and "3 failed (invalid_value: 3)" in downloaded.stderr
    assert sorted(x["custom_id"] for x in read_lines(out / "errors.jsonl")) == ["q-0", "q-4", "q-8"]
    assert len(read_lines(out / "output.jsonl")) == 7
    results = read_lines(out / "results.jsonl")
    assert [r["custom_id"] for r in results] == [f"q-{i}" for i in range(10)]
    failed = [r for r in results if r["status"] == "failed"]
    assert [r["custom_id"] for r in failed] == ["q-0", "q-4", "q-8"]
    assert all(r["status_code"] == 400 and r["error_code"] == "invalid_value" and r["answer"] is None
               and r["error_message"] == "injected permanent error 400" for r in failed)
    assert results[1]["answer"] == "echo: question 1" and results[1]["input"] == "question 1"
    rows = read_csv(out / "results.csv")
    assert [(r["custom_id"], r["status"], r["error_code"]) for r in rows] == [
        (r["custom_id"], r["status"], r["error_code"] or "") for r in results]


def test_answers_holding_line_separators_are_read_whole(server: Server, tmp_path: Path) -> None:
    """JSON strings may hold U+2028, U+0085 and the like unescaped (overnight writes them so): the
    client split a file's lines as str.splitlines does, cut such a line in two and stopped with a
    JSONDecodeError traceback (exit 1, as for failed lines) instead of its summary."""
    ids = ["plain", "line\u2028separator", "next\x85line"]
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {**CHAT_TEMPLATE, "messages": [{"role": "user", "content": "hi"}], "x_fault": "400"}}
             for cid in ids]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                          encoding="utf-8")
    submitted = batch_cli(server, "submit", str(tmp_path / "batch.jsonl"), "--wait", "--poll-seconds", "0.2",
                          "-o", str(tmp_path / "out"))
    assert submitted.returncode == 1 and "Traceback" not in submitted.stderr, submitted.stderr
    assert "0 of 3 succeeded, 3 failed (invalid_value: 3)" in submitted.stderr
    assert sorted(x["custom_id"] for x in read_lines(tmp_path / "out" / "errors.jsonl")) == sorted(ids)


def test_cancel_download_and_not_finished_exit_codes(make_server: Any, tmp_path: Path) -> None:
    srv = make_server("--shard-lines", "10", "--max-shards", "1")
    # 40 shards of 10 lines, one at a time, 1.5 s each: a minute of work, cancelled long before.
    (tmp_path / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in range(400)))
    (tmp_path / "template.json").write_text(json.dumps({**CHAT_TEMPLATE, "x_fault": "slow:1500"}))
    assert batch_cli(srv, "build", "--prompts", str(tmp_path / "prompts.txt"), "--template",
                     str(tmp_path / "template.json"), "-o", str(tmp_path / "batch.jsonl")).returncode == 0
    batch_id = batch_cli(srv, "submit", str(tmp_path / "batch.jsonl")).stdout.strip()
    client = srv.client()
    until(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 10)

    with ThreadPoolExecutor(3) as pool:  # three processes at once: a loaded machine starts each slowly
        early = pool.submit(batch_cli, srv, "download", batch_id, "-o", str(tmp_path / "early"))
        waiting = pool.submit(batch_cli, srv, "wait", batch_id, "--timeout", "0.3")
        status = pool.submit(batch_cli, srv, "status", batch_id).result()
        running, timed_out = early.result(), waiting.result()
    assert running.returncode == 5 and "not ready" in running.stderr
    assert timed_out.returncode == 5 and "still in_progress" in timed_out.stderr
    assert status.returncode == 0 and "in_progress: " in status.stdout and "succeeded so far" in status.stdout

    cancelled = batch_cli(srv, "cancel", batch_id, "--wait", "--poll-seconds", "0.2")
    assert cancelled.returncode == 0, cancelled.stderr
    done = client.batches.retrieve(batch_id)
    ok, failed = done.request_counts.completed, done.request_counts.failed
    assert done.status == "cancelled" and ok >= 10 and failed > 0 and ok + failed == 400
    summary = f"cancelled: {ok:,} of 400 succeeded, {failed:,} failed (batch_cancelled: {failed:,})"
    assert summary in cancelled.stderr

    out = tmp_path / "out"
    downloaded = batch_cli(srv, "download", batch_id, "-o", str(out))
    assert downloaded.returncode == 3 and summary in downloaded.stderr  # a cancelled batch did not finish its work
    rows = read_csv(out / "results.csv")
    assert [r["custom_id"] for r in rows] == [f"request-{i}" for i in range(1, 401)]
    assert sum(r["status"] == "succeeded" for r in rows) == ok
    assert {r["error_code"] for r in rows if r["status"] != "succeeded"} == {"batch_cancelled"}


def test_exit_codes_for_api_errors_usage_errors_and_rejected_batches(server: Server, tmp_path: Path) -> None:
    unknown = batch_cli(server, "status", "batch_doesnotexist")
    assert unknown.returncode == 4 and "404" in unknown.stderr and "Traceback" not in unknown.stderr
    wrong_key = batch_cli(server, "ls", key="sk-wrong")
    assert wrong_key.returncode == 4 and "401" in wrong_key.stderr
    no_key = batch_cli(server, "ls", key=None)
    assert no_key.returncode == 2 and "OPENAI_API_KEY" in no_key.stderr
    assert batch_cli(server, "status").returncode == 2  # argparse: the id is missing

    (tmp_path / "template.json").write_text(json.dumps({"model": "m", "prompt": "{topic}"}))
    (tmp_path / "prompts.txt").write_text("a\n")
    missing = batch_cli(server, "build", "--prompts", str(tmp_path / "prompts.txt"), "--template",
                        str(tmp_path / "template.json"), "-o", str(tmp_path / "b.jsonl"))
    assert missing.returncode == 2 and "{topic} has no value" in missing.stderr
    (tmp_path / "records.jsonl").write_text('{"custom_id": "a", "topic": "x"}\n{"custom_id": "a", "topic": "y"}\n')
    twice = batch_cli(server, "build", "--records", str(tmp_path / "records.jsonl"), "--template",
                      str(tmp_path / "template.json"), "-o", str(tmp_path / "b.jsonl"))
    assert twice.returncode == 2 and "'a' is used twice" in twice.stderr

    # A hand-written file the server rejects at validation: exit 3, and every error is shown.
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": CHAT_TEMPLATE}
    (tmp_path / "bad.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    rejected = batch_cli(server, "submit", str(tmp_path / "bad.jsonl"), "--wait", "--poll-seconds", "0.2")
    assert rejected.returncode == 3, rejected.stderr
    assert "failed: the batch was rejected with 1 error(s)" in rejected.stderr
    assert "line 2: duplicate_custom_id" in rejected.stderr

    finished = batches.wait(server.client(), batches.submit(server.client(), _one_line(tmp_path)).id)
    conflict = batch_cli(server, "cancel", finished.id)
    assert conflict.returncode == 4 and "409" in conflict.stderr and "completed" in conflict.stderr


def test_a_download_cut_short_leaves_no_results_file_that_looks_complete(server: Server, tmp_path: Path) -> None:
    """Files were written under their final names as they went: a join that failed part way (here
    an input file that cannot be read) left results.csv with its header and no rows, which a
    script that checks for the file took for the results. They are written aside and renamed."""
    client = server.client()
    done = batches.wait(client, batches.submit(client, _one_line(tmp_path)).id, poll_seconds=0.2)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        batches.download(client, done, out, input_path=tmp_path / "missing.jsonl")
    assert not (out / "results.csv").exists() and not (out / "results.jsonl").exists()
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "output.jsonl"]  # whole, as served
    batches.download(client, done, out)
    assert len(read_csv(out / "results.csv")) == 1 and sorted(p.name for p in out.iterdir()) == [
        "errors.jsonl", "output.jsonl", "results.csv", "results.jsonl"]


def _one_line(tmp_path: Path) -> Path:
    path = tmp_path / "one.jsonl"
    batches.write_batch_file(path, ["hello"], CHAT_TEMPLATE)
    return path


def test_library_runs_chat_completions_and_embeddings_and_reads_joined_results(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = server.client()
    count = batches.write_batch_file(tmp_path / "chat.jsonl", PROMPTS, {**CHAT_TEMPLATE, "x_fault": "400"})
    assert count == 5
    done = batches.wait(client, batches.submit(client, tmp_path / "chat.jsonl").id, poll_seconds=0.2, progress=True)
    assert "5/5" in capsys.readouterr().err  # the progress bar, on stderr
    assert done.status == "completed" and done.output_file_id is None  # every line failed
    outcome = batches.settle(client, done)
    assert outcome.summary() == "completed: 0 of 5 succeeded, 5 failed (invalid_value: 5)" and outcome.exit_code == 1
    records = list(batches.iter_results(client, done))
    assert [(r.custom_id, r.input, r.ok, r.error_code) for r in records] == [
        (f"request-{i + 1}", p, False, "invalid_value") for i, p in enumerate(PROMPTS)]

    records_in = [{"custom_id": f"doc-{i}", "text": f"text {'x' * i}"} for i in range(4)]
    batches.write_batch_file(tmp_path / "emb.jsonl", records_in, {"model": "text-embedding-3-small", "input": "{text}"},
                             "/v1/embeddings")
    done = batches.wait(client, batches.submit(client, tmp_path / "emb.jsonl").id, poll_seconds=0.2)
    results = list(batches.iter_results(client, done))
    assert [r.custom_id for r in results] == [f"doc-{i}" for i in range(4)]
    # the fake upstream's embedding: [len(text) % 7, 0.5, -0.25]
    assert [r.answer for r in results] == [[float(len(f"text {'x' * i}") % 7), 0.5, -0.25] for i in range(4)]

    batches.write_batch_file(tmp_path / "cmpl.jsonl", ["one", "two"], {"model": "gpt-3.5-turbo-instruct", "prompt": "{prompt}"})
    done = batches.wait(client, batches.submit(client, tmp_path / "cmpl.jsonl").id, poll_seconds=0.2)
    assert [(r.input, r.answer) for r in batches.iter_results(client, done)] == [("one", "echo: one"), ("two", "echo: two")]
