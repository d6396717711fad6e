"""The database: one SQLAlchemy engine per process, its dialect's habits, transactions and migrations.

SQLite (one machine) and PostgreSQL (many) differ here and nowhere else in the adapters: SQLite
writes take the write lock up front (`BEGIN IMMEDIATE`) so two writers never deadlock upgrading a
read lock; PostgreSQL runs on a pool sized for a worker's concurrency, and its claims use
`FOR UPDATE SKIP LOCKED` (written into the statements, a no-op on SQLite) so workers never queue
behind each other. Methods of the adapters are synchronous and short; async callers run them in
a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from overnight.files.private import create_private, tighten

# Connections a PostgreSQL pool keeps: the worker's claim, heartbeat and commit threads plus the
# API's request threads; beyond it, short-lived overflow connections.
POSTGRES_POOL_SIZE = 10
POSTGRES_POOL_OVERFLOW = 20
# An arbitrary constant naming the advisory lock migrations hold on PostgreSQL.
_MIGRATION_LOCK = 7_263_114_001


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            _private_sqlite_files(url)
            self.engine = _sqlite_engine(url)
        else:
            self.engine = create_engine(
                url, pool_size=POSTGRES_POOL_SIZE, max_overflow=POSTGRES_POOL_OVERFLOW, pool_pre_ping=True
            )

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        # Under the write lock, so two processes starting on a new database take turns: the second
        # finds the tables at head instead of creating them again.
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write (on SQLite: holding the write lock from its start)."""
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction that sees one snapshot for all its statements. (SQLite's read
        transactions do; PostgreSQL's default, READ COMMITTED, takes one per statement: a batch read,
        then its running shards' progress, straddled a shard's commit and counted neither, so
        `request_counts` went back to 0 for one poll. Read-only, REPEATABLE READ never aborts.)"""
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn


def _private_sqlite_files(url: str) -> None:
    """SQLite creates a database file 0644 (less the umask) and gives its -wal and -shm files the
    database file's permissions: so create the file 0600 before SQLite does, and tighten the files
    an older version left 0644. An empty file is an empty database to SQLite."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(create_private(Path(path), exclusive=False))
    except OSError:
        return  # a missing directory, say: SQLite reports it when it opens the file
    for name in (path, f"{path}-wal", f"{path}-shm"):
        tighten(Path(name))


def _sqlite_engine(url: str) -> Engine:
    # A small pool: opening a SQLite connection (and its PRAGMAs) costs more than most queries.
    engine = create_engine(
        url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=8
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, not just a killed process. Commits are per shard,
        # not per line, so the fsync is cheap.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
