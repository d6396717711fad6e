"""Results objects live in one directory per batch; the directory goes with its last object, and
cleanup removes the empty ones earlier versions left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import chat_line, run_batch, until, upload, wait_status, wait_terminal


def _dirs_below_namespaces(blobs: Path) -> list[str]:
    """Directories under blobs/files and blobs/results (the namespaces themselves stay)."""
    return sorted(p.relative_to(blobs).as_posix() for p in blobs.glob("*/**/*") if p.is_dir())


def test_no_empty_directories_remain_after_batches(make_server: Any) -> None:
    srv = make_server("--shard-lines", "5", "--max-shards", "4")
    client = srv.client()
    blobs = srv.data_dir / "blobs"
    ids = []
    for n in (1, 12, 23):
        ids.append(run_batch(client, [chat_line(i) for i in range(n)]).id)
    slow = upload(client, [chat_line(i, x_fault="slow:100") for i in range(60)])
    cancelled = client.batches.create(input_file_id=slow, endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, cancelled.id, {"in_progress"})
    until(lambda: client.batches.retrieve(cancelled.id).request_counts.completed >= 5)
    client.batches.cancel(cancelled.id)
    assert wait_terminal(client, cancelled.id).status == "cancelled"
    assert [client.batches.retrieve(i).status for i in ids] == ["completed"] * 3
    # finalize deletes the results objects just after it publishes the batch
    until(lambda: _dirs_below_namespaces(blobs) == [], timeout=10)
    assert not [p for p in (blobs / "results").rglob("*")]


def test_a_one_shard_batchs_output_is_its_results_object_under_files(make_server: Any) -> None:
    """A batch of one shard is completed by that shard's commit: its output file's bytes are the
    object the shard wrote under files/ (nothing under results/, no copy), served through the SDK
    in input order, and deleting the file removes them like any file's."""
    srv = make_server()
    client = srv.client()
    batch = run_batch(client, [chat_line(i) for i in range(7)])
    assert batch.status == "completed" and batch.error_file_id is None
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [obj["custom_id"] for obj in lines] == [f"req-{i}" for i in range(7)]
    blobs = srv.data_dir / "blobs"
    output = blobs / "files" / batch.output_file_id
    assert output.is_file() and output.stat().st_size == client.files.retrieve(batch.output_file_id).bytes
    assert not [p for p in (blobs / "results").rglob("*")]
    assert client.files.delete(batch.output_file_id).deleted is True
    srv.stop()
    subprocess.run(
        [sys.executable, "-m", "overnight", "cleanup", "--data-dir", str(srv.data_dir), "--no-embedded"],
        check=True, capture_output=True, timeout=60,
    )
    assert not output.exists()


def test_cleanup_removes_empty_directories_of_older_versions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    results = data / "blobs" / "results"
    for i in range(3):
        (results / f"batch_old{i}").mkdir(parents=True)
    a_while_ago = time.time() - 120
    for i in range(3):
        os.utime(results / f"batch_old{i}", (a_while_ago, a_while_ago))
    (results / "batch_fresh").mkdir()  # may be a writer's, about to receive its object
    subprocess.run(
        [sys.executable, "-m", "overnight", "cleanup", "--data-dir", str(data), "--no-embedded"],
        check=True, capture_output=True, timeout=60,
    )
    assert [p.name for p in results.iterdir()] == ["batch_fresh"]
