"""Files and directories overnight creates are private (0700 / 0600) by their explicit modes, not
only by the umask the CLI sets; tightening an older data directory touches only overnight's own
entries and follows no links."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from overnight.files.local import LocalFileStore
from overnight.files.private import tighten_data_dir
from overnight.store.records import FileRecord
from overnight.store.sql import SqlStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("loose_umask")
def test_local_store_objects_are_private(tmp_path: Path) -> None:
    files = LocalFileStore(tmp_path / "data")
    with files.writer("results/batch_1/0000000.1.jsonl") as out:
        out.write(b"x\n")
        (part,) = (tmp_path / "data" / "tmp").iterdir()
        assert _mode(part) == 0o600  # the temp file too, before it is published
    for name in ("data", "data/blobs", "data/tmp", "data/blobs/results", "data/blobs/results/batch_1"):
        assert _mode(tmp_path / name) == 0o700, name
    assert _mode(tmp_path / "data/blobs/results/batch_1/0000000.1.jsonl") == 0o600


@pytest.mark.usefixtures("loose_umask")
def test_sqlite_files_are_private(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'overnight.db'}")
    store.migrate()
    store.files.insert_file(FileRecord("file-a", "owner", "batch", "a.jsonl", 1, 0, None, "files/file-a"))
    try:
        for name in ("overnight.db", "overnight.db-wal", "overnight.db-shm"):
            assert _mode(tmp_path / name) == 0o600, name
    finally:
        store.close()


def test_tightening_an_old_data_dir_touches_only_overnights_entries(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "blobs" / "files").mkdir(parents=True)
    (data / "blobs" / "files" / "file-a").write_bytes(b"x")
    (data / "overnight.db").write_bytes(b"")
    (data / "notes.txt").write_bytes(b"someone else's")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not ours")
    (data / "blobs" / "link").symlink_to(outside)
    for path in (data, data / "blobs", data / "blobs" / "files"):
        path.chmod(0o755)
    for path in (data / "blobs" / "files" / "file-a", data / "overnight.db", data / "notes.txt", outside):
        path.chmod(0o644)

    assert tighten_data_dir(data) == 5
    assert [_mode(p) for p in (data, data / "blobs", data / "blobs" / "files")] == [0o700] * 3
    assert _mode(data / "blobs" / "files" / "file-a") == _mode(data / "overnight.db") == 0o600
    assert _mode(data / "notes.txt") == _mode(outside) == 0o644
    assert tighten_data_dir(data) == 0
