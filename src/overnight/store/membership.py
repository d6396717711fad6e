"""Who is working: every worker process registers and heartbeats a row, on the database's clock.
The live ones, in the order they started, split each upstream's concurrency budget."""

from __future__ import annotations

from sqlalchemy import bindparam, delete, func, insert, select, tuple_, update

from overnight.store import schema as T
from overnight.store.clock import LEASE_NOW
from overnight.store.database import Database

_w = T.workers
_REGISTER = insert(_w).values(id=bindparam("p_worker"), started_at=LEASE_NOW, last_seen=LEASE_NOW)
_SEEN = update(_w).where(_w.c.id == bindparam("p_worker")).values(last_seen=LEASE_NOW)
_LIVE = _w.c.last_seen > LEASE_NOW - bindparam("p_alive_seconds")
# This worker's place among the live ones (by start, then id), how many there are, and how long
# it has been registered.
_STANDING = select(
    select(func.count()).where(_LIVE, tuple_(_w.c.started_at, _w.c.id) < tuple_(
        select(_w.c.started_at).where(_w.c.id == bindparam("p_worker")).scalar_subquery(), bindparam("p_worker")
    )).scalar_subquery(),
    select(func.count()).where(_LIVE).scalar_subquery(),
    select(LEASE_NOW - _w.c.started_at).where(_w.c.id == bindparam("p_worker")).scalar_subquery(),
)
_LEAVE = delete(_w).where(_w.c.id == bindparam("p_worker"))
_FORGET_DEAD = delete(_w).where(_w.c.last_seen < LEASE_NOW - bindparam("p_forget_seconds"))


class SqlMembership:
    def __init__(self, db: Database) -> None:
        self.db = db

    def join(self, worker_id: str) -> None:
        with self.db.write() as conn:
            conn.execute(_REGISTER, {"p_worker": worker_id, "p_now": None})

    def standing(self, worker_id: str, alive_seconds: float, now: float | None = None) -> tuple[int, int, float]:
        """Mark the worker seen; (its rank among live workers, how many are live, seconds since it
        joined). A worker whose row vanished (pruned while it was stopped) joins again."""
        with self.db.write() as conn:
            if not conn.execute(_SEEN, {"p_worker": worker_id, "p_now": now}).rowcount:
                conn.execute(_REGISTER, {"p_worker": worker_id, "p_now": now})
            rank, count, age = conn.execute(
                _STANDING, {"p_worker": worker_id, "p_alive_seconds": alive_seconds, "p_now": now}
            ).one()
            conn.execute(_FORGET_DEAD, {"p_now": now, "p_forget_seconds": 86400.0})
        return int(rank), max(int(count), 1), float(age or 0.0)

    def leave(self, worker_id: str) -> None:
        with self.db.write() as conn:
            conn.execute(_LEAVE, {"p_worker": worker_id})
