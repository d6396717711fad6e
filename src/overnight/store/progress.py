"""What a batch's progress estimate reads (batches/progress.py): the shard attempts of in-progress
batches that ran in the last minute, and the database's clock they were stamped with."""

from __future__ import annotations

from sqlalchemy import bindparam, or_, select

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.clock import database_now
from overnight.store.database import Database
from overnight.store.records import ShardSpan

_s = T.shards
_NOW = select(database_now())
# Running shards (live counts from heartbeats) and shards committed within the window. The
# (batch_id, status) index narrows it to the batch; a batch has at most a few thousand shards.
_SPANS = select(
    _s.c.batch_id, _s.c.started_at, _s.c.finished_at, _s.c.completed + _s.c.failed,
).where(
    _s.c.batch_id.in_(bindparam("p_batches", expanding=True)),
    _s.c.started_at.is_not(None),
    or_(_s.c.status == C.SHARD_RUNNING,
        (_s.c.status == C.SHARD_DONE) & (_s.c.finished_at > bindparam("p_since"))),
)


class SqlProgress:
    def __init__(self, db: Database) -> None:
        self.db = db

    def recent_spans(self, batch_ids: list[str], window_seconds: float) -> tuple[float, dict[str, list[ShardSpan]]]:
        """(the database's time now, each batch's shard attempts running or committed in the window)."""
        with self.db.read() as conn:
            now = float(conn.execute(_NOW).scalar_one())
            rows = conn.execute(_SPANS, {"p_batches": batch_ids, "p_since": now - window_seconds}).all()
        spans: dict[str, list[ShardSpan]] = {}
        for batch_id, started, finished, done in rows:
            spans.setdefault(batch_id, []).append(ShardSpan(float(started), finished, int(done or 0)))
        return now, spans
