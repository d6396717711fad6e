"""The file-bytes port. Synchronous by design: callers on the event loop run it in a thread, and
every method streams (no method returns a whole file)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol

CHUNK_SIZE = 1024 * 1024


class StorageUnavailableError(ConnectionError):
    """The store did not answer for the adapter's whole retry window (an outage, not a bad
    request): the caller should hand the work back and try again later, not give up on it."""


class StorageFullError(OSError):
    """The store refused a write (disk full, quota); nothing was published."""


class BlobWriter(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    @property
    def bytes_written(self) -> int: ...


def stream_copy(store: FileStore, source: str, key: str) -> None:
    """`FileStore.copy` through the store's own reader and writer."""
    with store.writer(key) as out:
        for chunk in store.iter_chunks(source):
            out.write(chunk)


class FileStore(Protocol):
    def writer(self, key: str) -> AbstractContextManager[BlobWriter]:
        """Write a blob; it appears under `key` atomically when the block exits without error,
        and not at all otherwise."""
        ...

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (one shard: bounded by the shard byte limit)."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def copy(self, source: str, key: str) -> None:
        """Publish the bytes of `source` under `key` as a writer would (atomically, durably, and
        as just written: orphan housekeeping gives it its full age). A local directory links the
        file, so no bytes move; another store may stream them (`stream_copy`)."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob; a missing one is not an error. A store with directories also removes
        the directory this emptied."""
        ...

    def remove_empty_dirs(self, older_than: float) -> int:
        """Remove empty directories last changed before the epoch time `older_than` (left by
        earlier versions); returns how many."""
        ...

    def list_keys(self, prefix: str, older_than: float) -> Iterator[str]:
        """Keys under `prefix` last written before the epoch time `older_than`."""
        ...

    def abort_stale_uploads(self, older_than: float) -> int:
        """Discard writes begun before the epoch time `older_than` that never finished (their
        writer died before it could clean up: an object store's open multipart uploads, a
        directory's temp files); returns how many."""
        ...
