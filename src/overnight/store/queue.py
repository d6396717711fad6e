"""The work queue: batch-level tasks (validate, finalize) and shards, claimed under leases that
heartbeats extend, committed fenced by the lease token. Every claim is one statement.

- A claim is `UPDATE ... WHERE id = (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING`: on
  PostgreSQL concurrent workers skip each other's rows instead of queueing; on SQLite the statement
  runs inside `BEGIN IMMEDIATE`, one writer at a time, and `FOR UPDATE` is left out.
- A lease is a token plus an expiry, on the database's clock (store/clock.py), never a worker's:
  machines whose clocks disagree still agree on whether a lease is live.
- A lease is a token plus an expiry. Whoever holds a live lease may write; a commit or a failure
  report names the token (`WHERE lease_token = :t`), so a worker whose lease was taken over cannot
  commit. An expired lease is anyone's to claim again.
- Writes that end a phase (validating -> in_progress or failed, finalizing -> a terminal state) are
  fenced by the batch's lease the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import orjson
from sqlalchemy import Boolean, and_, bindparam, case, exists, func, or_, select, update

from overnight import constants as C
from overnight.store import schema as T
from overnight.store.clock import LEASE_NOW, database_now
from overnight.store.database import Database
from overnight.store.records import (
    BatchRecord,
    BatchTask,
    ClaimedShard,
    DeliveryLease,
    FileRecord,
    SettledShard,
    ShardPlan,
    ShardProgress,
    ShardResult,
    WebhookEvent,
    WholeOutput,
)
from overnight.store.rows import INSERT_FILE, batch_record, file_values, insert_shards
from overnight.store.webhooks import insert_webhook_events

# -- statements, built once ------------------------------------------------------------------
# Building a statement and its cache key cost more than running it: an empty claim took 0.62 ms
# of CPU with the statement built per call, 0.14 ms prebuilt. Parameters are bound at execution.

_b, _s, _f = T.batches, T.shards, T.files


def _claim_batch_task_statement() -> Any:
    live_shard = exists().where(
        _s.c.batch_id == _b.c.id, _s.c.status == C.SHARD_RUNNING, _s.c.lease_expires_at > LEASE_NOW
    )
    lease_free = or_(_b.c.lease_expires_at.is_(None), _b.c.lease_expires_at < LEASE_NOW)
    ready = or_(
        _b.c.status.in_([C.VALIDATING, C.FINALIZING]),
        and_(_b.c.status == C.CANCELLING, ~live_shard),
        and_(_b.c.status == C.IN_PROGRESS, _b.c.expires_at <= LEASE_NOW, ~live_shard),
    )
    candidate = (
        select(_b.c.id).where(lease_free, ready).order_by(_b.c.seq).limit(1).with_for_update(skip_locked=True)
    )
    return (
        update(_b)
        .where(_b.c.id == candidate.scalar_subquery())
        .values(lease_token=bindparam("p_token"), lease_expires_at=LEASE_NOW + bindparam("p_lease_seconds"))
        .returning(*_b.c)
    )


def _claim_shard_statement(kind: Literal["expired", "urgent", "any"]) -> Any:
    """Claim one shard in (shard_index, id) order, so batches advance round-robin instead of one
    starving the rest. Each kind reads one status through `ix_shards_claim_order`, in order, and
    stops at the first shard of an open batch; a single `pending OR expired-running` condition
    sorted on the batch's deadline had the database read and sort every candidate instead (1 ms
    per claim at 1,000 pending shards, 9 ms at 20,000).

    - `expired`: a running shard whose lease ran out (its worker died or hangs), first: it has
      waited longest. Only the one claimed changes hands; other late holders may still commit.
    - `urgent`: pending shards of batches due within the horizon (a 1h batch overtakes a 7d one);
    - `any`: pending shards of any open batch."""
    open_batch = and_(_b.c.status == C.IN_PROGRESS, _b.c.expires_at > LEASE_NOW)
    if kind == "urgent":
        open_batch = and_(open_batch, _b.c.expires_at < LEASE_NOW + bindparam("p_horizon"))
    if kind == "expired":
        claimable = and_(_s.c.status == C.SHARD_RUNNING, _s.c.lease_expires_at < LEASE_NOW)
    else:
        claimable = _s.c.status == C.SHARD_PENDING
    # OFFSET 0 keeps PostgreSQL from turning the open batches into the outer side of a join (then
    # it reads every pending shard of every open batch and sorts them): evaluated once as a hashed
    # set, it lets the claim walk the shards' index in order and stop at the first match.
    open_batches = select(_b.c.id).where(open_batch).offset(0)
    candidate = (
        select(_s.c.id)
        .where(claimable, _s.c.batch_id.in_(open_batches))
        .order_by(_s.c.shard_index, _s.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return (
        update(_s)
        .where(_s.c.id == candidate.scalar_subquery(), claimable)
        .values(
            status=C.SHARD_RUNNING,
            lease_token=bindparam("p_token"),
            lease_expires_at=LEASE_NOW + bindparam("p_lease_seconds"),
            attempt=_s.c.attempt + 1,
            completed=0,
            failed=0,
            started_at=LEASE_NOW,
            finished_at=None,
        )
        .returning(*_s.c)
    )


# Whether any open batch is due within the horizon (usually none: then the urgent claim is skipped).
_ANY_URGENT = select(_b.c.id).where(
    _b.c.status == C.IN_PROGRESS, _b.c.expires_at > LEASE_NOW, _b.c.expires_at < LEASE_NOW + bindparam("p_horizon")
).limit(1)
_CLAIM_BATCH_TASK = _claim_batch_task_statement()
_INPUT_KEY = select(_f.c.storage_key).where(_f.c.id == bindparam("p_file"))
_SKIP_OPEN_SHARDS = (
    update(_s)
    .where(_s.c.batch_id == bindparam("p_batch"), _s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING]))
    .values(status=C.SHARD_SKIPPED, lease_token=None)
)
_SETTLED_SHARDS = (
    select(
        _s.c.shard_index,
        _s.c.status,
        _s.c.result_key,
        _s.c.result_output_bytes,
        _s.c.first_request,
        _s.c.request_count,
        _s.c.byte_offset,
        _s.c.byte_length,
        _s.c.expired,
        _s.c.last_error,
        _s.c.error_codes,
        _s.c.completed,
        _s.c.failed,
    )
    .where(_s.c.batch_id == bindparam("p_batch"))
    .order_by(_s.c.shard_index)
)
_EXTEND_BATCH_LEASE = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"))
    .values(lease_expires_at=LEASE_NOW + bindparam("p_lease_seconds"))
)
_CLAIM_EXPIRED_SHARD = _claim_shard_statement("expired")
_CLAIM_URGENT_SHARD = _claim_shard_statement("urgent")
_CLAIM_SHARD = _claim_shard_statement("any")
_SHARD_BATCH = (
    select(_b.c.endpoint, _b.c.expires_at, _b.c.request_id, _b.c.owner, _b.c.request_total,
           _b.c.output_expires_after, _b.c.created_at, _f.c.storage_key)
    .select_from(_b.join(_f, _f.c.id == _b.c.input_file_id))
    .where(_b.c.id == bindparam("p_batch"))
)
_HEARTBEAT = (
    update(_s)
    .where(_s.c.id == bindparam("p_shard"), _s.c.lease_token == bindparam("p_token"))
    .values(lease_expires_at=LEASE_NOW + bindparam("p_lease_seconds"), completed=bindparam("p_completed"),
            failed=bindparam("p_failed"))
)
_STOPPED_SHARDS = (
    select(_s.c.id)
    .select_from(_s.join(_b, _b.c.id == _s.c.batch_id))
    .where(_s.c.id.in_(bindparam("p_shards", expanding=True)), _b.c.status != C.IN_PROGRESS)
)
_COMMIT_SHARD = (
    update(_s)
    .where(_s.c.id == bindparam("p_shard"), _s.c.lease_token == bindparam("p_token"),
           _s.c.status == C.SHARD_RUNNING)
    .values(
        status=C.SHARD_DONE,
        lease_token=None,
        lease_expires_at=None,
        result_key=bindparam("p_result_key"),
        result_output_bytes=bindparam("p_output_bytes"),
        completed=bindparam("p_completed"),
        failed=bindparam("p_failed"),
        input_tokens=bindparam("p_input_tokens"),
        cached_tokens=bindparam("p_cached_tokens"),
        output_tokens=bindparam("p_output_tokens"),
        reasoning_tokens=bindparam("p_reasoning_tokens"),
        model=bindparam("p_model"),
        expired=bindparam("p_expired"),
        error_codes=bindparam("p_error_codes"),
        finished_at=database_now(),
    )
)
# A failed attempt: back to pending at once, unless the previous attempt failed the same way (or
# the attempts ran out): then the shard is settled as failed and its lines reported, not retried.
_FAIL_SHARD = (
    update(_s)
    .where(_s.c.id == bindparam("p_shard"), _s.c.lease_token == bindparam("p_token"),
           _s.c.status == C.SHARD_RUNNING)
    .values(
        status=case(
            (or_(_s.c.last_error == bindparam("p_error"), bindparam("p_give_up", type_=Boolean)), C.SHARD_FAILED),
            else_=C.SHARD_PENDING,
        ),
        last_error=bindparam("p_error"),
        lease_token=None,
        lease_expires_at=None,
        completed=0,
        failed=0,
    )
    .returning(_s.c.status, _s.c.request_count)
)
_ADD_SHARD_TO_BATCH = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"))
    .values(
        request_completed=_b.c.request_completed + bindparam("p_completed"),
        request_failed=_b.c.request_failed + bindparam("p_failed"),
        input_tokens=_b.c.input_tokens + bindparam("p_input_tokens"),
        cached_tokens=_b.c.cached_tokens + bindparam("p_cached_tokens"),
        output_tokens=_b.c.output_tokens + bindparam("p_output_tokens"),
        reasoning_tokens=_b.c.reasoning_tokens + bindparam("p_reasoning_tokens"),
        model=func.coalesce(_b.c.model, bindparam("p_model")),
    )
)
_NO_COUNTS = {"p_completed": 0, "p_failed": 0, "p_input_tokens": 0, "p_cached_tokens": 0, "p_output_tokens": 0,
              "p_reasoning_tokens": 0, "p_model": None}
_FINALIZE_IF_LAST = (
    update(_b)
    .where(
        _b.c.id == bindparam("p_batch"),
        _b.c.status == C.IN_PROGRESS,
        ~exists().where(_s.c.batch_id == bindparam("p_batch"), _s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING])),
    )
    .values(status=C.FINALIZING, finalizing_at=bindparam("p_now_int"))
)
# The worker that commits a batch's last shard takes the batch's lease in the same transaction and
# finalizes it at once, instead of another worker (or itself) claiming the finalize task later.
_LEASE_READY_BATCH = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.status == C.FINALIZING,
           or_(_b.c.lease_expires_at.is_(None), _b.c.lease_expires_at < LEASE_NOW))
    .values(lease_token=bindparam("p_token"), lease_expires_at=LEASE_NOW + bindparam("p_lease_seconds"))
    .returning(*_b.c)
)
_START_BATCH = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"), _b.c.status == C.VALIDATING)
    .values(status=C.IN_PROGRESS, in_progress_at=bindparam("p_now_int"), request_total=bindparam("p_total"),
            lease_token=None, lease_expires_at=None)
)
_FINISH_BATCH = {
    final: update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"))
    .values(
        status=final,
        output_file_id=bindparam("p_output"),
        error_file_id=bindparam("p_error"),
        request_completed=bindparam("p_completed"),
        request_failed=bindparam("p_failed"),
        outcome_json=bindparam("p_outcome"),
        lease_token=None,
        lease_expires_at=None,
        **{stamp: bindparam("p_now_int")},
    )
    for final, stamp in ((C.COMPLETED, "completed_at"), (C.CANCELLED, "cancelled_at"), (C.EXPIRED, "expired_at"))
}
# Every transaction that writes a shard and its batch locks the batch first (commit, failure,
# the finalize claim, cancel), so on PostgreSQL two of them never wait for each other in a cycle,
# and "was this the last open shard?" is asked by one of them at a time. (No-op on SQLite, where
# BEGIN IMMEDIATE already makes writers take turns.)
_LOCK_BATCH = select(_b.c.id).where(_b.c.id == bindparam("p_batch")).with_for_update()
_FAIL_BATCH = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"), _b.c.status == C.VALIDATING)
    .values(status=C.FAILED, failed_at=bindparam("p_now_int"), errors_json=bindparam("p_errors"),
            lease_token=None, lease_expires_at=None)
)
_RELEASE_BATCH_LEASE = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"))
    .values(lease_token=None, lease_expires_at=None)
)
_RELEASE_SHARD = (
    update(_s)
    .where(_s.c.id == bindparam("p_shard"), _s.c.lease_token == bindparam("p_token"), _s.c.status == C.SHARD_RUNNING)
    .values(status=C.SHARD_PENDING, lease_token=None, lease_expires_at=None, completed=0, failed=0,
            handed_back=_s.c.handed_back + 1)
)


class SqlWorkQueue:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim_batch_task(self, now: float | None, lease_seconds: float, token: str) -> BatchTask | None:
        """Claim one piece of batch-level work whose lease is free, in one write transaction:

        - `validate` a batch in `validating`;
        - `finalize` a batch in `finalizing` (towards completed), in `cancelling` with no shard
          still running under a live lease (towards cancelled), or `in_progress` past its
          `expires_at` with no live shard (towards expired).
        Shards that never ran, or whose holder died, are marked skipped in the same transaction.
        """
        with self.db.write() as conn:
            row = conn.execute(
                _CLAIM_BATCH_TASK, {"p_now": now, "p_token": token, "p_lease_seconds": lease_seconds}
            ).first()
            if row is None:
                return None
            batch = batch_record(row)
            if batch.status == C.VALIDATING:
                input_key = conn.execute(_INPUT_KEY, {"p_file": batch.input_file_id}).scalar()
                return BatchTask("validate", batch, token, input_storage_key=input_key)
            # Whatever has not committed by now never will: its lines are reported, not run.
            conn.execute(_SKIP_OPEN_SHARDS, {"p_batch": batch.id})
            return _finalize_task(conn, batch, token)

    def extend_batch_lease(self, batch_id: str, token: str, lease_seconds: float, now: float | None = None) -> bool:
        with self.db.write() as conn:
            result = conn.execute(_EXTEND_BATCH_LEASE, {
                "p_batch": batch_id, "p_token": token, "p_now": now, "p_lease_seconds": lease_seconds,
            })
            return result.rowcount > 0

    def start_batch(
        self, batch_id: str, token: str, plans: Sequence[ShardPlan], total: int, now: int
    ) -> bool:
        """validating -> in_progress with its shards, if we still hold the lease and nobody cancelled."""
        with self.db.write() as conn:
            moved = conn.execute(
                _START_BATCH, {"p_batch": batch_id, "p_token": token, "p_now_int": now, "p_total": total}
            )
            if not moved.rowcount:
                return False
            insert_shards(conn, batch_id, plans)
            return True

    def fail_batch(
        self, batch_id: str, token: str, errors: list[dict[str, Any]], now: int,
        events: Sequence[WebhookEvent] = (),
    ) -> bool:
        """validating -> failed, and its webhook events queued in the same transaction."""
        with self.db.write() as conn:
            result = conn.execute(_FAIL_BATCH, {
                "p_batch": batch_id, "p_token": token, "p_now_int": now, "p_errors": orjson.dumps(errors).decode(),
            })
            if not result.rowcount:
                return False
            insert_webhook_events(conn, events)
            return True

    def release_batch_lease(self, batch_id: str, token: str) -> None:
        with self.db.write() as conn:
            conn.execute(_RELEASE_BATCH_LEASE, {"p_batch": batch_id, "p_token": token})

    def claim_shard(
        self, now: float | None, lease_seconds: float, token: str, horizon_seconds: float = C.DEADLINE_HORIZON_SECONDS
    ) -> ClaimedShard | None:
        """Claim the next runnable shard: a running shard whose lease expired (its worker died)
        first, then pending shards of batches due within `horizon_seconds`, then any pending
        shard; each in shard_index order, so concurrent batches advance round-robin instead of
        one batch starving the rest. Only shards of in-progress batches before their deadline.
        One transaction; each step reads its index in order and stops at the first match.
        """
        params = {"p_now": now, "p_token": token, "p_lease_seconds": lease_seconds, "p_horizon": horizon_seconds}
        with self.db.write() as conn:
            row = conn.execute(_CLAIM_EXPIRED_SHARD, params).first()
            if row is None and conn.execute(_ANY_URGENT, params).first() is not None:
                row = conn.execute(_CLAIM_URGENT_SHARD, params).first()
            if row is None:
                row = conn.execute(_CLAIM_SHARD, params).first()
            if row is None:
                return None
            batch = conn.execute(_SHARD_BATCH, {"p_batch": row.batch_id}).one()
        return ClaimedShard(
            shard_id=row.id,
            lease_token=token,
            attempt=row.attempt,
            handed_back=row.handed_back,
            batch_id=row.batch_id,
            shard_index=row.shard_index,
            first_request=row.first_request,
            request_count=row.request_count,
            byte_offset=row.byte_offset,
            byte_length=row.byte_length,
            endpoint=batch.endpoint,
            expires_at=batch.expires_at,
            input_storage_key=batch.storage_key,
            last_error=row.last_error,
            request_id=batch.request_id,
            owner=batch.owner,
            batch_requests=batch.request_total,
            output_expires_after=batch.output_expires_after,
            batch_created_at=batch.created_at,
        )

    def heartbeat_shards(
        self, leases: Sequence[ShardProgress], lease_seconds: float, now: float | None = None
    ) -> tuple[set[int], set[int]]:
        """Extend the leases we hold and record each shard's live progress (so request_counts move
        before the shard commits). Returns (shards whose lease we lost, shards whose batch stopped
        being in progress: cancelled or past its deadline), so the runner stops sending their lines."""
        if not leases:
            return set(), set()
        lost: set[int] = set()
        with self.db.write() as conn:
            for lease in leases:
                result = conn.execute(_HEARTBEAT, {
                    "p_shard": lease.shard_id, "p_token": lease.lease_token, "p_now": now,
                    "p_lease_seconds": lease_seconds,
                    "p_completed": lease.completed, "p_failed": lease.failed,
                })
                if not result.rowcount:
                    lost.add(lease.shard_id)
            ids = [lease.shard_id for lease in leases]
            stopped = conn.execute(_STOPPED_SHARDS, {"p_shards": ids}).scalars()
            return lost, set(stopped)

    def release_shards(self, leases: Sequence[tuple[int, str]]) -> None:
        """Hand back shards we hold but will not finish (a graceful stop, an outage): they are
        pending again at once, instead of after their lease runs out, and the claim is not counted
        against max_shard_attempts."""
        with self.db.write() as conn:
            for shard_id, token in leases:
                conn.execute(_RELEASE_SHARD, {"p_shard": shard_id, "p_token": token})

    def commit_shard(
        self, shard_id: int, token: str, batch_id: str, result: ShardResult, now: int,
        finalize_lease: tuple[str, float] | None = None, publish: WholeOutput | None = None,
    ) -> Literal["lost", "committed", "batch_ready", "finished"] | BatchTask:
        """Mark a shard done if we still hold its lease, add its counts to the batch, and move the
        batch to finalizing when this was its last open shard (`batch_ready`). `lost`: the lease
        was lost, the results object is an orphan and someone else runs (or ran) the shard.

        With `finalize_lease` (token, seconds), a batch this commit made ready is also leased to
        the caller in the same transaction, and its finalize task returned: one transaction and
        one claim fewer per batch, which small batches feel. With `publish` too, a batch whose
        lines are all this shard's completes in the same transaction with that output file
        (`finished`): no finalize step at all (most small batches)."""
        counts = {
            "p_completed": result.completed,
            "p_failed": result.failed,
            "p_input_tokens": result.input_tokens,
            "p_cached_tokens": result.cached_tokens,
            "p_output_tokens": result.output_tokens,
            "p_reasoning_tokens": result.reasoning_tokens,
            "p_model": result.model.replace("\x00", "") if result.model else None,  # PostgreSQL text has no NUL
        }
        with self.db.write() as conn:
            conn.execute(_LOCK_BATCH, {"p_batch": batch_id})
            done = conn.execute(_COMMIT_SHARD, {
                "p_shard": shard_id, "p_token": token, "p_result_key": result.result_key,
                "p_output_bytes": result.output_bytes, "p_expired": result.expired,
                "p_error_codes": orjson.dumps(result.error_codes).decode() if result.error_codes else None, **counts,
            })
            if not done.rowcount:
                return "lost"
            conn.execute(_ADD_SHARD_TO_BATCH, {"p_batch": batch_id, **counts})
            ready = conn.execute(_FINALIZE_IF_LAST, {"p_batch": batch_id, "p_now_int": now})
            if not ready.rowcount:
                return "committed"
            if finalize_lease is None:
                return "batch_ready"
            finalize_token, lease_seconds = finalize_lease
            row = conn.execute(_LEASE_READY_BATCH, {
                "p_batch": batch_id, "p_token": finalize_token, "p_lease_seconds": lease_seconds, "p_now": None,
            }).first()
            if row is None:
                return "batch_ready"
            if publish is not None and row.request_total == publish.lines == result.completed and not result.failed:
                outcome = {"completed": result.completed, "failed": 0, "errors_by_code": {}}
                if _finish(conn, batch_id, finalize_token, C.COMPLETED, publish.output_file, None, result.completed,
                           0, now, outcome, publish.events, publish.deliveries):
                    return "finished"
            return _finalize_task(conn, batch_record(row), finalize_token)

    def fail_shard(
        self, shard_id: int, token: str, batch_id: str, error: str, give_up: bool, now: int
    ) -> Literal["lost", "retry", "failed", "batch_ready"]:
        """Record that an attempt at a shard failed (fenced by the lease). It runs again at once
        (`retry`), unless it failed with this same error before or `give_up`: then it is settled as
        failed (`failed`, or `batch_ready` when that was the batch's last open shard)."""
        with self.db.write() as conn:
            conn.execute(_LOCK_BATCH, {"p_batch": batch_id})
            row = conn.execute(_FAIL_SHARD, {
                "p_shard": shard_id, "p_token": token, "p_error": error.replace("\x00", ""), "p_give_up": give_up,
            }).first()
            if row is None:
                return "lost"
            if row.status == C.SHARD_PENDING:
                return "retry"
            # Its lines are failed from now on (finalize reports them): counted at once, so that a
            # running batch's request_counts and deadline warning see them.
            conn.execute(_ADD_SHARD_TO_BATCH, {"p_batch": batch_id, **_NO_COUNTS, "p_failed": row.request_count})
            ready = conn.execute(_FINALIZE_IF_LAST, {"p_batch": batch_id, "p_now_int": now})
            return "batch_ready" if ready.rowcount else "failed"

    def finish_batch(
        self,
        batch_id: str,
        token: str,
        final_status: str,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
        completed: int,
        failed: int,
        now: int,
        outcome: dict[str, Any] | None = None,
        events: Sequence[WebhookEvent] = (),
        deliveries: DeliveryLease | None = None,
    ) -> bool:
        """Publish the output/error files and move the batch to its terminal state, fenced by the
        lease; the state's webhook events are queued in the same transaction (never lost between),
        and leased to the caller's sender as they are with `deliveries`."""
        with self.db.write() as conn:
            return _finish(conn, batch_id, token, final_status, output_file, error_file, completed, failed, now,
                           outcome, events, deliveries)


def _finish(
    conn: Any, batch_id: str, token: str, final_status: str, output_file: FileRecord | None,
    error_file: FileRecord | None, completed: int, failed: int, now: int, outcome: dict[str, Any] | None,
    events: Sequence[WebhookEvent], deliveries: DeliveryLease | None,
) -> bool:
    moved = conn.execute(_FINISH_BATCH[final_status], {
        "p_batch": batch_id, "p_token": token, "p_now_int": now,
        "p_outcome": orjson.dumps(outcome).decode() if outcome is not None else None,
        "p_output": output_file.id if output_file else None,
        "p_error": error_file.id if error_file else None,
        "p_completed": completed, "p_failed": failed,
    })
    if not moved.rowcount:
        return False
    for record in (output_file, error_file):
        if record is not None:
            conn.execute(INSERT_FILE, file_values(record))
    insert_webhook_events(conn, events, deliveries)
    return True


def _finalize_task(conn: Any, batch: BatchRecord, token: str) -> BatchTask:
    """The finalize task of a batch leased to `token` whose shards are all settled."""
    input_key = conn.execute(_INPUT_KEY, {"p_file": batch.input_file_id}).scalar()
    settled = [SettledShard(**r._mapping) for r in conn.execute(_SETTLED_SHARDS, {"p_batch": batch.id}).all()]
    final = {C.FINALIZING: C.COMPLETED, C.CANCELLING: C.CANCELLED}.get(batch.status, C.EXPIRED)
    if final == C.COMPLETED and any(shard.expired for shard in settled):
        final = C.EXPIRED  # the window closed before every line ran: OpenAI's `expired`
    return BatchTask("finalize", batch, token, final, input_key, settled)
