"""MetadataStore: every query overnight runs, as SQLAlchemy Core over SQLite or PostgreSQL.

Methods are synchronous and short; async callers run them in a thread. Writes on SQLite take the
write lock up front (`BEGIN IMMEDIATE`) so two writers never deadlock upgrading a read lock; on
PostgreSQL the claims use `FOR UPDATE SKIP LOCKED` so many workers never queue behind each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    and_,
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

from overnight import constants as C
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


class MetadataStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
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
            conn.execute(insert(T.files).values(**_file_values(record)))

    def get_file(self, owner: str | None, file_id: str, now: int) -> FileRecord | None:
        with self._read() as conn:
            row = conn.execute(
                select(T.files).where(T.files.c.id == file_id, _owned(T.files, owner), _visible_file(now))
            ).first()
        return _file_record(row) if row else None

    def list_files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str, now: int
    ) -> tuple[list[FileRecord], bool] | None:
        """A page of files and whether more follow; None when the `after` cursor is unknown."""
        descending = order == "desc"
        query = select(T.files).where(_owned(T.files, owner), _visible_file(now))
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
            rows = conn.execute(query.limit(limit + 1)).all()
        return [_file_record(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, owner: str | None, file_id: str, now: int) -> bool:
        """Hide the file at once; its bytes are removed by `collect_garbage` once nothing reads them."""
        with self._write() as conn:
            result = conn.execute(
                update(T.files)
                .where(T.files.c.id == file_id, _owned(T.files, owner), _visible_file(now))
                .values(deleted_at=now)
            )
            return result.rowcount > 0

    # -- batches: API side ------------------------------------------------------------------

    def insert_batch(self, record: BatchRecord) -> None:
        values = {c.name: getattr(record, c.name) for c in _BATCH_COLUMNS}
        values["metadata_json"] = orjson.dumps(record.metadata).decode() if record.metadata is not None else None
        with self._write() as conn:
            conn.execute(insert(T.batches).values(**values))

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        with self._read() as conn:
            row = conn.execute(
                select(T.batches).where(T.batches.c.id == batch_id, _owned(T.batches, owner))
            ).first()
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
        b, s = T.batches, T.shards
        live_shard = exists().where(
            s.c.batch_id == b.c.id, s.c.status == C.SHARD_RUNNING, s.c.lease_expires_at > now
        )
        lease_free = or_(b.c.lease_expires_at.is_(None), b.c.lease_expires_at < now)
        ready = or_(
            b.c.status.in_([C.VALIDATING, C.FINALIZING]),
            and_(b.c.status == C.CANCELLING, ~live_shard),
            and_(b.c.status == C.IN_PROGRESS, b.c.expires_at <= now, ~live_shard),
        )
        candidate = (
            select(b.c.id).where(lease_free, ready).order_by(b.c.seq).limit(1).with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            row = conn.execute(
                update(b)
                .where(b.c.id == candidate.scalar_subquery())
                .values(lease_token=token, lease_expires_at=now + lease_seconds)
                .returning(*b.c)
            ).first()
            if row is None:
                return None
            batch = _batch_record(row)
            input_key = conn.execute(
                select(T.files.c.storage_key).where(T.files.c.id == batch.input_file_id)
            ).scalar()
            if batch.status == C.VALIDATING:
                return BatchTask("validate", batch, token, input_storage_key=input_key)
            final = {C.FINALIZING: C.COMPLETED, C.CANCELLING: C.CANCELLED}.get(batch.status, C.EXPIRED)
            # Whatever has not committed by now never will: its lines are reported, not run.
            conn.execute(
                update(s)
                .where(s.c.batch_id == batch.id, s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING]))
                .values(status=C.SHARD_SKIPPED, lease_token=None)
            )
            shards = conn.execute(
                select(
                    s.c.shard_index,
                    s.c.status,
                    s.c.result_key,
                    s.c.result_output_bytes,
                    s.c.first_request,
                    s.c.request_count,
                    s.c.byte_offset,
                    s.c.byte_length,
                )
                .where(s.c.batch_id == batch.id)
                .order_by(s.c.shard_index)
            ).all()
        settled = [SettledShard(*r) for r in shards]
        return BatchTask("finalize", batch, token, final, input_key, settled)

    def extend_batch_lease(self, batch_id: str, token: str, until: float) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(T.batches)
                .where(T.batches.c.id == batch_id, T.batches.c.lease_token == token)
                .values(lease_expires_at=until)
            )
            return result.rowcount > 0

    def start_batch(
        self, batch_id: str, token: str, plans: Sequence[ShardPlan], total: int, now: int
    ) -> bool:
        """validating -> in_progress with its shards, if we still hold the lease and nobody cancelled."""
        with self._write() as conn:
            moved = conn.execute(
                update(T.batches)
                .where(
                    T.batches.c.id == batch_id,
                    T.batches.c.lease_token == token,
                    T.batches.c.status == C.VALIDATING,
                )
                .values(
                    status=C.IN_PROGRESS,
                    in_progress_at=now,
                    request_total=total,
                    lease_token=None,
                    lease_expires_at=None,
                )
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
                conn.execute(insert(T.shards), rows[start : start + 500])
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
        b, s = T.batches, T.shards
        runnable = or_(
            s.c.status == C.SHARD_PENDING,
            and_(s.c.status == C.SHARD_RUNNING, s.c.lease_expires_at < now),
        )
        open_batch = exists().where(b.c.id == s.c.batch_id, b.c.status == C.IN_PROGRESS, b.c.expires_at > now)
        candidate = (
            select(s.c.id)
            .where(runnable, open_batch)
            .order_by(s.c.shard_index, s.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            row = conn.execute(
                update(s)
                .where(s.c.id == candidate.scalar_subquery())
                .values(
                    status=C.SHARD_RUNNING,
                    lease_token=token,
                    lease_expires_at=now + lease_seconds,
                    attempt=s.c.attempt + 1,
                    completed=0,
                    failed=0,
                )
                .returning(*s.c)
            ).first()
            if row is None:
                return None
            batch = conn.execute(
                select(b.c.endpoint, b.c.expires_at, T.files.c.storage_key)
                .select_from(b.join(T.files, T.files.c.id == b.c.input_file_id))
                .where(b.c.id == row.batch_id)
            ).one()
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
                result = conn.execute(
                    update(T.shards)
                    .where(T.shards.c.id == lease.shard_id, T.shards.c.lease_token == lease.lease_token)
                    .values(lease_expires_at=until, completed=lease.completed, failed=lease.failed)
                )
                if not result.rowcount:
                    lost.add(lease.shard_id)
            ids = [lease.shard_id for lease in leases]
            stopped = conn.execute(
                select(T.shards.c.id)
                .select_from(T.shards.join(T.batches, T.batches.c.id == T.shards.c.batch_id))
                .where(T.shards.c.id.in_(ids), T.batches.c.status != C.IN_PROGRESS)
            ).scalars()
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
        s, b = T.shards, T.batches
        with self._write() as conn:
            done = conn.execute(
                update(s)
                .where(s.c.id == shard_id, s.c.lease_token == token, s.c.status == C.SHARD_RUNNING)
                .values(
                    status=C.SHARD_DONE,
                    lease_token=None,
                    lease_expires_at=None,
                    result_key=result.result_key,
                    result_output_bytes=result.output_bytes,
                    completed=result.completed,
                    failed=result.failed,
                    input_tokens=result.input_tokens,
                    cached_tokens=result.cached_tokens,
                    output_tokens=result.output_tokens,
                    reasoning_tokens=result.reasoning_tokens,
                    model=result.model,
                )
            )
            if not done.rowcount:
                return "lost"
            conn.execute(
                update(b)
                .where(b.c.id == batch_id)
                .values(
                    request_completed=b.c.request_completed + result.completed,
                    request_failed=b.c.request_failed + result.failed,
                    input_tokens=b.c.input_tokens + result.input_tokens,
                    cached_tokens=b.c.cached_tokens + result.cached_tokens,
                    output_tokens=b.c.output_tokens + result.output_tokens,
                    reasoning_tokens=b.c.reasoning_tokens + result.reasoning_tokens,
                    model=func.coalesce(b.c.model, result.model),
                )
            )
            still_open = exists().where(
                s.c.batch_id == batch_id, s.c.status.in_([C.SHARD_PENDING, C.SHARD_RUNNING])
            )
            ready = conn.execute(
                update(b)
                .where(b.c.id == batch_id, b.c.status == C.IN_PROGRESS, ~still_open)
                .values(status=C.FINALIZING, finalizing_at=now)
            )
            return "batch_ready" if ready.rowcount else "committed"

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
        stamp = {C.COMPLETED: "completed_at", C.CANCELLED: "cancelled_at", C.EXPIRED: "expired_at"}[final_status]
        with self._write() as conn:
            moved = conn.execute(
                update(T.batches)
                .where(T.batches.c.id == batch_id, T.batches.c.lease_token == token)
                .values(
                    status=final_status,
                    output_file_id=output_file.id if output_file else None,
                    error_file_id=error_file.id if error_file else None,
                    request_completed=completed,
                    request_failed=failed,
                    lease_token=None,
                    lease_expires_at=None,
                    **{stamp: now},
                )
            )
            if not moved.rowcount:
                return False
            for record in (output_file, error_file):
                if record is not None:
                    conn.execute(insert(T.files).values(**_file_values(record)))
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
    s = T.shards
    rows = conn.execute(
        select(s.c.batch_id, func.sum(s.c.completed), func.sum(s.c.failed))
        .where(s.c.batch_id.in_(live_ids), s.c.status == C.SHARD_RUNNING)
        .group_by(s.c.batch_id)
    ).all()
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


def _visible_file(now: int) -> Any:
    return and_(
        T.files.c.deleted_at.is_(None), or_(T.files.c.expires_at.is_(None), T.files.c.expires_at > now)
    )


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
