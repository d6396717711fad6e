"""What a metrics scrape reads from the database: queue depth per model and open batches per
state. Read at scrape time, so they are right for workers on any machine (the many-machine tier's
queue lives here, not in any process's memory). Both scan only open work: pending and running
shards (ix_shards_claim_order), batches in a non-terminal state (ix_batches_status)."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.database import Database

_b, _s = T.batches, T.shards
_OPEN = [C.VALIDATING, C.IN_PROGRESS, C.FINALIZING, C.CANCELLING]
# A running shard's heartbeat records its lines done so far: only the rest are still queued.
_QUEUED_LINES = (
    select(_b.c.model, func.sum(_s.c.request_count - _s.c.completed - _s.c.failed))
    .select_from(_s.join(_b, _b.c.id == _s.c.batch_id))
    .where(_s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING]), _b.c.status == C.IN_PROGRESS)
    .group_by(_b.c.model)
)
_OPEN_BATCHES = (
    select(_b.c.status, func.count())
    .where(_b.c.status.in_(bindparam("p_open", expanding=True)))
    .group_by(_b.c.status)
)


class SqlQueueGauges:
    def __init__(self, db: Database) -> None:
        self.db = db

    def queued_lines_by_model(self) -> dict[str, int]:
        """Lines not yet run, by the batch's model (None until its first shard commits: 'unknown')."""
        with self.db.read() as conn:
            rows = conn.execute(_QUEUED_LINES).all()
        out: dict[str, int] = {}
        for model, count in rows:
            key = model or "unknown"
            out[key] = out.get(key, 0) + max(0, int(count or 0))
        return out

    def open_batches_by_status(self) -> dict[str, int]:
        with self.db.read() as conn:
            rows = conn.execute(_OPEN_BATCHES, {"p_open": _OPEN}).all()
        return {status: int(count) for status, count in rows}
