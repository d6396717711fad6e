"""Completing an upload streams its parts into the new File a chunk at a time, and housekeeping
removes the parts of expired uploads and orphans under uploads/. On the real SQLite store and
the in-memory file store (which here counts the largest single read and write)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from overnight.batches.errors import InvalidRequest
from overnight.batches.file_service import FileService
from overnight.batches.housekeeping import collect_garbage
from overnight.batches.upload_service import UploadService
from overnight.files.memory import MemoryFileStore
from overnight.files.port import CHUNK_SIZE
from overnight.store.sql import SqlStore

MiB = 1024 * 1024


class MeasuringStore(MemoryFileStore):
    """Remembers the largest piece of data any one write received and any one read returned."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_write = 0
        self.largest_read = 0

    @contextmanager
    def writer(self, key: str) -> Iterator[Any]:
        with super().writer(key) as inner:
            store = self

            class Measured:
                def write(self, data: bytes | memoryview) -> None:
                    store.largest_write = max(store.largest_write, len(data))
                    inner.write(data)

                @property
                def bytes_written(self) -> int:
                    return inner.bytes_written

            yield Measured()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        data = super().read_range(key, offset, length)
        self.largest_read = max(self.largest_read, len(data))
        return data

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        for chunk in super().iter_chunks(key, chunk_size):
            self.largest_read = max(self.largest_read, len(chunk))
            yield chunk


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[UploadService, MeasuringStore, SqlStore, Clock]]:
    store = SqlStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.migrate()
    files = MeasuringStore()
    clock = Clock()
    service = UploadService(store.uploads, FileService(store.files, files, clock), 64 * MiB, 3600, clock)
    yield service, files, store, clock
    store.close()


def put_part(service: UploadService, files: MemoryFileStore, upload_id: str, data: bytes) -> str:
    part_id, key, _room = service.new_part("alice", upload_id)
    with files.writer(key) as writer:
        writer.write(data)
    return service.add_part("alice", upload_id, part_id, key, len(data)).id


def test_assembling_never_holds_more_than_a_chunk(setup: Any) -> None:
    service, files, _store, _clock = setup
    parts = [bytes([i]) * (5 * MiB + 123 * i) for i in range(3)]  # each several chunks long
    data = b"".join(parts)
    upload = service.create("alice", "blob.bin", "user_data", len(data), "application/octet-stream", None)
    part_ids = [put_part(service, files, upload.id, p) for p in parts]
    files.largest_write = files.largest_read = 0  # count the assembly only

    done, record = service.complete("alice", upload.id, part_ids, hashlib.md5(data).hexdigest())

    assert done.status == "completed" and done.file_id == record.id
    assert files.blobs[record.storage_key][0] == data
    assert 0 < files.largest_write <= CHUNK_SIZE
    assert 0 < files.largest_read <= CHUNK_SIZE
    assert not [k for k in files.blobs if k.startswith("uploads/")]  # the parts are gone


def test_an_md5_mismatch_publishes_nothing(setup: Any) -> None:
    service, files, _store, _clock = setup
    data = b'{"a": 1}\n' * 10
    upload = service.create("alice", "x.jsonl", "batch", len(data), "text/jsonl", None)
    part_ids = [put_part(service, files, upload.id, data)]
    with pytest.raises(InvalidRequest) as exc:
        service.complete("alice", upload.id, part_ids, "0" * 32)
    assert exc.value.param == "md5"
    assert not [k for k in files.blobs if k.startswith("files/")]
    assert len([k for k in files.blobs if k.startswith("uploads/")]) == 1  # kept for another try


def test_housekeeping_removes_parts_of_expired_uploads_and_orphans(setup: Any) -> None:
    service, files, store, clock = setup
    expiring = service.create("alice", "x.jsonl", "batch", 10, "text/jsonl", None)
    put_part(service, files, expiring.id, b"0123456789")
    clock.now += 1800
    live = service.create("alice", "y.jsonl", "batch", 10, "text/jsonl", None)
    put_part(service, files, live.id, b"0123456789")
    with files.writer(f"uploads/{live.id}/part_orphan") as writer:  # bytes no row names
        writer.write(b"left by a crash")

    clock.now += 1800  # the first upload's hour is up, the second's is not
    # The memory store dates blobs by the real clock, well before `clock`: every object is old enough.
    removed = collect_garbage(store.housekeeping, files, clock.now, orphan_age=3600)

    left = sorted(k for k in files.blobs if k.startswith("uploads/"))
    assert removed == 2 and len(left) == 1 and left[0].startswith(f"uploads/{live.id}/part_")
    assert store.uploads.get_upload("alice", expiring.id).status == "expired"
    with pytest.raises(InvalidRequest, match="expired"):
        service.new_part("alice", expiring.id)
    assert service.new_part("alice", live.id)[2] == 64 * MiB - 10


@pytest.mark.parametrize(("meanwhile", "says"), [("cancel", "it was cancelled"),
                                                 ("complete", "it is already completed")])
def test_a_complete_that_loses_a_race_says_why(setup: Any, meanwhile: str, says: str) -> None:
    """A cancel or another complete (an SDK retrying one whose answer was lost) commits while this
    complete reads the parts, and deletes them: the refusal said 'it has expired'."""
    service, files, _store, _clock = setup
    upload = service.create("alice", "blob.bin", "user_data", 20, "application/octet-stream", None)
    part_ids = [put_part(service, files, upload.id, b"x" * 10) for _ in range(2)]
    second = next(p for p in service.catalog.parts(upload.id, part_ids) if p.id == part_ids[1])
    reads = files.iter_chunks

    def read_racing(key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        if key == second.storage_key:
            files.iter_chunks = reads  # type: ignore[method-assign]
            if meanwhile == "cancel":
                service.cancel("alice", upload.id)
            else:
                service.complete("alice", upload.id, part_ids, None)
        return reads(key, chunk_size)

    files.iter_chunks = read_racing  # type: ignore[method-assign]
    with pytest.raises(InvalidRequest, match=says):
        service.complete("alice", upload.id, part_ids, None)


def test_parts_sent_at_once_cannot_overfill_the_file_size_limit(setup: Any) -> None:
    """Each part's room was reckoned when it started: parts sent in parallel each fit, and
    together held up to (parts - 1) x 64 MB beyond the limit until the upload ended. Recording a
    part now checks the parts already recorded, under the upload's lock; the refused part's bytes
    are deleted at once."""
    service, files, _store, _clock = setup
    upload = service.create("alice", "big.bin", "user_data", 64 * MiB, "application/octet-stream", None)
    started = [service.new_part("alice", upload.id) for _ in range(2)]  # both before either is recorded
    assert all(room == 64 * MiB for _part, _key, room in started)
    for _part_id, key, _room in started:
        with files.writer(key) as writer:
            writer.write(b"x" * (40 * MiB))
    first, second = started
    service.add_part("alice", upload.id, first[0], first[1], 40 * MiB)
    with pytest.raises(InvalidRequest) as refused:
        service.add_part("alice", upload.id, second[0], second[1], 40 * MiB)
    assert "more than 67,108,864 bytes" in str(refused.value)
    assert files.exists(first[1]) and not files.exists(second[1])
    assert service.catalog.received_bytes(upload.id) == 40 * MiB
