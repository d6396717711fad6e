"""The admin server page's store reads (store/overview.py) on SQLite and PostgreSQL: unanswered
requests of unfinished batches per model, and the workers' rows with how long ago each was seen."""

from __future__ import annotations

import time

from overnight import constants as C
from overnight.store.records import BatchRecord, ModelQueue
from overnight.store.sql import SqlStore

NOW = 1_000_000



def _batch(store: SqlStore, batch_id: str, status: str, model: str | None, total: int, done: int, failed: int) -> None:
    store.batches.insert_batch(BatchRecord(
        batch_id, "owner", C.CHAT_COMPLETIONS, "file-in", "24h", status, NOW, NOW + 86400, model=model,
        request_total=total, request_completed=done, request_failed=failed,
    ))


def test_queue_by_model_counts_unfinished_batches_and_their_waiting_requests(store: SqlStore) -> None:
    _batch(store, "b1", C.IN_PROGRESS, "m-a", 100, 30, 5)
    _batch(store, "b2", C.CANCELLING, "m-a", 10, 2, 0)
    _batch(store, "b3", C.IN_PROGRESS, "m-b", 50, 0, 0)
    _batch(store, "b4", C.VALIDATING, None, 0, 0, 0)
    _batch(store, "b5", C.COMPLETED, "m-a", 999, 999, 0)  # finished: not queued
    _batch(store, "b6", C.CANCELLED, "m-b", 40, 1, 39)
    queue = store.overview.queue_by_model()
    # (NULL sorts first on SQLite and last on PostgreSQL: compared without order)
    assert sorted(queue, key=lambda q: q.model or "") == [
        ModelQueue(None, 1, 0), ModelQueue("m-a", 2, 65 + 8), ModelQueue("m-b", 1, 50),
    ]


def test_workers_are_listed_with_how_long_ago_they_were_seen(store: SqlStore) -> None:
    assert store.overview.workers() == []
    store.membership.join("w-old")
    store.membership.join("w-new")
    # w-old's last heartbeat 120 s ago, by the test's hand on the clock; the read uses the database's
    store.membership.standing("w-old", alive_seconds=30, now=time.time() - 120)
    workers = {w.id: w for w in store.overview.workers()}
    assert set(workers) == {"w-old", "w-new"}
    assert 119 <= workers["w-old"].seen_seconds_ago < 130
    assert 0 <= workers["w-new"].seen_seconds_ago < 10
    assert workers["w-new"].last_seen >= workers["w-new"].started_at
    store.membership.leave("w-old")
    assert [w.id for w in store.overview.workers()] == ["w-new"]
