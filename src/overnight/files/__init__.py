"""File-bytes port and adapters: a local directory (default), an in-memory twin for unit tests, and
S3-compatible object storage (`overnight.files.s3`, imported only when configured: it needs boto3)."""

from overnight.files.local import LocalFileStore
from overnight.files.memory import MemoryFileStore
from overnight.files.port import BlobWriter, FileStore, StorageFullError

__all__ = ["BlobWriter", "FileStore", "LocalFileStore", "MemoryFileStore", "StorageFullError"]
