"""The FileStore contract, once, against every adapter: the in-memory twin, the local directory and
S3 on a real server (SeaweedFS on 127.0.0.1). S3 gets a 5 MiB part size, so the 12 MiB blob below
is a three-part multipart upload there."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import s3_file_store
from overnight.files.local import LocalFileStore
from overnight.files.memory import MemoryFileStore
from overnight.testing.seaweedfs import SeaweedFS

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryFileStore()
    elif request.param == "local":
        yield LocalFileStore(tmp_path / "data")
    else:
        seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
        yield s3_file_store(seaweedfs, part_size=PART)


def put(store: Any, key: str, data: bytes, piece: int = 7) -> int:
    with store.writer(key) as out:
        for start in range(0, len(data), piece):
            out.write(data[start : start + piece])
    return int(out.bytes_written)


def test_write_then_read_back(store: Any) -> None:
    data = b"".join(b'{"line": %d}\n' % i for i in range(100))
    assert not store.exists("files/a")
    assert put(store, "files/a", data) == len(data)
    assert store.exists("files/a")
    assert b"".join(store.iter_chunks("files/a")) == data
    assert store.read_range("files/a", 0, len(data)) == data


def test_ranged_reads(store: Any) -> None:
    data = bytes(range(256)) * 40
    put(store, "files/r", data, piece=1000)
    assert store.read_range("files/r", 100, 50) == data[100:150]
    assert store.read_range("files/r", len(data) - 10, 100) == data[-10:]  # short at the end
    assert store.read_range("files/r", len(data), 10) == b""  # at the end
    assert store.read_range("files/r", len(data) + 5, 10) == b""  # past it
    assert store.read_range("files/r", 10, 0) == b""


def test_iterate_in_chunks(store: Any) -> None:
    data = bytes(range(256)) * 1000  # 256,000 bytes
    put(store, "files/c", data, piece=10_000)
    chunks = list(store.iter_chunks("files/c", chunk_size=65_536))
    assert b"".join(chunks) == data
    assert all(len(c) <= 65_536 for c in chunks) and len(chunks) == 4


def test_a_missing_key(store: Any) -> None:
    assert not store.exists("files/none")
    store.delete("files/none")  # not an error
    with pytest.raises(FileNotFoundError):
        list(store.iter_chunks("files/none"))
    with pytest.raises(FileNotFoundError):
        store.read_range("files/none", 0, 10)


def test_delete(store: Any) -> None:
    put(store, "results/b1/0000000.1.jsonl", b"x\n")
    put(store, "results/b1/0000001.1.jsonl", b"y\n")
    store.delete("results/b1/0000000.1.jsonl")
    assert not store.exists("results/b1/0000000.1.jsonl")
    assert store.exists("results/b1/0000001.1.jsonl")
    store.delete("results/b1/0000000.1.jsonl")  # again: still fine


def _age(store: Any, key: str, seconds: float) -> None:
    then = time.time() - seconds
    if isinstance(store, LocalFileStore):
        os.utime(store.root / "blobs" / key, (then, then))
    elif isinstance(store, MemoryFileStore):
        store.blobs[key] = (store.blobs[key][0], then)


def test_a_copy_is_published_whole_and_outlives_its_source(store: Any) -> None:
    data = b"".join(b'{"line": %d}\n' % i for i in range(1000))
    put(store, "results/b/0000000.1.jsonl", data, piece=4096)
    _age(store, "results/b/0000000.1.jsonl", 7200)  # committed long ago (S3 objects cannot be aged)
    store.copy("results/b/0000000.1.jsonl", "files/out")
    # As just written: housekeeping must not take it for an hour-old orphan before its row commits.
    assert list(store.list_keys("files/", time.time() - 60)) == []
    store.delete("results/b/0000000.1.jsonl")
    assert b"".join(store.iter_chunks("files/out")) == data
    assert not store.exists("results/b/0000000.1.jsonl")
    with pytest.raises(FileNotFoundError):
        store.copy("results/b/0000000.1.jsonl", "files/other")  # a missing source


def test_list_keys_by_prefix_and_age(store: Any) -> None:
    before = time.time() - 2  # object stores keep whole seconds of LastModified
    for key in ("files/f1", "files/f2", "results/b/0.1.jsonl"):
        put(store, key, b"data\n")
    later = time.time() + 2
    assert sorted(store.list_keys("files/", later)) == ["files/f1", "files/f2"]
    assert sorted(store.list_keys("results/", later)) == ["results/b/0.1.jsonl"]
    assert list(store.list_keys("files/", before)) == []  # none was written that long ago
    store.delete("files/f1")
    assert list(store.list_keys("files/", later)) == ["files/f2"]


def test_a_listing_goes_on_while_what_it_lists_is_deleted(store: Any) -> None:
    """Housekeeping deletes as it lists, and batches finish meanwhile: objects (and their
    directories) that go away under a listing are skipped. On the local store a vanished
    directory or file ended the whole listing with FileNotFoundError (rglob, then stat)."""
    keys = [f"results/b{i}/0000000.1.jsonl" for i in range(5)]
    for key in keys:
        put(store, key, b"x\n")
    listing = store.list_keys("results/", time.time() + 2)
    first = next(listing)
    for key in keys:
        store.delete(key)
    store.remove_empty_dirs(time.time() + 2)
    assert {first, *listing} <= set(keys)


def test_nothing_is_published_when_the_block_raises(store: Any) -> None:
    with pytest.raises(RuntimeError), store.writer("files/half") as out:
        out.write(b"a" * 1000)
        raise RuntimeError("the client went away")
    assert not store.exists("files/half")
    # Also after whole parts went out (a multipart upload on S3).
    with pytest.raises(RuntimeError), store.writer("files/half-big") as out:
        for _ in range(12):
            out.write(b"b" * MiB)
        raise RuntimeError("the client went away")
    assert not store.exists("files/half-big")
    assert list(store.list_keys("files/", time.time() + 2)) == []


def test_an_empty_blob(store: Any) -> None:
    with store.writer("files/empty") as out:
        pass
    assert out.bytes_written == 0
    assert store.exists("files/empty")
    assert list(store.iter_chunks("files/empty")) == []
    assert store.read_range("files/empty", 0, 100) == b""


def test_a_blob_of_several_parts_streams_in_bounded_memory(store: Any) -> None:
    chunk = hashlib.sha256(b"seed").digest() * (MiB // 32)  # 1 MiB
    total = 12
    expected = hashlib.sha256(chunk * total).hexdigest()
    bounded = not isinstance(store, MemoryFileStore)  # the twin keeps everything in memory by design
    tracemalloc.start()
    try:
        with store.writer("files/big") as out:
            for _ in range(total):
                out.write(chunk)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest = hashlib.sha256()
        size = 0
        for piece in store.iter_chunks("files/big", chunk_size=MiB):
            digest.update(piece)
            size += len(piece)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.bytes_written == size == total * MiB
    assert digest.hexdigest() == expected
    assert store.read_range("files/big", 11 * MiB - 3, 6) == (chunk * 2)[MiB - 3 : MiB + 3]
    if bounded:
        # At most one part buffered (5 MiB on S3) and a chunk: never the 12 MiB.
        assert write_peak < PART + 2 * MiB, write_peak
        assert read_peak < 3 * MiB, read_peak


def test_abandoned_writes_are_discarded(store: Any) -> None:
    """A writer that never finished (its process died) is cleaned up by `abort_stale_uploads`."""
    context = store.writer("files/abandoned")
    out = context.__enter__()
    out.write(b"c" * (6 * MiB))  # past one part: a multipart upload is open on S3
    assert store.abort_stale_uploads(time.time() - 3600) == 0  # too young
    if isinstance(store, MemoryFileStore):
        assert store.abort_stale_uploads(time.time() + 5) == 0  # the twin leaves nothing behind
        return
    assert store.abort_stale_uploads(time.time() + 5) == 1
    assert store.abort_stale_uploads(time.time() + 5) == 0
    # Were its writer alive after all, it finds its upload gone and publishes nothing.
    with pytest.raises(FileNotFoundError):
        context.__exit__(None, None, None)
    assert not store.exists("files/abandoned")
