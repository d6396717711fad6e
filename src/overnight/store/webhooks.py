"""The webhook outbox: deliveries are inserted with the terminal state that causes them (by
store/queue.py, in its transaction, through `insert_webhook_events`), then claimed under a lease,
sent, and settled fenced by the lease token, like shards.

- A claim is one statement: `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)
  RETURNING`; senders on other machines skip each other's rows on PostgreSQL, and SQLite runs it
  under `BEGIN IMMEDIATE`.
- The lease is the due time itself: a claim moves `next_attempt_at` a lease ahead, so a delivery
  whose sender died mid-attempt is due again when that lease runs out (at least once, never lost).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from overnight.store import schema as T
from overnight.store.clock import LEASE_NOW, database_now
from overnight.store.database import Database
from overnight.store.records import ClaimedDelivery, DeliveryLease, WebhookEvent

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

_w = T.webhook_deliveries
_INSERT = insert(_w).values(next_attempt_at=database_now())  # due at once
# Leased as it is inserted (see DeliveryLease): due again only if its sender dies holding it.
_INSERT_LEASED = (
    insert(_w)
    .values(next_attempt_at=LEASE_NOW + bindparam("p_lease_seconds"), lease_token=bindparam("p_token"), attempts=1)
    .returning(_w.c.id)
)


def _claim_statement() -> Any:
    due = (
        select(_w.c.id)
        .where(_w.c.status == PENDING, _w.c.next_attempt_at <= LEASE_NOW)
        .order_by(_w.c.next_attempt_at, _w.c.id)  # the longest overdue first
        .limit(bindparam("p_limit"))
        .with_for_update(skip_locked=True)
    )
    return (
        update(_w)
        .where(_w.c.id.in_(due.scalar_subquery()))
        .values(
            lease_token=bindparam("p_token"),
            next_attempt_at=LEASE_NOW + bindparam("p_lease_seconds"),
            attempts=_w.c.attempts + 1,
        )
        .returning(_w.c.id, _w.c.event_id, _w.c.endpoint_id, _w.c.url, _w.c.payload, _w.c.attempts)
    )


_CLAIM = _claim_statement()
_fenced = (_w.c.id == bindparam("p_id"), _w.c.lease_token == bindparam("p_token"), _w.c.status == PENDING)
_DELIVERED = update(_w).where(*_fenced).values(
    status=DELIVERED, delivered_at=LEASE_NOW, lease_token=None, last_error=bindparam("p_error")
)
_RETRY = update(_w).where(*_fenced).values(
    next_attempt_at=LEASE_NOW + bindparam("p_delay"), lease_token=None, last_error=bindparam("p_error")
)
_GIVE_UP = update(_w).where(*_fenced).values(status=FAILED, lease_token=None, last_error=bindparam("p_error"))

# Settled rows are kept a while (to see what was sent, and when), then dropped by the janitor.
_PRUNE = delete(_w).where(_w.c.status != PENDING, _w.c.created_at < bindparam("p_before"))


def insert_webhook_events(conn: Connection, events: Sequence[WebhookEvent], lease: DeliveryLease | None = None) -> None:
    """Part of the caller's transaction: the events become due at once, or the first
    `lease.limit` of them are leased to `lease.token` (and appended to `lease.claimed`, which the
    caller reads only once the transaction has committed)."""
    if not events:
        return
    leased = min(len(events), lease.limit) if lease is not None else 0
    for event in events[:leased]:
        assert lease is not None
        delivery_id = conn.execute(_INSERT_LEASED, {
            **_values(event), "p_token": lease.token, "p_lease_seconds": lease.seconds, "p_now": None,
        }).scalar_one()
        lease.claimed.append(ClaimedDelivery(
            delivery_id, event.event_id, event.endpoint_id, event.url, event.payload, 1, lease.token
        ))
    if lease is not None:
        lease.left_due = len(events) - leased
    if len(events) > leased:
        conn.execute(_INSERT, [{**_values(e), "attempts": 0} for e in events[leased:]])


def _values(e: WebhookEvent) -> dict[str, Any]:
    return {
        "event_id": e.event_id, "event_type": e.event_type, "owner": e.owner, "batch_id": e.batch_id,
        "endpoint_id": e.endpoint_id, "url": e.url, "payload": e.payload, "created_at": e.created_at,
        "status": PENDING,
    }


class SqlWebhookOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim_deliveries(
        self, limit: int, lease_seconds: float, token: str, now: float | None = None
    ) -> list[ClaimedDelivery]:
        """Up to `limit` due deliveries, leased to `token` for `lease_seconds`."""
        with self.db.write() as conn:
            rows = conn.execute(_CLAIM, {
                "p_limit": limit, "p_token": token, "p_lease_seconds": lease_seconds, "p_now": now,
            }).all()
        return [ClaimedDelivery(r.id, r.event_id, r.endpoint_id, r.url, r.payload, r.attempts, token) for r in rows]

    def mark_delivered(self, delivery_id: int, token: str, note: str | None = None) -> bool:
        return self._settle(_DELIVERED, delivery_id, token, {"p_error": note})

    def retry_later(self, delivery_id: int, token: str, delay_seconds: float, error: str) -> bool:
        return self._settle(_RETRY, delivery_id, token, {"p_delay": delay_seconds, "p_error": error})

    def give_up(self, delivery_id: int, token: str, error: str) -> bool:
        return self._settle(_GIVE_UP, delivery_id, token, {"p_error": error})

    def _settle(self, statement: Any, delivery_id: int, token: str, values: dict[str, Any]) -> bool:
        with self.db.write() as conn:
            done = conn.execute(statement, {"p_id": delivery_id, "p_token": token, "p_now": None, **values})
            return done.rowcount > 0

    def prune_settled(self, before: int) -> int:
        """Drop delivered and given-up rows of events created before `before`; how many."""
        with self.db.write() as conn:
            return int(conn.execute(_PRUNE, {"p_before": before}).rowcount)
