"""The data directory is private to the service user whatever the umask: directories 0700, files
0600 (the database with the key hashes, every input and output), and an older install's 0755/0644
is tightened when the server starts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from conftest import (
    Server,
    Upstream,
    chat_line,
    read_jsonl,
    run_batch,
    server_args,
    until,
    upload,
    wait_terminal,
)


def _modes(root: Path) -> Iterator[tuple[Path, bool, int]]:
    """(path, is_dir, permission bits) of `root` and everything under it, skipping what vanishes
    during the walk (temp files, results objects)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for path in (Path(dirpath), *(Path(dirpath, name) for name in (*dirnames, *filenames))):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            yield path, stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode)


def assert_private(root: Path) -> list[Path]:
    seen = list(_modes(root))
    loose = [f"{p} {oct(m)}" for p, is_dir, m in seen if m != (0o700 if is_dir else 0o600)]
    assert not loose, loose
    return [p for p, is_dir, _ in seen if not is_dir]


def test_data_dir_is_private_whatever_the_umask(tmp_path: Path, upstream: Upstream) -> None:
    data = tmp_path / "data"
    srv = Server(data, server_args(upstream, "--shard-lines", "5", "--max-shards", "2"), umask=0o022).start()
    try:
        client = srv.client()
        slow = upload(client, [chat_line(i, x_fault="slow:100") for i in range(40)])
        running = client.batches.create(input_file_id=slow, endpoint="/v1/chat/completions", completion_window="24h")
        until(lambda: client.batches.retrieve(running.id).request_counts.completed >= 10)
        files = assert_private(data)  # while shards write their results objects
        assert data / "overnight.db" in files and data / "overnight.db-wal" in files
        assert any(p.parent.parent == data / "blobs" / "results" for p in files)
        done = wait_terminal(client, running.id)
        assert done.status == "completed" and len(read_jsonl(client, done.output_file_id)) == 40
        client.files.create(file=("notes.txt", b"private"), purpose="user_data")
        assert run_batch(client, [chat_line(i) for i in range(12)]).status == "completed"
        files = assert_private(data)
        assert data / "overnight.db-shm" in files and len(list((data / "blobs" / "files").iterdir())) >= 5
    finally:
        srv.stop()
    assert_private(data)

    # What an older version left: everything readable by all. The next start tightens it.
    for path, is_dir, _ in list(_modes(data)):
        path.chmod(0o755 if is_dir else 0o644)
    srv.start()
    try:
        assert_private(data)
        client = srv.client()
        assert run_batch(client, [chat_line(i) for i in range(3)]).status == "completed"
        assert_private(data)
    finally:
        srv.stop()
