"""A full disk and an unwritable data directory: clear errors, nothing half-saved, service goes on."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from conftest import Server, Upstream, chat_line, jsonl, run_batch, serve_refused, server_args

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@needs_root
def test_disk_full_upload_is_507_and_nothing_is_kept(small_disk: Path, upstream: Upstream) -> None:
    srv = Server(small_disk / "data", server_args(upstream)).start()
    try:
        client = srv.client(max_retries=0)
        big = jsonl([chat_line(i) for i in range(40_000)])  # ~4 MB > 3 MB of disk
        with pytest.raises(openai.APIStatusError) as exc:
            client.files.create(file=("big.jsonl", big), purpose="batch")
        assert exc.value.status_code == 507
        assert exc.value.body["code"] == "insufficient_storage" and "storage is full" in exc.value.message
        assert list((small_disk / "data" / "tmp").iterdir()) == []
        assert [f for f in client.files.list()] == []
        # the server keeps working once the request fits
        done = run_batch(client, [chat_line(i) for i in range(20)])
        assert done.status == "completed" and done.request_counts.completed == 20
    finally:
        srv.stop()


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    stderr = serve_refused("--data-dir", str(blocker / "data"), "--no-embedded")
    assert "not writable" in stderr and "--data-dir" in stderr


