"""Rows to records and back, and the clauses more than one concern's statements share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import BindParameter, Connection, and_, bindparam, insert, or_, text

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.records import BatchRecord, FileRecord, ShardPlan

BATCH_COLUMNS = [
    c for c in T.batches.c if c.name not in ("seq", "errors_json", "metadata_json", "outcome_json", "lease_expires_at")
]
_BATCH_FIELDS = [c.name for c in BATCH_COLUMNS]

# The time a statement is run for, bound at execution (epoch seconds).
NOW: BindParameter[float] = bindparam("p_now")
# A file that is neither deleted nor expired at `p_now`.
VISIBLE_FILE = and_(T.files.c.deleted_at.is_(None), or_(T.files.c.expires_at.is_(None), T.files.c.expires_at > NOW))
INSERT_FILE = insert(T.files)
_INSERT_SHARDS = insert(T.shards)
_ANALYZE_SHARDS = text("ANALYZE shards")
_ANALYZE_AFTER_SHARDS = 1000  # a batch this large refreshes the planner's statistics (PostgreSQL)


def storable(*texts: str | None) -> bool:
    """Whether strings can be looked up at all: PostgreSQL text cannot hold NUL (a `%00` in a
    URL), so an id with one names nothing, on either database."""
    return all(t is None or "\x00" not in t for t in texts)


def owned(table: Any, owner: str | None) -> Any:
    """Rows of `owner`; None is the admin view (every owner)."""
    return True if owner is None else table.c.owner == owner


def batch_record(row: Any) -> BatchRecord:
    m = row._mapping  # a property that builds a view: take it once, not once per column
    errors_json = m["errors_json"]
    metadata_json = m["metadata_json"]
    outcome_json = m["outcome_json"]
    return BatchRecord(
        **{name: m[name] for name in _BATCH_FIELDS},
        errors=orjson.loads(errors_json) if errors_json else None,
        metadata=orjson.loads(metadata_json) if metadata_json else None,
        outcome=orjson.loads(outcome_json) if outcome_json else None,
    )


def batch_values(record: BatchRecord) -> dict[str, Any]:
    values = {c.name: getattr(record, c.name) for c in BATCH_COLUMNS}
    values["metadata_json"] = orjson.dumps(record.metadata).decode() if record.metadata is not None else None
    return values


def file_record(row: Any) -> FileRecord:
    m = row._mapping
    return FileRecord(
        id=m["id"],
        owner=m["owner"],
        purpose=m["purpose"],
        filename=m["filename"],
        bytes=m["bytes"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        storage_key=m["storage_key"],
        upload_check=m.get("upload_check"),
    )


def file_values(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "owner": record.owner,
        "purpose": record.purpose,
        "filename": record.filename,
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "storage_key": record.storage_key,
        "upload_check": record.upload_check,
    }


def insert_shards(conn: Connection, batch_id: str, plans: Sequence[ShardPlan]) -> None:
    """A batch's shards, pending, in the caller's transaction."""
    rows = [
        {
            "batch_id": batch_id,
            "shard_index": p.shard_index,
            "first_request": p.first_request,
            "request_count": p.request_count,
            "byte_offset": p.byte_offset,
            "byte_length": p.byte_length,
            "status": C.SHARD_PENDING,
            "attempt": 0,
        }
        for p in plans
    ]
    for start in range(0, len(rows), 500):
        conn.execute(_INSERT_SHARDS, rows[start : start + 500])
    if len(rows) >= _ANALYZE_AFTER_SHARDS and conn.dialect.name == "postgresql":
        # Fresh statistics, or PostgreSQL takes the shards table for a small one (until
        # autovacuum catches up) and plans the claim as "read and sort every pending
        # shard": 11 ms a claim at 20,000 pending, 3 ms once analyzed.
        conn.execute(_ANALYZE_SHARDS)
