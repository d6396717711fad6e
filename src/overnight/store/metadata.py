"""MetadataStore: every query overnight runs, as SQLAlchemy Core over SQLite or PostgreSQL.

Methods are synchronous and short; async callers run them in a thread. Writes on SQLite take the
write lock up front (`BEGIN IMMEDIATE`) so two writers never deadlock upgrading a read lock; on
PostgreSQL the claims use `FOR UPDATE SKIP LOCKED` so many workers never queue behind each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import (
    BindParameter,
    Boolean,
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url

from overnight import constants as C
from overnight.files.private import create_private, tighten
from overnight.store import schema as T
from overnight.store.records import (
    BatchRecord,
    BatchTask,
    ClaimedShard,
    FileRecord,
    SettledShard,
    ShardPlan,
    ShardProgress,
    ShardResult,
)

_BATCH_COLUMNS = [c for c in T.batches.c if c.name not in ("seq", "errors_json", "metadata_json", "lease_expires_at")]
_BATCH_FIELDS = [c.name for c in _BATCH_COLUMNS]


def _private_sqlite_files(url: str) -> None:
    """SQLite creates a database file 0644 (less the umask) and gives its -wal and -shm files the
    database file's permissions: so create the file 0600 before SQLite does, and tighten the files
    an older version left 0644. An empty file is an empty database to SQLite."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(create_private(Path(path), exclusive=False))
    except OSError:
        return  # a missing directory, say: SQLite reports it when it opens the file
    for name in (path, f"{path}-wal", f"{path}-shm"):
        tighten(Path(name))


def _sqlite_engine(url: str) -> Engine:
    # A small pool: opening a SQLite connection (and its PRAGMAs) costs more than most queries.
    engine = create_engine(
        url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=8
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, not just a killed process. Commits are per shard,
        # not per line, so the fsync is cheap.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _batch_record(row: Any) -> BatchRecord:
    m = row._mapping  # a property that builds a view: take it once, not once per column
    errors_json = m["errors_json"]
    metadata_json = m["metadata_json"]
    return BatchRecord(
        **{name: m[name] for name in _BATCH_FIELDS},
        errors=orjson.loads(errors_json) if errors_json else None,
        metadata=orjson.loads(metadata_json) if metadata_json else None,
    )


def _file_record(row: Any) -> FileRecord:
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


def _owned(table: Any, owner: str | None) -> Any:
    """Rows of `owner`; None is the admin view (every owner)."""
    return True if owner is None else table.c.owner == owner


# -- statements run per shard or per API call, built once -------------------------------------
# Building a statement and its cache key cost more than running it: an empty claim took 0.62 ms
# of CPU with the statement built per call, 0.14 ms prebuilt. Parameters are bound at execution.

_b, _s, _f = T.batches, T.shards, T.files
_NOW: BindParameter[float] = bindparam("p_now")


def _claim_batch_task_statement() -> Any:
    live_shard = exists().where(
        _s.c.batch_id == _b.c.id, _s.c.status == C.SHARD_RUNNING, _s.c.lease_expires_at > _NOW
    )
    lease_free = or_(_b.c.lease_expires_at.is_(None), _b.c.lease_expires_at < _NOW)
    ready = or_(
        _b.c.status.in_([C.VALIDATING, C.FINALIZING]),
        and_(_b.c.status == C.CANCELLING, ~live_shard),
        and_(_b.c.status == C.IN_PROGRESS, _b.c.expires_at <= _NOW, ~live_shard),
    )
    candidate = (
        select(_b.c.id).where(lease_free, ready).order_by(_b.c.seq).limit(1).with_for_update(skip_locked=True)
    )
    return (
        update(_b)
        .where(_b.c.id == candidate.scalar_subquery())
        .values(lease_token=bindparam("p_token"), lease_expires_at=bindparam("p_until"))
        .returning(*_b.c)
    )


def _claim_shard_statement() -> Any:
    runnable = or_(
        _s.c.status == C.SHARD_PENDING,
        and_(_s.c.status == C.SHARD_RUNNING, _s.c.lease_expires_at < _NOW),
    )
    open_batch = exists().where(_b.c.id == _s.c.batch_id, _b.c.status == C.IN_PROGRESS, _b.c.expires_at > _NOW)
    candidate = (
        select(_s.c.id)
        .where(runnable, open_batch)
        .order_by(_s.c.shard_index, _s.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return (
        update(_s)
        .where(_s.c.id == candidate.scalar_subquery())
        .values(
            status=C.SHARD_RUNNING,
            lease_token=bindparam("p_token"),
            lease_expires_at=bindparam("p_until"),
            attempt=_s.c.attempt + 1,
            completed=0,
            failed=0,
        )
        .returning(*_s.c)
    )


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
    )
    .where(_s.c.batch_id == bindparam("p_batch"))
    .order_by(_s.c.shard_index)
)
_EXTEND_BATCH_LEASE = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"))
    .values(lease_expires_at=bindparam("p_until"))
)
_CLAIM_SHARD = _claim_shard_statement()
_SHARD_BATCH = (
    select(_b.c.endpoint, _b.c.expires_at, _f.c.storage_key)
    .select_from(_b.join(_f, _f.c.id == _b.c.input_file_id))
    .where(_b.c.id == bindparam("p_batch"))
)
_HEARTBEAT = (
    update(_s)
    .where(_s.c.id == bindparam("p_shard"), _s.c.lease_token == bindparam("p_token"))
    .values(lease_expires_at=bindparam("p_until"), completed=bindparam("p_completed"),
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
    .returning(_s.c.status)
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
_FINALIZE_IF_LAST = (
    update(_b)
    .where(
        _b.c.id == bindparam("p_batch"),
        _b.c.status == C.IN_PROGRESS,
        ~exists().where(_s.c.batch_id == bindparam("p_batch"), _s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING])),
    )
    .values(status=C.FINALIZING, finalizing_at=bindparam("p_now_int"))
)
_START_BATCH = (
    update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"), _b.c.status == C.VALIDATING)
    .values(status=C.IN_PROGRESS, in_progress_at=bindparam("p_now_int"), request_total=bindparam("p_total"),
            lease_token=None, lease_expires_at=None)
)
_INSERT_SHARDS = insert(_s)
_FINISH_BATCH = {
    final: update(_b)
    .where(_b.c.id == bindparam("p_batch"), _b.c.lease_token == bindparam("p_token"))
    .values(
        status=final,
        output_file_id=bindparam("p_output"),
        error_file_id=bindparam("p_error"),
        request_completed=bindparam("p_completed"),
        request_failed=bindparam("p_failed"),
        lease_token=None,
        lease_expires_at=None,
        **{stamp: bindparam("p_now_int")},
    )
    for final, stamp in ((C.COMPLETED, "completed_at"), (C.CANCELLED, "cancelled_at"), (C.EXPIRED, "expired_at"))
}
_INSERT_BATCH = insert(_b)
_INSERT_FILE = insert(_f)
# API reads, in two forms: scoped to an owner, and the admin view of every owner.
_GET_BATCH = {
    True: select(_b).where(_b.c.id == bindparam("p_batch"), _b.c.owner == bindparam("p_owner")),
    False: select(_b).where(_b.c.id == bindparam("p_batch")),
}
# Not deleted and not expired at `p_now`.
_VISIBLE_FILE = and_(_f.c.deleted_at.is_(None), or_(_f.c.expires_at.is_(None), _f.c.expires_at > _NOW))
_GET_FILE = {
    True: select(_f).where(_f.c.id == bindparam("p_file"), _f.c.owner == bindparam("p_owner"), _VISIBLE_FILE),
    False: select(_f).where(_f.c.id == bindparam("p_file"), _VISIBLE_FILE),
}
_LIVE_PROGRESS = (
    select(_s.c.batch_id, func.sum(_s.c.completed), func.sum(_s.c.failed))
    .where(_s.c.batch_id.in_(bindparam("p_batches", expanding=True)), _s.c.status == C.SHARD_RUNNING)
    .group_by(_s.c.batch_id)
)


class MetadataStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            _private_sqlite_files(url)
            self.engine = _sqlite_engine(url)
        else:
            self.engine = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)

    # -- plumbing ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(write=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- api keys ---------------------------------------------------------------------------

    def stored_key_hashes(self) -> dict[str, tuple[str, bool]]:
        with self._read() as conn:
            rows = conn.execute(select(T.api_keys.c.key_hash, T.api_keys.c.owner, T.api_keys.c.is_admin))
            return {r.key_hash: (r.owner, bool(r.is_admin)) for r in rows}

    def add_key_hash(self, key_hash: str, owner: str, is_admin: bool, now: int) -> None:
        with self._write() as conn:
            conn.execute(
                insert(T.api_keys).values(key_hash=key_hash, owner=owner, is_admin=is_admin, created_at=now)
            )

    # -- files ------------------------------------------------------------------------------

    def insert_file(self, record: FileRecord) -> None:
        with self._write() as conn:
            conn.execute(_INSERT_FILE, _file_values(record))

    def get_file(self, owner: str | None, file_id: str, now: int) -> FileRecord | None:
        with self._read() as conn:
            row = conn.execute(
                _GET_FILE[owner is not None], {"p_file": file_id, "p_owner": owner, "p_now": now}
            ).first()
        return _file_record(row) if row else None

    def list_files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str, now: int
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None when the `after` cursor is unknown."""
        descending = order == "desc"
        query = select(T.files).where(_owned(T.files, owner), _VISIBLE_FILE)
        if purpose:
            query = query.where(T.files.c.purpose == purpose)
        with self._read() as conn:
            if after:
                cursor = conn.execute(
                    select(T.files.c.seq).where(T.files.c.id == after, _owned(T.files, owner))
                ).scalar()
                if cursor is None:
                    return None
                query = query.where(T.files.c.seq < cursor if descending else T.files.c.seq > cursor)
            query = query.order_by(T.files.c.seq.desc() if descending else T.files.c.seq.asc())
            rows = conn.execute(query.limit(limit + 1), {"p_now": now}).all()
        return [_file_record(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, owner: str | None, file_id: str, now: int) -> bool:
        """Hide the file at once; its bytes are removed by `collect_garbage` once nothing reads them."""
        with self._write() as conn:
            result = conn.execute(
                update(T.files)
                .where(T.files.c.id == file_id, _owned(T.files, owner), _VISIBLE_FILE)
                .values(deleted_at=now),
                {"p_now": now},
            )
            return result.rowcount > 0

    # -- batches: API side ------------------------------------------------------------------

    def insert_batch(self, record: BatchRecord) -> None:
        values = {c.name: getattr(record, c.name) for c in _BATCH_COLUMNS}
        values["metadata_json"] = orjson.dumps(record.metadata).decode() if record.metadata is not None else None
        with self._write() as conn:
            conn.execute(_INSERT_BATCH, values)

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        with self._read() as conn:
            row = conn.execute(_GET_BATCH[owner is not None], {"p_batch": batch_id, "p_owner": owner}).first()
            return _with_live_counts(conn, [_batch_record(row)])[0] if row else None

    def list_batches(
        self, owner: str | None, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool] | None:
        """Newest first. None when the `after` cursor is unknown."""
        query = select(T.batches).where(_owned(T.batches, owner))
        with self._read() as conn:
            if after:
                cursor = conn.execute(
                    select(T.batches.c.seq).where(T.batches.c.id == after, _owned(T.batches, owner))
                ).scalar()
                if cursor is None:
                    return None
                query = query.where(T.batches.c.seq < cursor)
            rows = conn.execute(query.order_by(T.batches.c.seq.desc()).limit(limit + 1)).all()
            return _with_live_counts(conn, [_batch_record(r) for r in rows[:limit]]), len(rows) > limit

    def request_cancel(self, owner: str | None, batch_id: str, now: int) -> BatchRecord | None:
        """Move a validating/in-progress batch to cancelling and skip its shards that never started.

        Returns the batch as it is afterwards (unchanged if it could not be cancelled)."""
        with self._write() as conn:
            where = and_(T.batches.c.id == batch_id, _owned(T.batches, owner))
            moved = conn.execute(
                update(T.batches)
                .where(where, T.batches.c.status.in_([C.VALIDATING, C.IN_PROGRESS]))
                .values(status=C.CANCELLING, cancelling_at=now)
            )
            if moved.rowcount:
                conn.execute(
                    update(T.shards)
                    .where(T.shards.c.batch_id == batch_id, T.shards.c.status == C.SHARD_PENDING)
                    .values(status=C.SHARD_SKIPPED)
                )
            row = conn.execute(select(T.batches).where(where)).first()
        return _batch_record(row) if row else None

    # -- batches: worker side ---------------------------------------------------------------

    def claim_batch_task(self, now: float, lease_seconds: float, token: str) -> BatchTask | None:
        """Claim one piece of batch-level work whose lease is free, in one write transaction:

        - `validate` a batch in `validating`;
        - `finalize` a batch in `finalizing` (towards completed), in `cancelling` with no shard
          still running under a live lease (towards cancelled), or `in_progress` past its
          `expires_at` with no live shard (towards expired).
        Shards that never ran, or whose holder died, are marked skipped in the same transaction.
        """
        with self._write() as conn:
            row = conn.execute(
                _CLAIM_BATCH_TASK, {"p_now": now, "p_token": token, "p_until": now + lease_seconds}
            ).first()
            if row is None:
                return None
            batch = _batch_record(row)
            input_key = conn.execute(_INPUT_KEY, {"p_file": batch.input_file_id}).scalar()
            if batch.status == C.VALIDATING:
                return BatchTask("validate", batch, token, input_storage_key=input_key)
            # Whatever has not committed by now never will: its lines are reported, not run.
            conn.execute(_SKIP_OPEN_SHARDS, {"p_batch": batch.id})
            shards = conn.execute(_SETTLED_SHARDS, {"p_batch": batch.id}).all()
        settled = [SettledShard(**r._mapping) for r in shards]
        final = {C.FINALIZING: C.COMPLETED, C.CANCELLING: C.CANCELLED}.get(batch.status, C.EXPIRED)
        if final == C.COMPLETED and any(shard.expired for shard in settled):
            final = C.EXPIRED  # the window closed before every line ran: OpenAI's `expired`
        return BatchTask("finalize", batch, token, final, input_key, settled)

    def extend_batch_lease(self, batch_id: str, token: str, until: float) -> bool:
        with self._write() as conn:
            result = conn.execute(_EXTEND_BATCH_LEASE, {"p_batch": batch_id, "p_token": token, "p_until": until})
            return result.rowcount > 0

    def start_batch(
        self, batch_id: str, token: str, plans: Sequence[ShardPlan], total: int, now: int
    ) -> bool:
        """validating -> in_progress with its shards, if we still hold the lease and nobody cancelled."""
        with self._write() as conn:
            moved = conn.execute(
                _START_BATCH, {"p_batch": batch_id, "p_token": token, "p_now_int": now, "p_total": total}
            )
            if not moved.rowcount:
                return False
            rows = [
                {
                    "batch_id": batch_id,
                    "shard_index": p.shard_index,
                    "first_request": p.first_request,
                    "request_count": p.request_count,
                    "byte_offset": p.byte_offset,
                    "byte_length": p.byte_length,
                    "status": C.SHARD_PENDING,
                    "attempt": 0,
                }
                for p in plans
            ]
            for start in range(0, len(rows), 500):
                conn.execute(_INSERT_SHARDS, rows[start : start + 500])
            return True

    def fail_batch(self, batch_id: str, token: str, errors: list[dict[str, Any]], now: int) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(T.batches)
                .where(
                    T.batches.c.id == batch_id,
                    T.batches.c.lease_token == token,
                    T.batches.c.status == C.VALIDATING,
                )
                .values(
                    status=C.FAILED,
                    failed_at=now,
                    errors_json=orjson.dumps(errors).decode(),
                    lease_token=None,
                    lease_expires_at=None,
                )
            )
            return result.rowcount > 0

    def release_batch_lease(self, batch_id: str, token: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(T.batches)
                .where(T.batches.c.id == batch_id, T.batches.c.lease_token == token)
                .values(lease_token=None, lease_expires_at=None)
            )

    def claim_shard(self, now: float, lease_seconds: float, token: str) -> ClaimedShard | None:
        """Claim the next runnable shard in one statement.

        Runnable: pending, or running under a lease that expired (its worker died). Only shards of
        in-progress batches before their deadline. Ordered by shard_index first, so concurrent
        batches advance round-robin instead of one batch starving the rest.
        """
        with self._write() as conn:
            row = conn.execute(_CLAIM_SHARD, {"p_now": now, "p_token": token, "p_until": now + lease_seconds}).first()
            if row is None:
                return None
            batch = conn.execute(_SHARD_BATCH, {"p_batch": row.batch_id}).one()
        return ClaimedShard(
            shard_id=row.id,
            lease_token=token,
            attempt=row.attempt,
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
        )

    def heartbeat_shards(
        self, leases: Sequence[ShardProgress], until: float
    ) -> tuple[set[int], set[int]]:
        """Extend the leases we hold and record each shard's live progress (so request_counts move
        before the shard commits). Returns (shards whose lease we lost, shards whose batch stopped
        being in progress: cancelled or past its deadline), so the runner stops sending their lines."""
        if not leases:
            return set(), set()
        lost: set[int] = set()
        with self._write() as conn:
            for lease in leases:
                result = conn.execute(_HEARTBEAT, {
                    "p_shard": lease.shard_id, "p_token": lease.lease_token, "p_until": until,
                    "p_completed": lease.completed, "p_failed": lease.failed,
                })
                if not result.rowcount:
                    lost.add(lease.shard_id)
            ids = [lease.shard_id for lease in leases]
            stopped = conn.execute(_STOPPED_SHARDS, {"p_shards": ids}).scalars()
            return lost, set(stopped)

    def release_shards(self, leases: Sequence[tuple[int, str]]) -> None:
        """Hand back shards we hold but will not finish (graceful shutdown): they are pending again
        at once, instead of after their lease runs out."""
        with self._write() as conn:
            for shard_id, token in leases:
                conn.execute(
                    update(T.shards)
                    .where(T.shards.c.id == shard_id, T.shards.c.lease_token == token,
                           T.shards.c.status == C.SHARD_RUNNING)
                    .values(status=C.SHARD_PENDING, lease_token=None, lease_expires_at=None, completed=0, failed=0)
                )

    def commit_shard(
        self, shard_id: int, token: str, batch_id: str, result: ShardResult, now: int
    ) -> Literal["lost", "committed", "batch_ready"]:
        """Mark a shard done if we still hold its lease, add its counts to the batch, and move the
        batch to finalizing when this was its last open shard (`batch_ready`). `lost`: the lease
        was lost, the results object is an orphan and someone else runs (or ran) the shard."""
        counts = {
            "p_completed": result.completed,
            "p_failed": result.failed,
            "p_input_tokens": result.input_tokens,
            "p_cached_tokens": result.cached_tokens,
            "p_output_tokens": result.output_tokens,
            "p_reasoning_tokens": result.reasoning_tokens,
            "p_model": result.model,
        }
        with self._write() as conn:
            done = conn.execute(_COMMIT_SHARD, {
                "p_shard": shard_id, "p_token": token, "p_result_key": result.result_key,
                "p_output_bytes": result.output_bytes, "p_expired": result.expired, **counts,
            })
            if not done.rowcount:
                return "lost"
            conn.execute(_ADD_SHARD_TO_BATCH, {"p_batch": batch_id, **counts})
            ready = conn.execute(_FINALIZE_IF_LAST, {"p_batch": batch_id, "p_now_int": now})
            return "batch_ready" if ready.rowcount else "committed"

    def fail_shard(
        self, shard_id: int, token: str, batch_id: str, error: str, give_up: bool, now: int
    ) -> Literal["lost", "retry", "failed", "batch_ready"]:
        """Record that an attempt at a shard failed (fenced by the lease). It runs again at once
        (`retry`), unless it failed with this same error before or `give_up`: then it is settled as
        failed (`failed`, or `batch_ready` when that was the batch's last open shard)."""
        with self._write() as conn:
            status = conn.execute(
                _FAIL_SHARD, {"p_shard": shard_id, "p_token": token, "p_error": error, "p_give_up": give_up}
            ).scalar()
            if status is None:
                return "lost"
            if status == C.SHARD_PENDING:
                return "retry"
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
    ) -> bool:
        """Publish the output/error files and move the batch to its terminal state, fenced by the lease."""
        with self._write() as conn:
            moved = conn.execute(_FINISH_BATCH[final_status], {
                "p_batch": batch_id, "p_token": token, "p_now_int": now,
                "p_output": output_file.id if output_file else None,
                "p_error": error_file.id if error_file else None,
                "p_completed": completed, "p_failed": failed,
            })
            if not moved.rowcount:
                return False
            for record in (output_file, error_file):
                if record is not None:
                    conn.execute(_INSERT_FILE, _file_values(record))
            return True

    def batch_status(self, batch_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(T.batches.c.status).where(T.batches.c.id == batch_id)).scalar()

    # -- housekeeping -----------------------------------------------------------------------

    def collect_garbage(self, now: int) -> list[str]:
        """Drop rows of deleted or expired files that no active batch reads; return their storage
        keys so the caller removes the bytes after this commit."""
        f, b = T.files, T.batches
        in_use = exists().where(b.c.input_file_id == f.c.id, b.c.status.in_(list(C.ACTIVE_STATES)))
        gone = or_(f.c.deleted_at.is_not(None), and_(f.c.expires_at.is_not(None), f.c.expires_at <= now))
        with self._write() as conn:
            rows = conn.execute(select(f.c.id, f.c.storage_key).where(gone, ~in_use).limit(1000)).all()
            if rows:
                conn.execute(delete(f).where(f.c.id.in_([r.id for r in rows])))
        return [r.storage_key for r in rows]

    def live_storage_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` are still needed: a file's bytes, or a committed shard's results while its
        batch is not finished (a finished batch's results live on in its output and error files;
        finalize deletes them, and this catches those a crash left behind)."""
        if not keys:
            return set()
        s, b = T.shards, T.batches
        with self._read() as conn:
            used = set(conn.execute(select(T.files.c.storage_key).where(T.files.c.storage_key.in_(keys))).scalars())
            used |= set(
                conn.execute(
                    select(s.c.result_key)
                    .select_from(s.join(b, b.c.id == s.c.batch_id))
                    .where(s.c.result_key.in_(keys), b.c.status.in_(list(C.ACTIVE_STATES)))
                ).scalars()
            )
        return used


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


def _file_values(record: FileRecord) -> dict[str, Any]:
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
