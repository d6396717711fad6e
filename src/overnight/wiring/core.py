"""What every process builds: the metadata store (migrated) and the file store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from overnight.files.local import LocalFileStore
from overnight.files.port import FileStore
from overnight.files.private import make_private_dirs
from overnight.settings import Settings, parse_storage_url
from overnight.store.sql import SqlStore

log = logging.getLogger("overnight")


class ConfigurationError(Exception):
    """Settings that cannot work; the CLI prints the message and exits."""


@dataclass(slots=True)
class Core:
    settings: Settings
    store: SqlStore
    files: FileStore

    def close(self) -> None:
        self.store.close()


def build_core(settings: Settings) -> Core:
    make_private_dirs(settings.data_dir)
    store = SqlStore(settings.resolved_database_url)
    store.migrate()
    return Core(settings, store, open_file_store(settings))


def open_file_store(settings: Settings) -> FileStore:
    """The data directory, or the object store `settings.storage_url` names, checked to be usable
    (the bucket exists, the credentials work, the endpoint answers) before anything runs."""
    if not settings.storage_url:
        return LocalFileStore(settings.data_dir)
    try:
        location = parse_storage_url(settings.storage_url, settings.storage_env)
    except ValueError as exc:
        raise ConfigurationError(f"--storage-url: {exc}.") from None
    try:
        from overnight.files.s3 import S3FileStore, S3StorageError
    except ImportError:
        raise ConfigurationError("--storage-url s3://... needs boto3: pip install 'overnight[s3]'.") from None
    files = S3FileStore(
        location.bucket, location.prefix, location.endpoint_url, location.region, location.access_key,
        location.secret_key, location.session_token, part_size=location.part_size,
        conditional_writes=location.conditional_writes,
    )
    try:
        files.check()
    except S3StorageError as exc:
        raise ConfigurationError(f"{exc.strerror}.") from None
    log.info("file bytes in %s", files.describe())
    return files
