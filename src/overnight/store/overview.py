"""What the dashboard's server page shows of the database: the work waiting per model, and the
worker processes that heartbeat into the `workers` table (store/membership.py writes it)."""

from __future__ import annotations

from sqlalchemy import func, select

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.clock import LEASE_NOW
from overnight.store.database import Database
from overnight.store.records import ModelQueue, WorkerSeen

_b, _w = T.batches, T.workers
# Unfinished batches and their requests not yet answered, per model. Only active batches are read
# (ix_batches_status), so the cost follows the queue, not the history.
_QUEUE_BY_MODEL = (
    select(
        _b.c.model,
        func.count(),
        func.coalesce(func.sum(_b.c.request_total - _b.c.request_completed - _b.c.request_failed), 0),
    )
    .where(_b.c.status.in_(sorted(C.ACTIVE_STATES)))
    .group_by(_b.c.model)
    .order_by(_b.c.model)
)
# Every registered worker, with how long ago it was last seen by the database's clock (workers
# on other machines compare against the same clock). Rows of dead workers go after a day.
_WORKERS = select(_w.c.id, _w.c.started_at, _w.c.last_seen, LEASE_NOW).order_by(_w.c.started_at, _w.c.id)


class SqlOverview:
    def __init__(self, db: Database) -> None:
        self.db = db

    def queue_by_model(self) -> list[ModelQueue]:
        with self.db.read() as conn:
            rows = conn.execute(_QUEUE_BY_MODEL).all()
        return [ModelQueue(model, int(batches), max(int(waiting), 0)) for model, batches, waiting in rows]

    def workers(self) -> list[WorkerSeen]:
        with self.db.read() as conn:
            rows = conn.execute(_WORKERS, {"p_now": None}).all()
        return [WorkerSeen(id, float(started), float(seen), max(float(now) - float(seen), 0.0))
                for id, started, seen, now in rows]
