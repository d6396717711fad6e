"""Rows to records and back, and the clauses more than one concern's statements share."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import BindParameter, and_, bindparam, insert, or_

from overnight.store import schema as T
from overnight.store.records import BatchRecord, FileRecord

BATCH_COLUMNS = [
    c for c in T.batches.c if c.name not in ("seq", "errors_json", "metadata_json", "outcome_json", "lease_expires_at")
]
_BATCH_FIELDS = [c.name for c in BATCH_COLUMNS]

# The time a statement is run for, bound at execution (epoch seconds).
NOW: BindParameter[float] = bindparam("p_now")
# A file that is neither deleted nor expired at `p_now`.
VISIBLE_FILE = and_(T.files.c.deleted_at.is_(None), or_(T.files.c.expires_at.is_(None), T.files.c.expires_at > NOW))
INSERT_FILE = insert(T.files)


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
    }
