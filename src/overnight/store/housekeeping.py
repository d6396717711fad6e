"""What housekeeping asks of the database: which files are gone for good (and which uploads ran out
of time), and which stored objects are still named by a row (everything else under the file store's prefixes is an orphan)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, or_, select, update

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.database import Database
from overnight.store.uploads import PART_KEYS_IN, SqlUploadStore

_f, _b, _s = T.files, T.batches, T.shards
_ACTIVE = list(C.ACTIVE_STATES)

def _gone_by(at: str) -> Any:
    """Deleted, or expired, at `at` or before."""
    return or_(_f.c.deleted_at <= bindparam(at), and_(_f.c.expires_at.is_not(None), _f.c.expires_at <= bindparam(at)))


# Deleted or expired files whose bytes are still there and that no active batch reads (an active
# batch still needs its input). Their bytes go at once; the row stays GONE_FILE_ROW_SECONDS more,
# with an empty storage key, as a `files.list(after=...)` cursor: purged with its bytes, a client
# paging through the files it was deleting got a 400 for its next page.
_GONE_FILES = (
    select(_f.c.id, _f.c.storage_key)
    .where(_gone_by("p_now"), _f.c.storage_key != "",
           ~exists().where(_b.c.input_file_id == _f.c.id, _b.c.status.in_(_ACTIVE)))
    .limit(1000)
)
_FORGET_BYTES = update(_f).where(_f.c.id.in_(bindparam("p_ids", expanding=True))).values(storage_key="")
_PURGE_ROWS = delete(_f).where(_f.c.storage_key == "", _gone_by("p_rows_before"))
_FILE_KEYS_IN = select(_f.c.storage_key).where(_f.c.storage_key.in_(bindparam("p_keys", expanding=True)))
# Committed results of unfinished batches (a finished batch's results live on in its output files).
_RESULT_KEYS_IN = (
    select(_s.c.result_key)
    .select_from(_s.join(_b, _b.c.id == _s.c.batch_id))
    .where(_s.c.result_key.in_(bindparam("p_keys", expanding=True)), _b.c.status.in_(_ACTIVE))
)
_STATUS = select(_b.c.status).where(_b.c.id == bindparam("p_batch"))


class SqlHousekeeping:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._uploads = SqlUploadStore(db)

    def collect_garbage(self, now: int) -> list[str]:
        """Drop rows of deleted or expired files that no active batch reads, and the parts of
        uploads whose hour ran out; return their storage keys so the caller removes the bytes
        after these commits."""
        with self.db.write() as conn:
            rows = conn.execute(_GONE_FILES, {"p_now": now}).all()
            if rows:
                conn.execute(_FORGET_BYTES, {"p_ids": [r.id for r in rows]})
            conn.execute(_PURGE_ROWS, {"p_rows_before": now - C.GONE_FILE_ROW_SECONDS})
        return [r.storage_key for r in rows] + self._uploads.expire_uploads(now)

    def live_storage_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` are still needed: a file's bytes, or a committed shard's results while its
        batch is not finished (finalize deletes those; this catches what a crash left behind)."""
        if not keys:
            return set()
        with self.db.read() as conn:
            used = set(conn.execute(_FILE_KEYS_IN, {"p_keys": list(keys)}).scalars())
            used |= set(conn.execute(_RESULT_KEYS_IN, {"p_keys": list(keys)}).scalars())
            used |= set(conn.execute(PART_KEYS_IN, {"p_keys": list(keys)}).scalars())
        return used

    def batch_status(self, batch_id: str) -> str | None:
        with self.db.read() as conn:
            status: str | None = conn.execute(_STATUS, {"p_batch": batch_id}).scalar()
            return status
