"""What SQLite's one-writer-at-a-time hides: SqlStore under concurrent transactions, and values
PostgreSQL refuses, on both dialects.

SQLite serializes writers (`BEGIN IMMEDIATE`), so two transactions never interleave there. On
PostgreSQL (READ COMMITTED) they do: these tests hold one thread at a chosen point of its
transaction (SQLAlchemy events on the store's engine) while another runs, the interleavings that
many workers on one database produce.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from overnight import constants as C
from overnight.store.records import BatchRecord, FileRecord, ShardPlan, ShardResult
from overnight.store.sql import SqlStore

NOW = 1_000_000
HOLD = 0.5  # how long a held thread waits for the other before it goes on anyway (SQLite: always)





def _batch_in_progress(store: SqlStore, shards: int) -> None:
    store.files.insert_file(FileRecord("file-in", "owner", "batch", "in.jsonl", 10, NOW, None, "files/file-in"))
    store.batches.insert_batch(BatchRecord("batch_a", "owner", C.CHAT_COMPLETIONS, "file-in", "24h", C.VALIDATING, NOW,
                                   NOW + 86400))
    assert store.queue.claim_batch_task(NOW, 30, "vtoken") is not None
    plans = [ShardPlan(i, i * 10, 10, i * 100, 100) for i in range(shards)]
    assert store.queue.start_batch("batch_a", "vtoken", plans, shards * 10, NOW)


class Held:
    """Runs `call` in a thread that stops where `at` says (a SQLAlchemy engine event and a test on
    its arguments), and goes on when released or after HOLD seconds."""

    def __init__(self, store: SqlStore, at: str, when: Callable[..., bool], call: Callable[[], Any]) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._engine = store.db.engine
        self._at = at
        self._thread = threading.Thread(target=self._run, args=(call,), name="held")

        def hook(*args: Any) -> None:
            if threading.current_thread() is self._thread and not self.reached.is_set() and when(*args):
                self.reached.set()
                self.release.wait(HOLD)

        self._hook = hook
        event.listen(self._engine, at, hook)

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Held:
        self._thread.start()
        assert self.reached.wait(10), "the held thread never got there"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread.join(30)
        event.remove(self._engine, self._at, self._hook)


def _updates_batch_counts(_conn: Any, _cursor: Any, statement: str, *_: Any) -> bool:
    return statement.startswith("UPDATE batches SET") and "request_completed=(batches.request_completed" in statement


def test_concurrent_claims_take_each_shard_once(store: SqlStore) -> None:
    _batch_in_progress(store, shards=40)
    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        try:
            start.wait()
            while (claim := store.queue.claim_shard(NOW, 30, f"w{n}")) is not None:
                claimed.append(claim.shard_index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(claimed) == list(range(40))


def test_the_last_two_shards_settled_at_once_finalize_the_batch(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)
    a = store.queue.claim_shard(NOW, 30, "ta")
    b = store.queue.claim_shard(NOW, 30, "tb")
    assert a is not None and b is not None
    # One worker commits shard a and stops just before COMMIT; another settles shard b as failed.
    commit_a = Held(store, "commit", lambda _conn: True,
                    lambda: store.queue.commit_shard(a.shard_id, "ta", "batch_a", ShardResult("r", completed=10), NOW))
    with commit_a:
        fail_b = store.queue.fail_shard(b.shard_id, "tb", "batch_a", "OSError: disk on fire", True, NOW)
    assert commit_a.error is None
    assert sorted([commit_a.result, fail_b]) == ["batch_ready", "committed"] or sorted(
        [commit_a.result, fail_b]) == ["batch_ready", "failed"]
    assert store.batches.batch_status("batch_a") == C.FINALIZING


def test_a_late_commit_and_finalize_do_not_deadlock(store: SqlStore) -> None:
    _batch_in_progress(store, shards=1)
    shard = store.queue.claim_shard(NOW, 30, "slow")
    assert shard is not None
    store.batches.request_cancel("owner", "batch_a", NOW)
    # The slow holder commits after its lease ran out, just as the cancelled batch is finalized.
    commit = Held(store, "before_cursor_execute", _updates_batch_counts,
                  lambda: store.queue.commit_shard(shard.shard_id, "slow", "batch_a", ShardResult("r", completed=10), NOW))
    with commit:
        task = store.queue.claim_batch_task(NOW + 31, 30, "fin")
    assert commit.error is None
    if task is None:  # the commit went first and held the batch: the finalize comes next
        task = store.queue.claim_batch_task(NOW + 32, 30, "fin")
    assert task is not None and task.final_status == C.CANCELLED
    committed = commit.result == "committed"
    assert [s.status for s in task.shards] == [C.SHARD_DONE if committed else C.SHARD_SKIPPED]


def test_a_shard_is_claimable_until_the_exact_deadline(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)  # expires_at = NOW + 86400
    assert store.queue.claim_shard(NOW + 86399.6, 30, "late") is not None  # 0.4 s before the deadline
    assert store.queue.claim_shard(NOW + 86400.0, 30, "too-late") is None


def test_ids_with_a_nul_character_are_not_found(store: SqlStore) -> None:
    # Path and query parameters reach the store as they came (`GET /v1/files/file-%00`).
    _batch_in_progress(store, shards=1)
    assert store.files.get_file("owner", "file-in\x00", NOW) is None
    assert store.batches.get_batch("owner", "batch_a\x00") is None
    assert store.batches.list_batches("owner", "batch_a\x00", 10) is None
    assert store.files.list_files("owner", "batch\x00", None, 10, "desc", NOW) == ([], False)


def test_two_processes_migrate_an_empty_database_at_once(empty_url: str) -> None:
    first, second = SqlStore(empty_url), SqlStore(empty_url)
    try:
        # Two servers start on a new database: one has created the tables and not yet committed.
        with Held(first, "commit", lambda _conn: True, first.migrate) as held:
            second.migrate()
        assert held.error is None
        assert second.batches.get_batch(None, "batch_none") is None  # the tables are there
    finally:
        first.close()
        second.close()


def test_a_shard_settled_failed_counts_its_lines_failed_while_the_batch_runs(store: SqlStore) -> None:
    _batch_in_progress(store, shards=2)
    shard = store.queue.claim_shard(NOW, 30, "w")
    assert shard is not None
    assert store.queue.fail_shard(shard.shard_id, "w", "batch_a", "OSError: disk on fire", True, NOW) == "failed"
    record = store.batches.get_batch("owner", "batch_a")
    assert record is not None and record.status == C.IN_PROGRESS
    assert (record.request_completed, record.request_failed) == (0, 10)
