"""File-bytes port and adapters: a local directory (default) and an in-memory twin for unit tests."""

from overnight.files.local import LocalFileStore
from overnight.files.memory import MemoryFileStore
from overnight.files.port import BlobWriter, FileStore, StorageFullError

__all__ = ["BlobWriter", "FileStore", "LocalFileStore", "MemoryFileStore", "StorageFullError"]
