"""SqlStore claims and leases on a real SQLite file and a real PostgreSQL database: a claim is
exclusive, an expired lease is claimed again, and a commit is fenced by the lease token."""

from __future__ import annotations

import time

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from overnight import constants as C
from overnight.store import schema
from overnight.store.records import (
    BatchRecord,
    BatchTask,
    DeliveryLease,
    FileRecord,
    ShardPlan,
    ShardProgress,
    ShardResult,
    WebhookEvent,
    WholeOutput,
)
from overnight.store.sql import SqlStore

NOW = 1_000_000

# Tests that fail on PostgreSQL until metadata.py changes (test name -> why).




def _batch_in_progress(store: SqlStore, shards: int = 2, batch_id: str = "batch_a") -> None:
    store.files.insert_file(FileRecord("file-in", "owner", "batch", "in.jsonl", 10, NOW, None, "files/file-in"))
    store.batches.insert_batch(BatchRecord(batch_id, "owner", C.CHAT_COMPLETIONS, "file-in", "24h", C.VALIDATING, NOW,
                                   NOW + 86400))
    task = store.queue.claim_batch_task(NOW, 30, "vtoken")
    assert task is not None and task.kind == "validate"
    plans = [ShardPlan(i, i * 10, 10, i * 100, 100) for i in range(shards)]
    assert store.queue.start_batch(batch_id, "vtoken", plans, shards * 10, NOW)


def test_migrations_match_the_tables(store: SqlStore) -> None:
    with store.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def test_claim_is_exclusive_and_expired_lease_is_reclaimed(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    first = store.queue.claim_shard(NOW, 30, "t1")
    assert first is not None and first.attempt == 1
    assert store.queue.claim_shard(NOW + 1, 30, "t2") is None  # held
    again = store.queue.claim_shard(NOW + 31, 30, "t3")  # lease expired: the worker died
    assert again is not None and again.shard_id == first.shard_id and again.attempt == 2
    # the old holder can no longer commit; the new one can
    assert store.queue.commit_shard(first.shard_id, "t1", "batch_a", ShardResult("r1", completed=10), NOW) == "lost"
    outcome = store.queue.commit_shard(again.shard_id, "t3", "batch_a", ShardResult("r3", completed=10), NOW)
    assert outcome == "batch_ready"  # its last shard: the batch moves to finalizing
    batch = store.batches.get_batch(None, "batch_a")
    assert batch is not None and batch.request_completed == 10 and batch.status == C.FINALIZING


def test_an_expired_shard_goes_first_and_only_the_one_claimed_changes_hands(store: SqlStore) -> None:
    """Claims take expired shards (their workers died) before pending ones, one at a time: a late
    holder whose shard nobody took yet may still commit it."""
    _batch_in_progress(store, shards=4)
    late_0 = store.queue.claim_shard(NOW, 30, "late0")
    late_1 = store.queue.claim_shard(NOW, 30, "late1")
    assert late_0 is not None and late_1 is not None and (late_0.shard_index, late_1.shard_index) == (0, 1)
    taken = store.queue.claim_shard(NOW + 31, 30, "new")  # both leases expired; shards 2 and 3 pending
    assert taken is not None and (taken.shard_index, taken.attempt) == (0, 2)
    assert store.queue.commit_shard(late_0.shard_id, "late0", "batch_a", ShardResult("r0"), NOW) == "lost"
    assert store.queue.commit_shard(late_1.shard_id, "late1", "batch_a", ShardResult("r1"), NOW) == "committed"
    pending = store.queue.claim_shard(NOW + 31, 30, "next")
    assert pending is not None and pending.shard_index == 2


def test_heartbeat_extends_and_reports_lost_and_stopped(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)
    a = store.queue.claim_shard(NOW, 30, "ta")
    b = store.queue.claim_shard(NOW, 30, "tb")
    assert a and b
    lost, stopped = store.queue.heartbeat_shards(
        [ShardProgress(a.shard_id, "ta", completed=3, failed=1), ShardProgress(b.shard_id, "wrong")], 60, now=NOW
    )
    assert lost == {b.shard_id} and stopped == set()
    live = store.batches.get_batch("owner", "batch_a")
    assert live is not None and (live.request_completed, live.request_failed) == (3, 1)  # before any commit
    assert store.queue.claim_shard(NOW + 45, 30, "tx") is not None  # b's lease expired (not extended)
    store.batches.request_cancel("owner", "batch_a", NOW)
    _, stopped = store.queue.heartbeat_shards([ShardProgress(a.shard_id, "ta")], 60, now=NOW)
    assert stopped == {a.shard_id}


def test_cancel_skips_pending_and_finalize_waits_for_live_shards(store: SqlStore) -> None:
    _batch_in_progress(store, shards=3)
    running = store.queue.claim_shard(NOW, 30, "tr")
    assert running is not None
    cancelled = store.batches.request_cancel("owner", "batch_a", NOW)
    assert cancelled is not None and cancelled.status == C.CANCELLING
    assert store.queue.claim_shard(NOW, 30, "tz") is None  # nothing new starts
    assert store.queue.claim_batch_task(NOW + 1, 30, "f1") is None  # a shard is still running
    result = ShardResult("r", completed=4, failed=6)
    assert store.queue.commit_shard(running.shard_id, "tr", "batch_a", result, NOW) == "committed"
    task = store.queue.claim_batch_task(NOW + 2, 30, "f2")
    assert task is not None and task.kind == "finalize" and task.final_status == C.CANCELLED
    assert [s.status for s in task.shards] == [C.SHARD_DONE, C.SHARD_SKIPPED, C.SHARD_SKIPPED]
    assert not store.queue.finish_batch("batch_a", "not-the-lease", C.CANCELLED, None, None, 4, 26, NOW)
    assert store.queue.finish_batch("batch_a", "f2", C.CANCELLED, None, None, 4, 26, NOW)
    done = store.batches.get_batch(None, "batch_a")
    assert done is not None and done.status == C.CANCELLED and done.request_failed == 26


def test_expired_batch_is_finalized_as_expired(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)
    assert store.queue.claim_shard(NOW + 86400, 30, "late") is None  # past the deadline nothing starts
    task = store.queue.claim_batch_task(NOW + 86400, 30, "fx")
    assert task is not None and task.final_status == C.EXPIRED


def test_round_robin_between_batches(store: SqlStore) -> None:
    _batch_in_progress(store, shards=3, batch_id="batch_a")
    store.batches.insert_batch(BatchRecord("batch_b", "owner", C.CHAT_COMPLETIONS, "file-in", "24h", C.VALIDATING, NOW,
                                   NOW + 86400))
    task = store.queue.claim_batch_task(NOW, 30, "vb")
    assert task is not None
    store.queue.start_batch("batch_b", "vb", [ShardPlan(i, i * 10, 10, 0, 1) for i in range(3)], 30, NOW)
    order = [store.queue.claim_shard(NOW, 30, f"t{i}") for i in range(4)]
    assert [(c.batch_id, c.shard_index) for c in order if c] == [
        ("batch_a", 0), ("batch_b", 0), ("batch_a", 1), ("batch_b", 1)
    ]


def test_deleted_file_bytes_wait_for_active_batches(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    assert store.files.delete_file("owner", "file-in", NOW)
    assert store.files.get_file("owner", "file-in", NOW) is None
    assert store.housekeeping.collect_garbage(NOW) == []  # the running batch still reads it
    shard = store.queue.claim_shard(NOW, 30, "t")
    assert shard is not None
    store.queue.commit_shard(shard.shard_id, "t", "batch_a", ShardResult("r", completed=10), NOW)
    task = store.queue.claim_batch_task(NOW, 30, "f")
    assert task is not None
    store.queue.finish_batch("batch_a", "f", C.COMPLETED, None, None, 10, 0, NOW)
    assert store.housekeeping.collect_garbage(NOW) == ["files/file-in"]


def test_a_gone_files_bytes_go_at_once_and_its_row_stays_a_day_as_a_list_cursor(store: SqlStore) -> None:
    for i in range(3):
        store.files.insert_file(FileRecord(f"file-{i}", "owner", "batch", "x.jsonl", 1, NOW, None, f"files/file-{i}"))
    assert store.files.delete_file("owner", "file-1", NOW)
    assert store.housekeeping.collect_garbage(NOW + 60) == ["files/file-1"]
    assert store.housekeeping.collect_garbage(NOW + 120) == []  # its bytes are not handed out twice
    assert not store.housekeeping.live_storage_keys(["files/file-1"])  # an orphan, if anything is left
    page = store.files.list_files("owner", None, "file-1", 10, "asc", NOW + 120)
    assert page is not None and [f.id for f in page[0]] == ["file-2"]
    store.housekeeping.collect_garbage(NOW + C.GONE_FILE_ROW_SECONDS + 1)
    assert store.files.list_files("owner", None, "file-1", 10, "asc", NOW + C.GONE_FILE_ROW_SECONDS + 1) is None
    page = store.files.list_files("owner", None, None, 10, "asc", NOW + C.GONE_FILE_ROW_SECONDS + 1)
    assert page is not None and [f.id for f in page[0]] == ["file-0", "file-2"]


def test_results_of_a_finished_batch_are_not_live(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    shard = store.queue.claim_shard(NOW, 30, "t")
    assert shard is not None
    store.queue.commit_shard(shard.shard_id, "t", "batch_a", ShardResult("results/batch_a/0.1.jsonl", completed=10), NOW)
    assert store.housekeeping.live_storage_keys(["results/batch_a/0.1.jsonl"]) == {"results/batch_a/0.1.jsonl"}
    task = store.queue.claim_batch_task(NOW, 30, "f")
    assert task is not None
    # finalize published the files, then the process died before deleting the shard's results
    store.queue.finish_batch("batch_a", "f", C.COMPLETED, None, None, 10, 0, NOW)
    assert store.housekeeping.live_storage_keys(["results/batch_a/0.1.jsonl", "files/file-in"]) == {"files/file-in"}


def test_leases_run_on_the_database_clock(store: SqlStore) -> None:
    """A worker passes no time of its own: a machine whose clock runs a minute ahead cannot take
    over a live lease, as it could when each worker's clock decided."""
    real_now = time.time()
    store.files.insert_file(FileRecord("file-in", "owner", "batch", "in.jsonl", 10, int(real_now), None, "files/f"))
    store.batches.insert_batch(BatchRecord("batch_now", "owner", C.CHAT_COMPLETIONS, "file-in", "24h", C.VALIDATING,
                                           int(real_now), int(real_now) + 3600))
    task = store.queue.claim_batch_task(None, 30, "v")
    assert task is not None and task.batch.id == "batch_now"
    assert store.queue.start_batch("batch_now", "v", [ShardPlan(0, 0, 10, 0, 10)], 10, int(real_now))
    first = store.queue.claim_shard(None, 30, "t1")
    assert first is not None
    with store.db.engine.connect() as conn:
        until = conn.execute(select(schema.shards.c.lease_expires_at)).scalar_one()
    assert abs(until - (time.time() + 30)) < 5  # the database's now, plus the lease
    assert store.queue.claim_shard(None, 30, "t2") is None  # live on the database's clock
    assert store.queue.claim_shard(real_now + 60, 30, "skewed") is not None  # what a skewed clock did


def test_a_claim_reads_the_queue_in_index_order_without_sorting_it(store: SqlStore) -> None:
    """The claim's plan walks the shards' claim-order index and stops at the first pending shard of
    an open batch: its cost does not grow with the queue (the old plan sorted every candidate)."""
    from overnight.store import queue

    _batch_in_progress(store, shards=1500)  # past the size at which start_batch refreshes statistics
    compiled = queue._CLAIM_SHARD.compile(dialect=store.db.engine.dialect)
    params = {**compiled.params, "p_now": None, "p_token": "plan", "p_lease_seconds": 30.0}
    explain = "EXPLAIN QUERY PLAN" if store.db.is_sqlite else "EXPLAIN"
    with store.db.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{explain} {compiled}", params if not store.db.is_sqlite else
                                    tuple(params[k] for k in compiled.positiontup or ())).all()
        conn.rollback()
    plan = "\n".join(str(row[-1]) for row in rows)
    assert "ix_shards_claim_order" in plan, plan
    assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan


def test_a_read_sees_one_snapshot_for_all_its_statements(store: SqlStore) -> None:
    """The API reads a batch, then its running shards' progress: both must come from one snapshot,
    or a shard's commit between them is counted in neither (progress shows 0 for a poll)."""
    _batch_in_progress(store, shards=1)
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    with store.db.read() as conn:
        before = conn.execute(select(schema.shards.c.status)).scalar_one()
        # the shard commits meanwhile, on another connection
        assert store.queue.commit_shard(claim.shard_id, "t1", "batch_a", ShardResult("r", completed=10), NOW) == (
            "batch_ready")
        after = conn.execute(select(schema.shards.c.status)).scalar_one()
    assert before == after == C.SHARD_RUNNING


def _output(lines: int, size: int = 123) -> WholeOutput:
    record = FileRecord("file-out", "owner", C.BATCH_OUTPUT_PURPOSE, "batch_a_output.jsonl", size, NOW, None,
                        "files/file-out")
    event = WebhookEvent("evt_1", "batch.completed", "owner", "batch_a", "ep1", "http://127.0.0.1:1/h", "{}", NOW)
    return WholeOutput(record, lines, [event], DeliveryLease("send", 30, limit=8))


def test_a_batchs_only_shard_completes_it_in_its_commit(store: SqlStore) -> None:
    """One transaction commits the shard, publishes its output file, completes the batch and
    leases its webhook events to the committer: no finalize claim, no finish, no webhook claim."""
    _batch_in_progress(store, shards=1)
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None and claim.whole_batch and claim.owner == "owner" and claim.batch_created_at == NOW
    publish = _output(10)
    result = ShardResult("r1", completed=10, output_bytes=123, input_tokens=7)
    assert store.queue.commit_shard(claim.shard_id, "t1", "batch_a", result, NOW, ("fin", 30), publish) == "finished"
    batch = store.batches.get_batch(None, "batch_a")
    assert batch is not None and batch.status == C.COMPLETED and batch.output_file_id == "file-out"
    assert (batch.request_completed, batch.request_failed, batch.input_tokens, batch.error_file_id) == (10, 0, 7, None)
    assert batch.completed_at == NOW and batch.lease_token is None
    output = store.files.get_file("owner", "file-out", NOW)
    assert output is not None and output.bytes == 123
    assert publish.deliveries is not None and [d.event_id for d in publish.deliveries.claimed] == ["evt_1"]
    assert store.queue.claim_batch_task(NOW + 100, 30, "late") is None  # nothing left to finalize


def test_a_shard_that_is_not_the_whole_batch_does_not_publish(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)
    first, second = store.queue.claim_shard(NOW, 30, "t1"), store.queue.claim_shard(NOW, 30, "t2")
    assert first is not None and second is not None and not first.whole_batch
    assert store.queue.commit_shard(first.shard_id, "t1", "batch_a", ShardResult("r1", completed=10, output_bytes=5),
                                    NOW, ("f1", 30), _output(10)) == "committed"
    # the last shard of two: the batch is ready, and the output needs both shards' lines
    task = store.queue.commit_shard(second.shard_id, "t2", "batch_a", ShardResult("r2", completed=10, output_bytes=5),
                                    NOW, ("f2", 30), _output(10))
    assert isinstance(task, BatchTask) and task.kind == "finalize" and len(task.shards) == 2
    assert store.files.get_file("owner", "file-out", NOW) is None


def test_a_whole_batch_shard_with_error_lines_does_not_publish(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    failed = ShardResult("r1", completed=9, failed=1, output_bytes=100)
    task = store.queue.commit_shard(claim.shard_id, "t1", "batch_a", failed, NOW, ("fin", 30), _output(10))
    assert isinstance(task, BatchTask)  # finalize splits the error lines out
    assert store.files.get_file("owner", "file-out", NOW) is None


def test_a_cancelled_batchs_only_shard_does_not_publish(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    claim = store.queue.claim_shard(NOW, 30, "t2")
    assert claim is not None and claim.whole_batch
    assert store.batches.request_cancel(None, "batch_a", NOW) is not None
    outcome = store.queue.commit_shard(claim.shard_id, "t2", "batch_a", ShardResult("r2", completed=10, output_bytes=9),
                                       NOW, ("fin2", 30), _output(10))
    assert outcome == "committed"  # cancelling: the cancel's finalize reports the batch
    assert store.files.get_file("owner", "file-out", NOW) is None


def test_housekeepings_lookups_use_indexes_not_scans(store: SqlStore) -> None:
    """Each janitor pass asks, 500 stored keys at a time, which are still named by a file, a
    shard's results or an upload part, and looks for gone files: each question scanned its whole
    table (a million files: 2,000 scans of a million rows a pass). PostgreSQL is asked with
    sequential scans priced out, so its plan shows a scan only where no index can serve."""
    from sqlalchemy import select as select_

    from overnight.store import housekeeping, uploads

    keys = ["files/file-a", "files/file-b"]
    statements = {
        "files": [housekeeping._FILE_KEYS_IN.params(p_keys=keys), housekeeping._GONE_FILES.params(p_now=NOW),
                  select_(schema.files.c.id).where(housekeeping._PURGE_ROWS.whereclause).params(p_rows_before=NOW)],
        "shards": [housekeeping._RESULT_KEYS_IN.params(p_keys=keys)],
        "upload_parts": [uploads.PART_KEYS_IN.params(p_keys=keys)],
    }
    dialect = store.db.engine.dialect
    with store.db.engine.connect() as conn:
        if not store.db.is_sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for table, queries in statements.items():
            for query in queries:
                sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                rows = conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if store.db.is_sqlite else "EXPLAIN ") + sql).all()
                plan = "\n".join(str(row[-1]) for row in rows)
                scans = [f"SCAN {table}", f"Seq Scan on {table}"]
                assert not any(scan in line.split(" USING")[0] for line in plan.splitlines() for scan in scans), \
                    f"{sql}\n{plan}"
        conn.rollback()
