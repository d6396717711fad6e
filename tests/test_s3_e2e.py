"""`overnight serve --storage-url s3://...`: metadata in SQLite, file bytes in SeaweedFS, driven with
the official openai SDK; and SeaweedFS restarting under a running batch."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Upstream,
    chat_line,
    results_by_id,
    run_batch,
    s3_file_store,
    until,
    upload,
    wait_status,
    wait_terminal,
)
from overnight.testing.seaweedfs import SeaweedFS

MiB = 1024 * 1024


def test_a_batch_with_its_bytes_in_s3(make_server: Any, seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    prefix = f"e2e-{time.time_ns()}"
    srv = make_server("--storage-url", seaweedfs.storage_url(prefix), "--shard-lines", "7")
    client = srv.client()
    total = 40
    done = run_batch(client, [chat_line(i) for i in range(total)])
    assert done.status == "completed" and done.request_counts.completed == total
    outputs, errors = results_by_id(client, done)
    assert not errors and list(outputs) == [f"req-{i}" for i in range(total)]
    assert outputs["req-3"]["response"]["status_code"] == 200
    # A file bigger than one 8 MiB part goes up as a multipart upload and comes back byte for byte.
    big = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 200) for i in range(45_000))
    assert len(big) > 9 * MiB
    file_id = client.files.create(file=("big.jsonl", big), purpose="batch").id
    assert client.files.content(file_id).content == big
    # The bytes are in the bucket under the prefix, none in the data directory; results objects
    # of the shards are gone once the batch is finalized.
    store = s3_file_store(seaweedfs, prefix=prefix)
    keys = set(store.list_keys("", time.time() + 5))
    for fid in (done.input_file_id, done.output_file_id, file_id):
        assert f"files/{fid}" in keys
    assert not any(key.startswith("results/") for key in keys)
    assert not (srv.data_dir / "blobs").exists()
    # A deleted file's bytes go at the next garbage collection: `overnight cleanup` runs one now.
    client.files.delete(file_id)
    cleanup = subprocess.run(
        [sys.executable, "-m", "overnight", "cleanup", "--data-dir", str(srv.data_dir),
         "--storage-url", seaweedfs.storage_url(prefix)], capture_output=True, text=True, timeout=60)
    assert cleanup.returncode == 0, cleanup.stderr[-2000:]
    assert "removed 1 objects" in cleanup.stderr
    assert not store.exists(f"files/{file_id}") and store.exists(f"files/{done.output_file_id}")
    assert seaweedfs.secret_key not in cleanup.stderr + srv.log.read_text()


def test_seaweedfs_restarting_mid_batch_loses_no_line(make_server: Any, upstream: Upstream,
                                                       tmp_path: Path) -> None:
    """Stop SeaweedFS while shards are reading inputs and writing results, start it again on the
    same directory and ports: the adapter retries through the outage, and the batch completes with
    every custom_id exactly once."""
    with SeaweedFS(tmp_path / "seaweedfs") as s3:
        srv = make_server("--storage-url", s3.storage_url("restart"), "--shard-lines", "10", "--max-shards", "4")
        client = srv.client()
        total = 400
        lines = [chat_line(i, x_fault="slow:40", x_fault_key=f"s3-restart-{i}") for i in range(total)]
        file_id = upload(client, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_status(client, batch.id, {"in_progress"})
        until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 60)
        s3.stop()  # SIGTERM: S3 goes at once, the rest in about 2 s
        down = client.batches.retrieve(batch.id).request_counts
        time.sleep(1)
        s3.start()
        done = wait_terminal(client, batch.id, timeout=90)
        assert done.status == "completed", done
        assert down.completed < total, "the batch finished before the outage: nothing was tested"
        assert done.request_counts.completed == total and done.request_counts.failed == 0
        outputs, errors = results_by_id(client, done)  # asserts no duplicates
        assert not errors and list(outputs) == [f"req-{i}" for i in range(total)]
        assert "retrying for up to" in srv.log.read_text(), "no S3 call met the outage"
        srv.stop()  # before SeaweedFS goes for good (its finalize deletes results objects)


def test_a_read_resumes_when_the_server_dies_under_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """iter_chunks on a 48 MiB object, read slowly; SeaweedFS is killed after the first MiB and
    started again: the stream resumes at the byte it reached (a ranged GET pinned to the ETag) and
    every byte arrives once, in order."""
    with SeaweedFS(tmp_path / "seaweedfs") as s3:
        store = s3_file_store(s3)
        block = bytes(range(256)) * 4096  # 1 MiB
        with store.writer("files/big") as out:
            for i in range(48):
                out.write(block[i:] + block[:i])
        chunks = store.iter_chunks("files/big", chunk_size=MiB)
        got = [next(chunks)]
        restarter = threading.Thread(target=lambda: (s3.stop(graceful=False), s3.start()))
        restarter.start()
        try:
            for chunk in chunks:
                got.append(chunk)
                time.sleep(0.05)
        finally:
            restarter.join()
        assert [len(c) for c in got] == [MiB] * 48
        assert all(c == block[i:] + block[:i] for i, c in enumerate(got))
        assert "resuming" in caplog.text, "the stream never broke: nothing was tested"
