"""SIGKILL at random points of a batch's life (upload, validating, mid-shard, finalizing,
cancelling), 20 trials: after each restart the batch reaches a terminal state, every custom_id
appears exactly once across the output and error files, and cleanup leaves no orphaned objects."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import TERMINAL, Server, chat_line, jsonl, results_by_id, until, upload, wait_terminal

PHASES = ["upload", "validating", "in_progress", "finalizing", "cancelling"]
TRIALS = 20
LINES = 3000
pytestmark = pytest.mark.both_tiers  # SQLite + local directory, and PostgreSQL + S3


def _kill_during_upload(srv: Server, rng: random.Random) -> int:
    data = jsonl([chat_line(i) for i in range(60_000)])  # ~6 MB: the upload takes a while
    client = srv.client(max_retries=0)
    thread = threading.Thread(
        target=lambda: _ignore(lambda: client.files.create(file=("big.jsonl", data), purpose="batch"))
    )
    thread.start()
    time.sleep(rng.uniform(0.0, 0.15))
    srv.kill()
    thread.join(30)
    return len(data)


def _ignore(call: Any) -> None:
    with contextlib.suppress(openai.APIError):  # the server died under it: that is the point
        call()


def _validate_on_upload(srv: Server, on: bool) -> None:
    """A batch on a file validated on upload starts in_progress: the validating phase needs the
    worker's validation, so those trials run with it off (a restart when it changes)."""
    if ("--no-validate-on-upload" not in srv.args) == on:
        return
    srv.stop()
    if on:
        srv.args.remove("--no-validate-on-upload")
    else:
        srv.args.append("--no-validate-on-upload")
    srv.start()


def _run_trial(srv: Server, phase: str, rng: random.Random) -> dict[str, Any]:
    _validate_on_upload(srv, phase != "validating")
    client = srv.client()
    if phase == "upload":
        size = _kill_during_upload(srv, rng)
        srv.start()
        for f in srv.client().files.list():  # the upload landed whole or not at all
            if f.filename == "big.jsonl":
                assert f.bytes == size
        return {"phase": phase}
    lines = [chat_line(i, x_fault="slow:3") for i in range(LINES)]
    file_id = upload(client, lines)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    if phase == "validating":
        time.sleep(rng.uniform(0.0, 0.1))
    elif phase in ("in_progress", "cancelling"):
        target = rng.randint(1, LINES // 2)
        until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= target)
        if phase == "cancelling":
            client.batches.cancel(batch.id)
            time.sleep(rng.uniform(0.0, 0.05))
    elif phase == "finalizing":
        until(lambda: client.batches.retrieve(batch.id).status in ("finalizing", *TERMINAL), interval=0.005)
    srv.kill()
    srv.start()
    client = srv.client()
    done = wait_terminal(client, batch.id, timeout=90)
    expected = "cancelled" if phase == "cancelling" else "completed"
    assert done.status == expected, (phase, done.status)
    outputs, errors = results_by_id(client, done)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(LINES)}
    assert done.request_counts.completed == len(outputs) and done.request_counts.failed == len(errors)
    return {"phase": phase, "status": done.status}


def _cleanup_leaves_no_orphans(srv: Server) -> None:
    srv.stop()
    tier_flags = [a for i, a in enumerate(srv.args) if a in ("--database-url", "--storage-url")
                  or (i and srv.args[i - 1] in ("--database-url", "--storage-url"))]
    subprocess.run(
        [sys.executable, "-m", "overnight", "cleanup", "--data-dir", str(srv.data_dir), "--orphan-age-seconds", "0",
         *tier_flags],
        check=True, capture_output=True,
    )
    files = srv.file_store()
    later = time.time() + 60
    assert list(files.list_keys("results/", later)) == [], "results objects of finished batches remain"
    assert files.abort_stale_uploads(later) == 0, "unfinished uploads (temp files, multipart uploads) remain"
    srv.start()
    client = srv.client()
    listed = {f.id for f in client.files.list()}
    stored = {key.removeprefix("files/") for key in files.list_keys("files/", later)}
    assert stored == listed, "every stored object is a listed file and vice versa"


@pytest.mark.parametrize("seed", [20260])
def test_sigkill_at_random_points(make_server: Any, seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    srv = make_server("--shard-lines", "100", "--max-shards", "4")
    outcomes = []
    for trial in range(TRIALS):
        phase = PHASES[trial % len(PHASES)]
        outcomes.append(_run_trial(srv, phase, rng))
    assert len(outcomes) == TRIALS
    _cleanup_leaves_no_orphans(srv)
