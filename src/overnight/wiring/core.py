"""What every process builds: the metadata store (migrated) and the file store."""

from __future__ import annotations

from dataclasses import dataclass

from overnight.files.local import LocalFileStore
from overnight.files.port import FileStore
from overnight.files.private import make_private_dirs
from overnight.settings import Settings
from overnight.store.sql import SqlStore


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
    return Core(settings, store, LocalFileStore(settings.data_dir))
