"""Alembic's history on SQLite and PostgreSQL: it builds exactly the tables of schema.py, it can be
walked down and up again, and rows written by the code of an older revision survive the upgrade
and read back through the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from overnight import constants as C
from overnight.store import database as database_module
from overnight.store import schema
from overnight.store.records import FileRecord, ShardResult
from overnight.store.sql import SqlStore

NOW = 1_000_000


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(database_module.__file__).parent / "migrations"))
    return cfg


HEAD = ScriptDirectory.from_config(_config()).get_current_head()


def _alembic(url: str, step: Callable[[Config], None]) -> None:
    """Run an alembic command on `url` the way SqlStore.migrate does (our connection, env.py)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            step(cfg)
    finally:
        engine.dispose()


def _schema_differences(url: str) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert context.get_current_revision() == HEAD
            return list(compare_metadata(context, schema.metadata))
    finally:
        engine.dispose()


@pytest.fixture
def store_at(empty_url: str) -> Iterator[Callable[[], SqlStore]]:
    """Open (and migrate to head) a SqlStore on empty_url; closed after the test."""
    opened: list[SqlStore] = []

    def open_store() -> SqlStore:
        store = SqlStore(empty_url)
        store.migrate()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def test_migrations_build_exactly_the_schema(empty_url: str, store_at: Callable[[], SqlStore]) -> None:
    store_at()
    assert _schema_differences(empty_url) == []
    store_at()  # migrating again is a no-op
    assert _schema_differences(empty_url) == []


def test_downgrade_to_base_and_upgrade_again(empty_url: str) -> None:
    _alembic(empty_url, lambda cfg: command.upgrade(cfg, "head"))
    _alembic(empty_url, lambda cfg: command.downgrade(cfg, "base"))
    engine = sa.create_engine(empty_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    _alembic(empty_url, lambda cfg: command.upgrade(cfg, "head"))
    assert _schema_differences(empty_url) == []


def _insert(conn: sa.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """An INSERT naming exactly these columns, as the code of that revision wrote them."""
    conn.execute(sa.insert(sa.table(table, *[sa.column(name) for name in rows[0]])), rows)


def _counters(**values: int) -> dict[str, int]:
    names = ["input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"]
    return {name: values.get(name, 0) for name in names}


def _shard(index: int, status: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "batch_id": "batch_old", "shard_index": index, "first_request": index * 10, "request_count": 10,
        "byte_offset": index * 1000, "byte_length": 1000, "status": status, "attempt": 0,
        "lease_token": None, "lease_expires_at": None, "result_key": None, "result_output_bytes": None,
        "completed": 0, "failed": 0, **_counters(), "model": None,
    }
    row.update(values)
    return row


def test_rows_written_at_0002_survive_the_upgrade(empty_url: str, store_at: Callable[[], SqlStore]) -> None:
    _alembic(empty_url, lambda cfg: command.upgrade(cfg, "0002"))
    engine = sa.create_engine(empty_url)
    try:
        with engine.begin() as conn:
            _insert(conn, "files", [{
                "id": "file-old", "owner": "owner", "purpose": "batch", "filename": "in.jsonl", "bytes": 3000,
                "created_at": NOW, "expires_at": None, "storage_key": "files/file-old", "deleted_at": None,
            }])
            _insert(conn, "batches", [{
                "id": "batch_old", "owner": "owner", "endpoint": C.CHAT_COMPLETIONS, "input_file_id": "file-old",
                "completion_window": "24h", "status": C.IN_PROGRESS, "created_at": NOW, "in_progress_at": NOW,
                "expires_at": NOW + 86400, "metadata_json": '{"run": "old"}', "model": "gpt-4o-mini",
                "request_total": 30, "request_completed": 9, "request_failed": 1,
                **_counters(input_tokens=90, output_tokens=45), "lease_token": None, "lease_expires_at": None,
            }])
            _insert(conn, "shards", [
                _shard(0, C.SHARD_DONE, attempt=1, result_key="results/batch_old/0.1.jsonl",
                       result_output_bytes=900, completed=9, failed=1,
                       **_counters(input_tokens=90, output_tokens=45), model="gpt-4o-mini"),
                _shard(1, C.SHARD_RUNNING, attempt=1, lease_token="old-holder", lease_expires_at=NOW + 30.0,
                       completed=4),
                _shard(2, C.SHARD_PENDING),
            ])
    finally:
        engine.dispose()

    store = store_at()  # SqlStore.migrate: 0002 -> head

    assert store.files.get_file("owner", "file-old", NOW) == FileRecord(
        "file-old", "owner", "batch", "in.jsonl", 3000, NOW, None, "files/file-old"
    )
    batch = store.batches.get_batch("owner", "batch_old")
    assert batch is not None
    assert (batch.status, batch.input_file_id, batch.expires_at, batch.metadata, batch.model) == (
        C.IN_PROGRESS, "file-old", NOW + 86400, {"run": "old"}, "gpt-4o-mini"
    )
    # the committed counts plus the running shard's live progress
    assert (batch.request_total, batch.request_completed, batch.request_failed) == (30, 13, 1)
    assert (batch.input_tokens, batch.output_tokens) == (90, 45)
    with store.db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.shards.c.shard_index, schema.shards.c.expired, schema.shards.c.last_error)
            .order_by(schema.shards.c.shard_index)
        ).all()
    assert [tuple(r) for r in rows] == [(0, 0, None), (1, 0, None), (2, 0, None)]  # the new columns' defaults

    # The upgraded rows work: the pending shard is claimed (the running one's lease still holds),
    # the old holder's lease runs out and its shard is claimed again, and the batch completes.
    pending = store.queue.claim_shard(NOW, 30, "new-1")
    assert pending is not None and (pending.shard_index, pending.last_error) == (2, None)
    retaken = store.queue.claim_shard(NOW + 31, 30, "new-2")
    assert retaken is not None and (retaken.shard_index, retaken.attempt) == (1, 2)
    assert store.queue.commit_shard(pending.shard_id, "new-1", "batch_old", ShardResult("r2", completed=10), NOW) == (
        "committed"
    )
    assert store.queue.commit_shard(retaken.shard_id, "new-2", "batch_old", ShardResult("r1", completed=10), NOW) == (
        "batch_ready"
    )
    task = store.queue.claim_batch_task(NOW + 32, 30, "fin")
    assert task is not None and task.kind == "finalize" and task.final_status == C.COMPLETED
    assert [(s.shard_index, s.result_key, s.result_output_bytes, s.expired) for s in task.shards] == [
        (0, "results/batch_old/0.1.jsonl", 900, 0), (1, "r1", 0, 0), (2, "r2", 0, 0)
    ]
