"""The batch catalog as the API sees it: create, read (with the live progress of running shards),
list newest first, and the cancel request (the worker finishes the cancel)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.database import Database
from overnight.store.notify import notify_batches_changed
from overnight.store.records import BatchRecord, ShardPlan
from overnight.store.rows import batch_record, batch_values, insert_shards, owned, storable

_b, _s = T.batches, T.shards
_INSERT_BATCH = insert(_b)
# Scoped to an owner, and the admin view of every owner.
_GET_BATCH = {
    True: select(_b).where(_b.c.id == bindparam("p_batch"), _b.c.owner == bindparam("p_owner")),
    False: select(_b).where(_b.c.id == bindparam("p_batch")),
}
# What running shards reported by heartbeat, per batch: added to the committed counts.
_LIVE_PROGRESS = (
    select(_s.c.batch_id, func.sum(_s.c.completed), func.sum(_s.c.failed))
    .where(_s.c.batch_id.in_(bindparam("p_batches", expanding=True)), _s.c.status == C.SHARD_RUNNING)
    .group_by(_s.c.batch_id)
)
_STATUS = select(_b.c.status).where(_b.c.id == bindparam("p_batch"))


class SqlBatchCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert_batch(self, record: BatchRecord, plans: Sequence[ShardPlan] = ()) -> None:
        """A new batch; one created `in_progress` (its input validated on upload) with its shards."""
        with self.db.write() as conn:
            conn.execute(_INSERT_BATCH, batch_values(record))
            if plans:
                insert_shards(conn, record.id, plans)
            notify_batches_changed(conn, C.CHANGE_STARTED if plans else C.CHANGE_CREATED)

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        if not storable(batch_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(_GET_BATCH[owner is not None], {"p_batch": batch_id, "p_owner": owner}).first()
            return _with_live_counts(conn, [batch_record(row)])[0] if row else None

    def list_batches(
        self, owner: str | None, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool] | None:
        """Newest first. None when the `after` cursor is unknown."""
        if not storable(after):
            return None
        query = select(_b).where(owned(_b, owner))
        with self.db.read() as conn:
            if after:
                cursor = conn.execute(select(_b.c.seq).where(_b.c.id == after, owned(_b, owner))).scalar()
                if cursor is None:
                    return None
                query = query.where(_b.c.seq < cursor)
            rows = conn.execute(query.order_by(_b.c.seq.desc()).limit(limit + 1)).all()
            return _with_live_counts(conn, [batch_record(r) for r in rows[:limit]]), len(rows) > limit

    def request_cancel(self, owner: str | None, batch_id: str, now: int) -> BatchRecord | None:
        """Move a validating/in-progress batch to cancelling and skip its shards that never started.

        Returns the batch as it is afterwards (unchanged if it could not be cancelled)."""
        if not storable(batch_id):
            return None
        with self.db.write() as conn:
            where = and_(_b.c.id == batch_id, owned(_b, owner))
            moved = conn.execute(
                update(_b)
                .where(where, _b.c.status.in_([C.VALIDATING, C.IN_PROGRESS]))
                .values(status=C.CANCELLING, cancelling_at=now)
            )
            if moved.rowcount:
                notify_batches_changed(conn, C.CHANGE_CANCELLED)
                conn.execute(
                    update(_s)
                    .where(_s.c.batch_id == batch_id, _s.c.status == C.SHARD_PENDING)
                    .values(status=C.SHARD_SKIPPED)
                )
            row = conn.execute(select(_b).where(where)).first()
            # With its running shards' progress, as retrieve shows it (the counts went back to the
            # last commit in the cancel answer alone).
            return _with_live_counts(conn, [batch_record(row)])[0] if row else None

    def batch_status(self, batch_id: str) -> str | None:
        with self.db.read() as conn:
            status: str | None = conn.execute(_STATUS, {"p_batch": batch_id}).scalar()
            return status


def _with_live_counts(conn: Connection, records: list[BatchRecord]) -> list[BatchRecord]:
    """Add the progress that running shards reported by heartbeat to the committed counts."""
    live_ids = [r.id for r in records if r.status in (C.IN_PROGRESS, C.CANCELLING)]
    if not live_ids:
        return records
    rows = conn.execute(_LIVE_PROGRESS, {"p_batches": live_ids}).all()
    progress = {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in rows}
    out = []
    for record in records:
        done, failed = progress.get(record.id, (0, 0))
        if done or failed:
            record = replace(
                record,
                request_completed=record.request_completed + done,
                request_failed=record.request_failed + failed,
            )
        out.append(record)
    return out
