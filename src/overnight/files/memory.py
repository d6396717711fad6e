"""In-memory twin of the file store, for unit tests of the logic above it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from overnight.files.port import CHUNK_SIZE


class _MemoryWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))
        self.bytes_written += len(data)


class MemoryFileStore:
    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, float]] = {}

    @contextmanager
    def writer(self, key: str) -> Iterator[_MemoryWriter]:
        writer = _MemoryWriter()
        yield writer
        self.blobs[key] = (b"".join(writer.parts), time.time())

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return self._get(key)[offset : offset + length]

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        data = self._get(key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    def _get(self, key: str) -> bytes:
        if key not in self.blobs:
            raise FileNotFoundError(f"no blob {key!r}")
        return self.blobs[key][0]

    def exists(self, key: str) -> bool:
        return key in self.blobs

    def copy(self, source: str, key: str) -> None:
        self.blobs[key] = (self._get(source), time.time())

    def delete(self, key: str) -> None:
        self.blobs.pop(key, None)

    def remove_empty_dirs(self, older_than: float) -> int:
        return 0  # keys only: there are no directories to leave behind

    def list_keys(self, prefix: str, older_than: float) -> Iterator[str]:
        return iter([k for k, (_, t) in self.blobs.items() if k.startswith(prefix) and t < older_than])

    def abort_stale_uploads(self, older_than: float) -> int:
        return 0  # a write that fails publishes nothing and leaves nothing behind
