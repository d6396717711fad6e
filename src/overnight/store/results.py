"""Results as they are committed, and the retries of a batch: what `GET /v1/batches/{id}/output`
(results while running) and `/joined` (a batch with its retries) read."""

from __future__ import annotations

from sqlalchemy import bindparam, select

from overnight.store import schema as T
from overnight.store.database import Database
from overnight.store.records import BatchRecord, SettledShard
from overnight.store.rows import batch_record, storable

_b, _s = T.batches, T.shards
# The shards that end after `p_after` (an input line index), in input order: the committed
# prefix of them is what can be served while the batch still runs.
_SHARDS_AFTER = (
    select(
        _s.c.shard_index, _s.c.status, _s.c.result_key, _s.c.result_output_bytes, _s.c.first_request,
        _s.c.request_count, _s.c.byte_offset, _s.c.byte_length,
    )
    .where(_s.c.batch_id == bindparam("p_batch"), _s.c.first_request + _s.c.request_count > bindparam("p_after"))
    .order_by(_s.c.shard_index)
)
# The newest retry of a batch (ix_batches_retry_of); retries are the parent's owner's.
MAX_RETRIES_LISTED = 100
_RETRIES = (
    select(_b)
    .where(_b.c.retry_of == bindparam("p_batch"), _b.c.owner == bindparam("p_owner"))
    .order_by(_b.c.seq.desc())
    .limit(MAX_RETRIES_LISTED)
)


class SqlResultsCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def shards_after(self, batch_id: str, after: int) -> list[SettledShard]:
        """The batch's shards holding lines at index `after` or later, in input order."""
        with self.db.read() as conn:
            rows = conn.execute(_SHARDS_AFTER, {"p_batch": batch_id, "p_after": after}).all()
        return [SettledShard(**r._mapping) for r in rows]

    def retries_of(self, owner: str, batch_id: str) -> list[tuple[int, BatchRecord]]:
        if not storable(batch_id):
            return []
        with self.db.read() as conn:
            rows = conn.execute(_RETRIES, {"p_batch": batch_id, "p_owner": owner}).all()
        return [(row.seq, batch_record(row)) for row in rows]
