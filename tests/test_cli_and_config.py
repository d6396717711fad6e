"""The command line and configuration: generated keys, keys from the environment, `overnight run`,
aliases and upstream API keys from a config file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import (
    Server,
    Upstream,
    chat_line,
    jsonl,
    results_by_id,
    run_batch,
    serve_refused,
    upload,
    wait_terminal,
)
from overnight.cli import _parser, settings_from
from overnight.settings import HttpSettings


def test_generated_key_is_printed_once_stored_hashed_and_revoked_by_configured_keys(tmp_path: Path, upstream: Upstream) -> None:
    srv = Server(tmp_path / "data", ["--upstream", f"*={upstream.base_url}", "--no-embedded"]).start()
    try:
        key = re.search(r"sk-overnight-[\w-]+", srv.log.read_text())
        assert key is not None
        assert run_batch(srv.client(key.group(0)), [chat_line(1)]).status == "completed"
        srv.stop()
        srv.start()  # the same key works after a restart and is not printed again
        assert len(re.findall(r"sk-overnight-[\w-]+", srv.log.read_text())) == 1
        assert srv.client(key.group(0)).batches.list().data
        with pytest.raises(openai.AuthenticationError):
            srv.client("sk-overnight-guess").batches.list()
        stored = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("overnight.db*"))
        assert key.group(0).encode() not in stored  # only its hash is kept
        # Configuring keys revokes the created one: it was a stand-in until then.
        srv.stop()
        srv.args = [*srv.args, "--api-key", "sk-mine"]
        srv.start()
        with pytest.raises(openai.AuthenticationError):
            srv.client(key.group(0)).batches.list()
        assert srv.client("sk-mine").batches.list().data == []
        assert "created on first start is no longer accepted" in srv.log.read_text()
    finally:
        srv.stop()


def test_keys_from_the_environment(tmp_path: Path, upstream: Upstream, monkeypatch: Any) -> None:
    srv = Server(tmp_path / "data", ["--upstream", f"*={upstream.base_url}", "--no-embedded"])
    monkeypatch.setenv("OVERNIGHT_API_KEYS", "sk-env-one, sk-env-two")
    srv.start()  # the server process inherits the environment
    try:
        assert srv.client("sk-env-two").files.list() is not None
        with pytest.raises(openai.AuthenticationError):
            srv.client("sk-env-three").files.list()
    finally:
        srv.stop()


def test_overnight_run_writes_outputs_and_errors(tmp_path: Path, upstream: Upstream) -> None:
    lines = [chat_line(i) for i in range(300)]
    lines[7]["body"]["x_fault"] = "400"
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "run", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
         "--errors", str(tmp_path / "err.jsonl"), "--upstream", f"*={upstream.base_url}", "--no-embedded"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Fatal Python error" not in result.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(300) if i != 7]
    assert [x["custom_id"] for x in err] == ["req-7"]
    assert "299 completed, 1 failed" in result.stderr


def test_overnight_run_reports_validation_errors(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "in.jsonl").write_bytes(jsonl([chat_line(0), chat_line(0)]))
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "run", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"),
         "--upstream", f"*={upstream.base_url}", "--no-embedded", "--data-dir", str(tmp_path / "kept")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "line 2: duplicate_custom_id" in result.stderr
    assert (tmp_path / "kept" / "overnight.db").is_file()  # a chosen data dir is kept, not a scratch one


def test_aliases_and_upstream_keys_from_config(tmp_path: Path, workdir: Path, make_server: Any) -> None:
    guarded = Upstream(workdir, "--api-key", "upstream-secret")
    try:
        config = tmp_path / "overnight.toml"
        config.write_text(
            "[[upstreams]]\n"
            f'base_url = "{guarded.base_url}"\n'
            'api_key = "upstream-secret"\n'
            'models = ["llama-*"]\n'
            "[[upstreams]]\n"
            f'base_url = "{guarded.base_url}"\n'
            'models = ["keyless-*"]\n'
            "[aliases]\n"
            '"gpt-4o-mini" = "llama-3-8b"\n'
        )
        client = make_server("--config", str(config), "--no-fallback", routes=()).client()
        done = run_batch(client, [chat_line(1, model="gpt-4o-mini"), chat_line(2, model="keyless-model")])
        outputs, errors = results_by_id(client, done)
        assert outputs["req-1"]["response"]["body"]["model"] == "llama-3-8b"  # the alias reached the upstream
        assert errors["req-2"]["response"]["status_code"] == 401  # no key configured for that route
    finally:
        guarded.stop()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_keys_and_bodies_never_reach_the_log(make_server: Any, log_format: str) -> None:
    srv = make_server("--shard-lines", "5", "--log-format", log_format)
    client = srv.client()
    secret_line = chat_line(1)
    secret_line["body"]["messages"][0]["content"] = "TOP-SECRET-PROMPT-4711"
    failing = chat_line(2, x_fault="400")
    failing["body"]["messages"][0]["content"] = "ANOTHER-SECRET-8812"
    done = run_batch(client, [secret_line, failing])
    assert done.status == "completed"
    with pytest.raises(openai.AuthenticationError):
        srv.client("sk-wrong-key-should-not-be-logged").batches.list()
    srv.stop()  # flush everything the server had to say
    log = srv.log.read_text()
    for secret in ("TOP-SECRET-PROMPT-4711", "ANOTHER-SECRET-8812", "sk-test-alice", "sk-wrong-key-should-not"):
        assert secret not in log
    if log_format == "json":  # every line is an object, and the batch's lines were logged
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert any(entry.get("batch_id") == done.id for entry in entries)


def test_worker_inside_the_api_process(make_server: Any) -> None:
    srv = make_server("--workers", "0")
    assert not (Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split())
    done = run_batch(srv.client(), [chat_line(i) for i in range(50)])
    assert done.status == "completed" and done.request_counts.completed == 50


def test_api_only_server_with_a_separate_worker(make_server: Any, upstream: Upstream) -> None:
    srv = make_server("--no-worker")
    client = srv.client()
    batch = client.batches.create(input_file_id=upload(client, [chat_line(1)]), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    waiting = client.batches.retrieve(batch.id)  # validated on upload, planned, and nobody works on it yet
    assert waiting.status == "in_progress" and waiting.request_counts.completed == 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "overnight", "worker", "--data-dir", str(srv.data_dir), "--no-embedded",
         "--upstream", f"*={upstream.base_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        done = wait_terminal(client, batch.id, timeout=60)
        assert done.status == "completed" and done.request_counts.completed == 1
    finally:
        worker.terminate()
        worker.wait(30)


def test_http_limits_from_flags_and_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "http.toml"
    config.write_text("[http]\nheader_timeout_seconds = 3\nmax_header_bytes = 8192\nauth_failure_burst = 0\n"
                      "auth_failure_addresses = 500\n")
    args = _parser().parse_args(["serve", "--config", str(config), "--body-idle-timeout", "2.5",
                                 "--auth-failures-per-second", "4"])
    assert settings_from(args, {}).http == HttpSettings(
        header_timeout_seconds=3, body_idle_timeout_seconds=2.5, max_header_bytes=8192, auth_failure_burst=0,
        auth_failures_per_second=4, auth_failure_addresses=500,
    )
    assert settings_from(_parser().parse_args(["serve"]), {}).http == HttpSettings()
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--no-embedded", "--header-timeout", "0")
    assert "header_timeout_seconds and body_idle_timeout_seconds must be above 0" in stderr
    stderr = serve_refused("--data-dir", str(tmp_path / "data"), "--no-embedded", "--api-key", "k" * 1025)
    assert "longer than 1024 characters" in stderr


def test_settings_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    """Exit status 2 and a message naming the setting, no traceback (serve_refused checks both)."""
    config = tmp_path / "bad.toml"
    config.write_text('api_keys = "sk-team-a"\n')
    data = ["--data-dir", str(tmp_path / "data"), "--no-embedded"]
    assert "api_keys must be a list" in serve_refused(*data, "--config", str(config))
    broken = _written(tmp_path / "broken.toml", "[limits\n")
    assert "is not valid TOML" in serve_refused(*data, "--config", str(broken))
    # no worker at all, while /health said 200 and batches sat in validating
    assert "--workers: expected 0 or more, not -1" in serve_refused(*data, "--workers", "-1")
    # a refill rate of 0 turned the throttle off instead of never refilling it
    assert "auth_failures_per_second must be above 0" in serve_refused(*data, "--auth-failures-per-second", "0")


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cleanup_with_an_orphan_age_deletes_what_two_looks_find_unnamed(tmp_path: Path) -> None:
    """`overnight cleanup` beside a running server: an old object no row names is an orphan only if
    a second look (after the commit that would name it) still finds it unnamed."""
    from overnight.files.local import LocalFileStore

    data = tmp_path / "data"
    files = LocalFileStore(data)
    with files.writer("files/file-orphan") as writer:
        writer.write(b"left by a crash\n")
    then = time.time() - 7200
    os.utime(data / "blobs" / "files" / "file-orphan", (then, then))
    done = subprocess.run([sys.executable, "-m", "overnight", "cleanup", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "removed 1 objects" in done.stderr
    assert not files.exists("files/file-orphan")
