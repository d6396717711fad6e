"""LocalFileStore removes a directory with its last object, and a writer whose directory vanished
between its mkdir and its rename (a concurrent delete of that last object) makes it again, once."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from overnight.files import local
from overnight.files.local import LocalFileStore
from overnight.files.memory import MemoryFileStore


def _put(files: LocalFileStore, key: str, data: bytes = b"x\n") -> None:
    with files.writer(key) as out:
        out.write(data)


def test_delete_removes_the_directory_it_leaves_empty(tmp_path: Path) -> None:
    files = LocalFileStore(tmp_path)
    blobs = tmp_path / "blobs"
    _put(files, "results/batch_1/0.1.jsonl")
    _put(files, "results/batch_1/1.1.jsonl")
    _put(files, "files/file-a")
    files.delete("results/batch_1/0.1.jsonl")
    assert (blobs / "results" / "batch_1").is_dir()  # one object is left in it
    files.delete("results/batch_1/1.1.jsonl")
    assert not (blobs / "results" / "batch_1").exists()
    files.delete("files/file-a")
    files.delete("results/batch_2/0.1.jsonl")  # a missing key, in a missing directory
    # the namespaces themselves stay
    assert sorted(p.name for p in blobs.iterdir()) == ["files", "results"]
    assert list((blobs / "results").iterdir()) == [] and list((blobs / "files").iterdir()) == []


def test_writer_remakes_a_directory_that_vanished_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = LocalFileStore(tmp_path)
    directory = tmp_path / "blobs" / "results" / "batch_1"
    _put(files, "results/batch_1/0.1.jsonl")
    real = local.make_private_dirs
    calls: list[Path] = []

    def then_a_delete(path: Path) -> None:
        real(path)
        calls.append(path)
        if len(calls) == 1:  # another shard deletes the directory's last object right now
            files.delete("results/batch_1/0.1.jsonl")
            assert not directory.exists()

    monkeypatch.setattr(local, "make_private_dirs", then_a_delete)
    _put(files, "results/batch_1/1.2.jsonl", b"kept\n")
    assert calls == [directory, directory]
    assert files.read_range("results/batch_1/1.2.jsonl", 0, 100) == b"kept\n"
    assert [p.name for p in directory.iterdir()] == ["1.2.jsonl"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_writer_retries_only_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = LocalFileStore(tmp_path)
    real = local.make_private_dirs

    def always_lost(path: Path) -> None:
        real(path)
        path.rmdir()

    monkeypatch.setattr(local, "make_private_dirs", always_lost)
    with pytest.raises(FileNotFoundError):
        _put(files, "results/batch_1/0.1.jsonl")
    assert not files.exists("results/batch_1/0.1.jsonl")
    assert list((tmp_path / "tmp").iterdir()) == []  # the temp file went with the failure


def test_remove_empty_dirs_takes_only_old_empty_ones(tmp_path: Path) -> None:
    files = LocalFileStore(tmp_path)
    blobs = tmp_path / "blobs"
    _put(files, "results/batch_full/0.1.jsonl")
    for name in ("batch_old", "batch_old_nested/sub", "batch_new"):
        (blobs / "results" / name).mkdir(parents=True)
    (blobs / "files").mkdir()
    a_while_ago = time.time() - 120
    for name in ("batch_old", "batch_old_nested/sub", "batch_full"):
        os.utime(blobs / "results" / name, (a_while_ago, a_while_ago))
    assert files.remove_empty_dirs(time.time() - 60) == 2
    left = sorted(p.relative_to(blobs).as_posix() for p in blobs.rglob("*") if p.is_dir())
    # batch_old_nested changed just now (its child went), so a later pass takes it
    assert left == ["files", "results", "results/batch_full", "results/batch_new", "results/batch_old_nested"]
    assert files.remove_empty_dirs(time.time() + 1) == 2
    assert sorted(p.name for p in (blobs / "results").iterdir()) == ["batch_full"]
    assert MemoryFileStore().remove_empty_dirs(time.time()) == 0


def test_a_second_process_opening_the_store_leaves_uploads_in_flight_alone(tmp_path: Path) -> None:
    """A worker process (re)starting used to delete every temp file, killing the API process's
    uploads in flight; stale temp files are now removed by age only."""
    api = LocalFileStore(tmp_path)
    with api.writer("files/upload") as out:
        out.write(b"first half ")
        LocalFileStore(tmp_path)  # a worker process starts on the same data dir
        out.write(b"second half")
    assert api.read_range("files/upload", 0, 100) == b"first half second half"
    with api.writer("files/other") as out:
        out.write(b"x")
        assert api.abort_stale_uploads(time.time() - 3600) == 0  # young: still being written
    assert api.exists("files/other")
