"""Wake-ups through PostgreSQL: a batch created or cancelled on one machine wakes idle workers on
the others (LISTEN/NOTIFY), sent only when the change commits."""

from __future__ import annotations

import threading

import pytest

from overnight import constants as C
from overnight.store.notify import BatchChangeListener
from overnight.store.records import BatchRecord, FileRecord, ShardPlan
from overnight.store.sql import SqlStore

pytestmark = pytest.mark.postgres
NOW = 1_000_000


def test_create_and_cancel_wake_a_listener_on_commit(postgres_clean_url: str) -> None:
    store = SqlStore(postgres_clean_url)
    woken = threading.Semaphore(0)
    changes: list[str] = []

    def on_change(change: str) -> None:
        changes.append(change)
        woken.release()

    listener = BatchChangeListener(postgres_clean_url, on_change)
    listener.start()
    try:
        assert listener.listening.wait(10)
        assert woken.acquire(timeout=5)  # one wake-up on (re)connecting: whatever was missed
        assert changes == [C.CHANGE_CANCELLED]  # a cancel may be among it: running shards check
        store.files.insert_file(FileRecord("file-in", "o", "batch", "in.jsonl", 10, NOW, None, "files/in"))
        assert not woken.acquire(timeout=0.3)  # a file is no work for a worker
        store.batches.insert_batch(BatchRecord("batch_a", "o", C.CHAT_COMPLETIONS, "file-in", "24h",
                                               C.VALIDATING, NOW, NOW + 86400))
        assert woken.acquire(timeout=2)
        assert changes[-1] == C.CHANGE_CREATED
        # Created in_progress with its shards (validated on upload): only shards to claim.
        store.batches.insert_batch(BatchRecord("batch_b", "o", C.CHAT_COMPLETIONS, "file-in", "24h",
                                               C.IN_PROGRESS, NOW, NOW + 86400, request_total=1),
                                   [ShardPlan(0, 0, 1, 0, 10)])
        assert woken.acquire(timeout=2)
        assert changes[-1] == C.CHANGE_STARTED
        store.batches.request_cancel("o", "batch_a", NOW)
        assert woken.acquire(timeout=2)
        assert changes[-1] == C.CHANGE_CANCELLED  # workers heartbeat at once: their shards stop
        store.batches.request_cancel("o", "batch_a", NOW)  # already cancelling: nothing changed
        assert not woken.acquire(timeout=0.3)
    finally:
        listener.stop()
        store.close()
