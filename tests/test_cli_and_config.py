"""The command line and configuration: generated keys, keys from the environment, `overnight run`,
aliases and upstream API keys from a config file."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
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


def _run(tmp_path: Path, upstream: Upstream, *flags: str, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overnight", "run", "--upstream", f"*={upstream.base_url}", "--no-embedded", *flags],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
    )


def test_overnight_run_refuses_what_it_cannot_use_before_running(tmp_path: Path, upstream: Upstream) -> None:
    """A results path that cannot be written is found before the batch runs (it was found after,
    hours of work thrown away with the scratch directory); a bad input file is one error line, not
    a traceback; a run without a data dir leaves no ./data behind."""
    (tmp_path / "in.jsonl").write_bytes(jsonl([chat_line(0)]))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    kept = tmp_path / "kept"
    for target in ("missing-dir/out.jsonl", "."):
        result = _run(tmp_path, upstream, "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / target),
                      "--data-dir", str(kept))
        assert result.returncode == 2 and "error: cannot write" in result.stderr, result.stderr[-2000:]
        assert not (kept / "overnight.db").exists()  # refused before anything was built
    work = tmp_path / "work"
    work.mkdir()
    result = _run(tmp_path, upstream, "-i", str(tmp_path / "empty.jsonl"), "-o", "out.jsonl", cwd=work)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(work.iterdir()) == []  # no ./data, no output file
    result = _run(tmp_path, upstream, "-i", str(tmp_path / "in.jsonl"), "-o", "out.jsonl", "--database-url",
                  f"sqlite:///{tmp_path / 'shared.db'}", cwd=work)
    assert result.returncode == 2 and "own SQLite database" in result.stderr, result.stderr[-2000:]


def test_overnight_run_writes_one_file_when_output_and_errors_name_it(tmp_path: Path, upstream: Upstream) -> None:
    lines = [chat_line(i) for i in range(3)]
    lines[1]["body"]["x_fault"] = "400"
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    result = _run(tmp_path, upstream, "-i", "in.jsonl", "-o", "out.jsonl", "--errors", str(tmp_path / "out.jsonl"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["req-0", "req-1", "req-2"]  # the second open truncated it
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_overnight_run_that_expires_says_so(tmp_path: Path, upstream: Upstream) -> None:
    """A configured deadline that passes: the lines that ran and the `batch_expired` ones are
    written, and the exit status is 1 (it was 0, as if every line had run)."""
    lines = [chat_line(i, x_fault="slow:1500") for i in range(12)]
    (tmp_path / "in.jsonl").write_bytes(jsonl(lines))
    result = _run(tmp_path, upstream, "-i", "in.jsonl", "-o", "out.jsonl", "--errors", "err.jsonl", "--shard-lines",
                  "3", "--max-shards", "1", "--completion-window-seconds", "2", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "expired" in result.stderr
    errors = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert errors and {e["error"]["code"] for e in errors} == {"batch_expired"}


@pytest.mark.parametrize("kept", [False, True], ids=["scratch", "data-dir"])
def test_overnight_run_stopped_by_sigterm_leaves_nothing_running_or_half_written(
    tmp_path: Path, upstream: Upstream, kept: bool
) -> None:
    """SIGTERM (a scheduler's timeout) mid-run: no output file, no partial one, the scratch
    directory removed; in a chosen data dir the batch is cancelled (it ran on in the background of
    the next run there), and it had no 24-hour deadline."""
    (tmp_path / "in.jsonl").write_bytes(jsonl([chat_line(i, x_fault="slow:3000") for i in range(40)]))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    data = tmp_path / "kept"
    flags = ["--data-dir", str(data)] if kept else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", "--upstream", f"*={upstream.base_url}", "--no-embedded",
         "-i", "in.jsonl", "-o", "out.jsonl", "--shard-lines", "4", "--max-shards", "1", *flags],
        cwd=tmp_path, env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _run_status(data if kept else next(iter(scratch.glob("overnight-run-*")), scratch)) != "in_progress":
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started its batch"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "no results were written" in stderr, stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", "tmp", *(["kept"] if kept else [])])
    assert list(scratch.iterdir()) == []
    if kept:
        with sqlite3.connect(data / "overnight.db") as db:
            status, created, expires = db.execute("SELECT status, created_at, expires_at FROM batches").fetchone()
        assert status in ("cancelling", "cancelled")
        assert expires - created > 10 * 365 * 86400  # a one-shot run has no deadline unless one is configured


def _run_status(data_dir: Path) -> str | None:
    if not (data_dir / "overnight.db").exists():
        return None
    try:
        with sqlite3.connect(data_dir / "overnight.db", timeout=0.1) as db:
            row = db.execute("SELECT status FROM batches").fetchone()
    except sqlite3.Error:  # not created yet, or busy
        return None
    return row[0] if row else None


def test_settings_that_would_hang_or_do_nothing_are_refused() -> None:
    """`--max-shards 0` claimed no shard ever (a run sat at 0 until its deadline); 0 shard lines
    quietly meant 256."""
    for flags, named in ((["--max-shards", "0"], "worker.max_shards_in_flight"),
                         (["--shard-lines", "-1"], "limits.shard_max_lines")):
        args = _parser().parse_args(["serve", *flags])
        with pytest.raises(ValueError, match=f"{named} must be at least 1"):
            settings_from(args, {})
    assert settings_from(_parser().parse_args(["serve", "--max-shards", "1"]), {}).worker.max_shards_in_flight == 1


@pytest.mark.parametrize(("embedded", "named"), [
    ("n_ctx = 16\nn_seq_max = 32", "0 tokens of context"),  # every chat line refused as too long
    ("n_ctx = 4096", "64 tokens of context"),  # n_ctx taken for a per-request size: 64 slots share it
    ("n_ctx = 1000000\nn_seq_max = 300", "at most 256"),  # llama.cpp refused it as "not enough memory?"
])
def test_embedded_slots_without_room_for_a_request_are_refused(tmp_path: Path, embedded: str, named: str) -> None:
    config = tmp_path / "overnight.toml"
    config.write_text(f"[embedded]\n{embedded}\n")
    with pytest.raises(ValueError, match=named):
        settings_from(_parser().parse_args(["serve", "--config", str(config)]), {})


def test_a_chat_model_that_is_not_a_gguf_file_is_refused_at_start(tmp_path: Path) -> None:
    """Every worker failed at its start with a traceback, and was restarted for ever, while the API
    accepted batches for the model."""
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    cases = ((tmp_path / "missing.gguf", "No such file"), (not_gguf, "is not a GGUF file"),
             (tmp_path, "Is a directory"))  # not "No such file": the path is there
    for path, says in cases:
        config = tmp_path / "overnight.toml"
        config.write_text(f'[embedded]\nchat_model_path = "{path}"\n')
        assert says in serve_refused("--config", str(config), "--data-dir", str(tmp_path / "data"))


def test_first_url_of_a_file_that_is_one_huge_line_is_read_within_a_bound(tmp_path: Path) -> None:
    """A JSON array passed as JSONL is one line: reading it whole for its url took ~12x its size."""
    import tracemalloc

    from overnight.one_shot import _first_url

    path = tmp_path / "array.json"
    path.write_bytes(b"[" + b",".join([json.dumps(chat_line(i)).encode() for i in range(40_000)]) + b"]")
    assert path.stat().st_size > 3_000_000
    tracemalloc.start()
    try:
        assert _first_url(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 1024 * 1024


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


def test_overnight_run_gives_the_embedded_engine_no_more_slots_than_the_file_has_lines(tmp_path: Path) -> None:
    """Every slot's KV cells are allocated and cleared at start: a 6-line file paid for 64 slots of
    2,048 cells (~3 GB, ~6 s of page faults on a VM) before its 0.5 s of work. Each slot keeps its
    cells, so the longest line that fits does not change."""
    from overnight.one_shot import slots_for_file
    from overnight.settings import EmbeddedSettings, Settings

    settings = Settings(embedded=EmbeddedSettings(n_ctx=64 * 2048, n_seq_max=64))
    for content, slots in [(b"a\nb\nc\n", 3), (b"a\nb\nc", 3), (b"", 1), (b"x\n" * 500, 64)]:
        (tmp_path / "in.jsonl").write_bytes(content)
        embedded = slots_for_file(settings, tmp_path / "in.jsonl").embedded
        assert (embedded.n_seq_max, embedded.n_ctx) == (slots, slots * 2048), content[:10]


def test_a_scratch_run_waits_for_its_threads_before_removing_its_directory(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped worker's thread (a lease extension, a commit) may still write into the scratch
    directory; removed while it did, the directory was left behind (once in three CI runs of the
    SIGTERM test above). Here a thread keeps writing there for a while after the worker stops."""
    import asyncio
    import contextlib
    import tempfile
    import threading

    from overnight import one_shot
    from overnight.settings import EmbeddedSettings, Settings, UpstreamSettings
    from overnight.worker.worker import Worker

    original = Worker.run
    started = threading.Event()

    async def run_then_leave_a_thread(self: Worker, stop: asyncio.Event) -> None:
        await original(self, stop)
        data_dir = Path(one_shot_dirs[0])

        def late_writes() -> None:
            started.set()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                with contextlib.suppress(OSError):  # the directory is gone
                    (data_dir / f"late-{time.monotonic_ns()}").write_bytes(b"x")

        asyncio.get_running_loop().run_in_executor(None, late_writes)  # not awaited, as a cancelled to_thread
        started.wait(5)

    one_shot_dirs: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        one_shot_dirs.append(path := mkdtemp(*args, **kwargs))
        return path

    monkeypatch.setattr(Worker, "run", run_then_leave_a_thread)
    monkeypatch.setattr(one_shot.tempfile, "mkdtemp", recording_mkdtemp)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "in.jsonl").write_bytes(jsonl([chat_line(i) for i in range(3)]))
    settings = Settings(data_dir=tmp_path / "unused", upstreams=(UpstreamSettings(base_url=upstream.base_url),),
                        embedded=EmbeddedSettings(enabled=False))
    code = asyncio.run(one_shot.run_file(settings, tmp_path / "in.jsonl", tmp_path / "out.jsonl", None, None,
                                         scratch=True))
    assert code == 0 and len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 3
    assert one_shot_dirs and list((tmp_path / "tmp").iterdir()) == []
