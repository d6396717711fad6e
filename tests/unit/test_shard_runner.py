"""The shard runner on the in-memory file store and an engine double: what a shard commits when its
batch is cancelled mid-way, when its lease is lost, when a line raises, and when a shard keeps failing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from overnight import constants as C
from overnight.batches.finalize import finalize_batch
from overnight.batches.webhooks import RetryPolicy, WebhookEndpoint, WebhookRoutes, WebhookSender
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.router import Route, Router
from overnight.files.memory import MemoryFileStore
from overnight.files.port import StorageFullError, StorageUnavailableError
from overnight.settings import Limits, WorkerSettings
from overnight.store.records import BatchRecord, BatchTask, FileRecord, ShardPlan, ShardResult
from overnight.store.schema import shards
from overnight.store.sql import SqlStore
from overnight.worker.lanes import Lanes
from overnight.worker.shard_runner import ShardRunner, ShardState
from overnight.worker.worker import StoragePause, Worker
from postgres import expect_failures_on_postgres

NOW = 1_000_000.0
LINES = 20

# Tests that fail on PostgreSQL until metadata.py changes (test name -> why).
POSTGRES_KNOWN_FAILURES: dict[str, str] = {}


class ScriptedEngine:
    """Answers each request after `gate` opens for it; `fail_at` raises (a bug, not a line error)."""

    name = "double"
    max_in_flight = 4
    shard_lines = LINES
    owned_by = "test"

    def __init__(self, fail_at: int | None = None, usage_at: dict[int, Any] | None = None) -> None:
        self.seen: list[str] = []
        self.fail_at = fail_at
        self.usage_at = usage_at or {}  # the usage of the n-th answer (1-based), where not the usual
        self.gate = asyncio.Semaphore(0)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def served_models(self) -> list[str]:
        return []

    async def execute(self, request: EngineRequest) -> EngineResponse:
        await self.gate.acquire()
        text = request.body["messages"][0]["content"]
        self.seen.append(text)
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("engine bug")
        usage = self.usage_at.get(len(self.seen), {"prompt_tokens": 1, "completion_tokens": 2})
        return EngineResponse(200, {"model": "m", "usage": usage})


@pytest.fixture
def setup(request: pytest.FixtureRequest, database_url: str) -> Iterator[tuple[SqlStore, MemoryFileStore]]:
    expect_failures_on_postgres(request, database_url, POSTGRES_KNOWN_FAILURES)
    store = SqlStore(database_url)
    store.migrate()
    files = MemoryFileStore()
    data = b"".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": C.CHAT_COMPLETIONS,
                    "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}}).encode() + b"\n"
        for i in range(LINES)
    )
    with files.writer("files/in") as out:
        out.write(data)
    store.files.insert_file(FileRecord("file-in", "o", "batch", "in", len(data), int(NOW), None, "files/in"))
    store.batches.insert_batch(BatchRecord("batch_x", "o", C.CHAT_COMPLETIONS, "file-in", "24h", C.VALIDATING, int(NOW),
                                   int(NOW) + 86400))
    assert store.queue.claim_batch_task(NOW, 30, "v") is not None
    store.queue.start_batch("batch_x", "v", [ShardPlan(0, 0, LINES, 0, len(data))], LINES, int(NOW))
    yield store, files
    store.close()


def _results(store: SqlStore, files: MemoryFileStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The committed results object's output section and error section, parsed."""
    keys = [k for k in files.blobs if k != "files/in"]  # (a batch's only shard writes under files/)
    assert len(keys) == 1
    with store.db.engine.connect() as conn:
        output_bytes = conn.execute(select(shards.c.result_output_bytes)).scalar_one()
    blob = files.blobs[keys[0]][0]
    return (
        [orjson.loads(line) for line in blob[:output_bytes].splitlines()],
        [orjson.loads(line) for line in blob[output_bytes:].splitlines()],
    )


async def _until_seen(engine: ScriptedEngine, count: int) -> None:
    for _ in range(500):  # bounded: 5 s
        if len(engine.seen) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine saw {len(engine.seen)} requests, expected {count}")


def _raise_after(answers: int, flag: str) -> Any:
    """A script: let `answers` requests through, raise the heartbeat's `flag`, then let the rest go."""

    async def script(engine: ScriptedEngine, state: ShardState) -> None:
        for _ in range(answers):
            engine.gate.release()
        await _until_seen(engine, answers)
        setattr(state, flag, True)
        for _ in range(LINES):
            engine.gate.release()  # the requests already in flight finish

    return script


def _run(store: SqlStore, files: MemoryFileStore, engine: ScriptedEngine, script: Any) -> Any:
    async def scenario() -> Any:
        lanes = Lanes()
        runner = ShardRunner(store.queue, files, Router([Route("*", engine)]), lanes, clock=lambda: NOW)
        claim = store.queue.claim_shard(NOW, 30, "lease")
        assert claim is not None
        state = ShardState()
        task = asyncio.create_task(runner.run(claim, state))
        try:
            await script(engine, state)
            return await asyncio.wait_for(task, 5)
        finally:
            await lanes.close()

    return asyncio.run(scenario())


def test_cancel_mid_shard_reports_unsent_lines_as_cancelled(setup: Any) -> None:
    store, files = setup

    # the heartbeat sees the batch cancelled after 6 answers
    assert _run(store, files, ScriptedEngine(), _raise_after(6, "batch_stopped")) == "batch_ready"
    ran, cancelled = _results(store, files)
    # lines are sent in input order, so what ran is the first part and what was cancelled the rest
    assert [obj["custom_id"] for obj in ran + cancelled] == [f"c{i}" for i in range(LINES)]
    assert 6 <= len(ran) <= 6 + ScriptedEngine.max_in_flight  # finished, plus those already in flight
    assert all(obj["error"]["code"] == C.BATCH_CANCELLED for obj in cancelled)
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and (batch.request_completed, batch.request_failed) == (len(ran), len(cancelled))


def test_a_shard_whose_lease_was_lost_is_not_committed(setup: Any) -> None:
    store, files = setup

    assert _run(store, files, ScriptedEngine(), _raise_after(3, "lease_lost")) == "lost"
    assert set(files.blobs) == {"files/in"}
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.request_completed == 0 and batch.status == C.IN_PROGRESS


def test_a_line_that_raises_is_that_lines_error_and_the_shard_still_commits(setup: Any) -> None:
    store, files = setup

    async def script(engine: ScriptedEngine, state: ShardState) -> None:
        for _ in range(LINES):
            engine.gate.release()

    # Before: the exception failed the whole shard, which re-ran every line every lease period.
    assert _run(store, files, ScriptedEngine(fail_at=5), script) == "batch_ready"
    ran, failed = _results(store, files)
    assert len(ran) == LINES - 1
    assert len(failed) == 1 and failed[0]["error"]["code"] == C.ENGINE_ERROR
    assert "RuntimeError: engine bug" in failed[0]["error"]["message"]
    assert sorted(obj["custom_id"] for obj in ran + failed) == sorted(f"c{i}" for i in range(LINES))
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and (batch.request_completed, batch.request_failed) == (LINES - 1, 1)


def test_an_answer_whose_usage_holds_no_counts_is_still_that_lines_answer(setup: Any) -> None:
    """The upstream answered: its body is the line's result as sent, whatever its `usage` holds
    (only counts are summed). Before, a usage like {"prompt_tokens": "1.5"} raised while the line
    was counted completed, and the line became an engine_error counted as failed too."""
    store, files = setup
    odd = {"prompt_tokens": "1.5", "completion_tokens": [2], "prompt_tokens_details": {"cached_tokens": {}}}

    async def script(engine: ScriptedEngine, state: ShardState) -> None:
        for _ in range(LINES):
            engine.gate.release()

    assert _run(store, files, ScriptedEngine(usage_at={5: odd}), script) == "finished"
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.COMPLETED
    assert (batch.request_completed, batch.request_failed, batch.error_file_id) == (LINES, 0, None)
    assert (batch.input_tokens, batch.output_tokens, batch.cached_tokens) == (LINES - 1, 2 * (LINES - 1), 0)
    output = store.files.get_file(None, batch.output_file_id or "", int(NOW))
    assert output is not None
    usages = [orjson.loads(line)["response"]["body"]["usage"] for line in files.blobs[output.storage_key][0].splitlines()]
    assert usages.count(odd) == 1 and len(usages) == LINES


def test_a_finalize_lease_taken_while_the_worker_stops_is_handed_back(setup: Any) -> None:
    """The commit of a batch's last shard leases its finalize step to the committing worker. When
    that worker is stopping (SIGTERM while the commit ran), nobody there will finalize: the lease
    is released in the commit's thread, and a restarted worker finalizes at once instead of after
    the lease (a CI run saw a batch sit in finalizing past the test's 40 s)."""
    store, files = setup

    async def scenario() -> Any:
        lanes, engine = Lanes(), ScriptedEngine(fail_at=5)
        runner = ShardRunner(store.queue, files, Router([Route("*", engine)]), lanes, clock=lambda: NOW)
        claim = store.queue.claim_shard(NOW, 30, "lease")
        assert claim is not None
        state = ShardState(worker_stopping=True)
        task = asyncio.create_task(runner.run(claim, state))
        for _ in range(LINES):
            engine.gate.release()
        try:
            return await asyncio.wait_for(task, 5), state
        finally:
            await lanes.close()

    outcome, state = asyncio.run(scenario())
    assert outcome == "batch_ready" and state.finalize is None
    task = store.queue.claim_batch_task(NOW, 30, "restarted")  # at once, not after the lease
    assert task is not None and task.kind == "finalize"


def test_a_shard_that_fails_the_same_way_twice_is_settled_and_its_lines_reported(setup: Any) -> None:
    store, files = setup
    first = store.queue.claim_shard(NOW, 30, "t1")
    assert first is not None and first.last_error is None
    assert store.queue.fail_shard(first.shard_id, "t1", "batch_x", "OSError: disk on fire", False, int(NOW)) == "retry"
    second = store.queue.claim_shard(NOW, 30, "t2")  # at once, not after the lease runs out
    assert second is not None and second.last_error == "OSError: disk on fire"
    # a failure that is fenced by the lease: a stale holder cannot settle it
    assert store.queue.fail_shard(second.shard_id, "t1", "batch_x", "OSError: disk on fire", False, int(NOW)) == "lost"
    outcome = store.queue.fail_shard(second.shard_id, "t2", "batch_x", "OSError: disk on fire", False, int(NOW))
    assert outcome == "batch_ready"
    assert store.queue.claim_shard(NOW, 30, "t3") is None

    task = store.queue.claim_batch_task(NOW, 30, "f")
    assert task is not None and task.final_status == C.COMPLETED
    assert finalize_batch(task, files, store.queue, int(NOW))
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.COMPLETED and batch.request_failed == LINES
    assert batch.error_file_id is not None and batch.output_file_id is None
    record = store.files.get_file(None, batch.error_file_id, int(NOW))
    assert record is not None
    lines = [orjson.loads(line) for line in files.blobs[record.storage_key][0].splitlines()]
    assert [obj["custom_id"] for obj in lines] == [f"c{i}" for i in range(LINES)]
    assert {obj["error"]["code"] for obj in lines} == {C.SHARD_FAILED_CODE}
    assert "disk on fire" in lines[0]["error"]["message"]


def test_the_last_commit_leases_the_batch_to_its_worker_for_finalizing(setup: Any) -> None:
    """One transaction commits the last shard and leases the batch for finalizing: nobody else can
    claim the finalize task, and the task the commit returns finalizes the batch."""
    store, files = setup
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    section = b"{}\n" * LINES  # what finalize counts and copies into the output file
    result = ShardResult(result_key="results/batch_x/0", completed=LINES, output_bytes=len(section))
    with files.writer(result.result_key) as out:
        out.write(section)
    task = store.queue.commit_shard(claim.shard_id, "t1", "batch_x", result, int(NOW), finalize_lease=("f1", 30.0))
    assert isinstance(task, BatchTask)
    assert (task.kind, task.lease_token, task.final_status) == ("finalize", "f1", C.COMPLETED)
    assert [shard.status for shard in task.shards] == [C.SHARD_DONE]
    assert store.queue.claim_batch_task(None, 30, "other") is None  # the lease is ours
    assert finalize_batch(task, files, store.queue, int(NOW))
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.COMPLETED and batch.request_completed == LINES


def _answer_all(count: int = LINES, before_last: Any = None) -> Any:
    async def script(engine: ScriptedEngine, state: ShardState) -> None:
        for _ in range(count - 1):
            engine.gate.release()
        await _until_seen(engine, count - 1)
        if before_last is not None:
            before_last()
        engine.gate.release()

    return script


def test_a_batchs_only_shard_without_error_lines_completes_it_in_its_commit(setup: Any) -> None:
    """No finalize step: the shard writes its results where the output file's bytes live and the
    commit publishes them as that file (no copy) and completes the batch; no other blob is written."""
    store, files = setup
    assert _run(store, files, ScriptedEngine(), _answer_all()) == "finished"
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.COMPLETED and batch.output_file_id is not None
    assert (batch.request_completed, batch.request_failed, batch.error_file_id) == (LINES, 0, None)
    output = store.files.get_file(None, batch.output_file_id, int(NOW))
    assert output is not None and set(files.blobs) == {"files/in", output.storage_key}
    assert output.storage_key == f"files/{output.id}"
    lines = [orjson.loads(line) for line in files.blobs[output.storage_key][0].splitlines()]
    assert [obj["custom_id"] for obj in lines] == [f"c{i}" for i in range(LINES)] and output.bytes == sum(
        len(line) + 1 for line in files.blobs[output.storage_key][0].splitlines())
    assert store.queue.claim_batch_task(NOW + 100, 30, "late") is None


def test_a_whole_batch_shard_whose_lease_was_taken_leaves_nothing(setup: Any) -> None:
    store, files = setup
    thief: list[Any] = []
    steal = lambda: thief.append(store.queue.claim_shard(NOW + 31, 30, "thief"))  # noqa: E731 (the lease ran out)
    assert _run(store, files, ScriptedEngine(), _answer_all(before_last=steal)) == "lost"
    assert thief[0] is not None and set(files.blobs) == {"files/in"}  # its results object is deleted
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.IN_PROGRESS and batch.output_file_id is None


class CountingFiles(MemoryFileStore):
    """Records every blob a writer was opened for, and every blob read whole."""

    def __init__(self, inner: MemoryFileStore) -> None:
        super().__init__()
        self.blobs = inner.blobs
        self.opened: list[str] = []
        self.read: list[str] = []

    def writer(self, key: str) -> Any:
        self.opened.append(key)
        return super().writer(key)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Any:
        self.read.append(key)
        return super().iter_chunks(key, chunk_size)


@pytest.mark.parametrize("errors", [0, 3])
def test_a_one_shard_batch_without_errors_publishes_its_results_object_as_the_output(
    setup: Any, errors: int
) -> None:
    """The store copies the results object of a one-shard batch without error lines to the output
    file (a link on a local directory): finalize neither reads nor rewrites it. With error lines,
    the sections are split into the two files as before."""
    store, files = setup
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    output = b"".join(b'{"id":"batch_req_%d"}\n' % i for i in range(LINES - errors))
    error_lines = b"".join(b'{"id":"batch_req_e%d"}\n' % i for i in range(errors))
    result = ShardResult(result_key="results/batch_x/0", completed=LINES - errors, failed=errors,
                         output_bytes=len(output))
    with files.writer(result.result_key) as out:
        out.write(output + error_lines)
    task = store.queue.commit_shard(claim.shard_id, "t1", "batch_x", result, int(NOW), finalize_lease=("f1", 30.0))
    assert isinstance(task, BatchTask)
    counting = CountingFiles(files)
    assert finalize_batch(task, counting, store.queue, int(NOW))
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.output_file_id is not None
    assert (batch.request_completed, batch.request_failed) == (LINES - errors, errors)
    output_file = store.files.get_file(None, batch.output_file_id, int(NOW))
    assert output_file is not None and output_file.bytes == len(output)
    assert files.blobs[output_file.storage_key][0] == output
    assert result.result_key not in files.blobs  # the results object is gone, the output stays
    if errors:
        assert counting.read == [result.result_key] and batch.error_file_id is not None
    else:
        assert counting.read == [] and counting.opened == [] and batch.error_file_id is None


def test_finalize_opens_no_blob_for_a_file_it_would_leave_empty(setup: Any) -> None:
    """Every line failed: the error file is written, and no output file is ever opened (an empty
    one used to be created, fsynced, published and deleted again)."""
    store, files = setup
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    assert store.queue.fail_shard(claim.shard_id, "t1", "batch_x", "gave up", True, int(NOW)) == "batch_ready"
    task = store.queue.claim_batch_task(NOW, 30, "f")
    assert task is not None
    counting = CountingFiles(files)
    assert finalize_batch(task, counting, store.queue, int(NOW))
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.output_file_id is None and batch.error_file_id is not None
    error_file = store.files.get_file(None, batch.error_file_id, int(NOW))
    assert error_file is not None and counting.opened == [error_file.storage_key]


def test_a_different_failure_is_retried_and_attempts_are_capped(setup: Any) -> None:
    store, _files = setup
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None
    assert store.queue.fail_shard(claim.shard_id, "t1", "batch_x", "error A", False, int(NOW)) == "retry"
    claim = store.queue.claim_shard(NOW, 30, "t2")
    assert claim is not None
    assert store.queue.fail_shard(claim.shard_id, "t2", "batch_x", "error B", False, int(NOW)) == "retry"
    claim = store.queue.claim_shard(NOW, 30, "t3")
    assert claim is not None and claim.attempt == 3
    assert store.queue.fail_shard(claim.shard_id, "t3", "batch_x", "gave up", True, int(NOW)) == "batch_ready"


class UnavailableFiles(MemoryFileStore):
    """A file store in an outage: reads fail after the adapter's own retries."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        raise StorageUnavailableError("the object store did not answer for 30 s")


def test_a_storage_outage_hands_the_shard_back_without_counting_a_failure(setup: Any) -> None:
    store, files = setup
    outage = UnavailableFiles()
    outage.blobs = files.blobs
    worker = Worker(store.queue, store.queue, store.housekeeping, outage, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(), Limits())
    claim = store.queue.claim_shard(NOW, 30, "t1")
    assert claim is not None

    async def scenario() -> None:
        worker._lease_thread = ThreadPoolExecutor(1)
        await worker._run_shard(claim, ShardState())

    for _ in range(3):  # more outages than the same-failure-twice rule allows: still not given up
        asyncio.run(scenario())
        claim = store.queue.claim_shard(NOW, 30, "t-again")  # at once: it was handed back, not left to expire
        assert claim is not None and claim.last_error is None


class FullFiles(MemoryFileStore):
    """A full disk: reads work, every write is refused."""

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[Any]:
        raise StorageFullError(28, "No space left on device")
        yield


@pytest.mark.parametrize("failing", [UnavailableFiles, FullFiles])
def test_a_store_failure_hands_shards_back_for_good_and_pauses_claims(setup: Any, failing: type) -> None:
    """A full disk failed a shard like a bug: twice the same error, and it was settled `failed`
    (its lines run twice and thrown away, and the next shard claimed at once to go the same way).
    And each hand-back of an outage used up one of max_shard_attempts: outages adding up to that
    many gave the shard up. A hand-back is now no attempt, and the worker stops claiming a while."""
    store, files = setup
    broken = failing()
    broken.blobs = files.blobs
    clock = [0.0]
    worker = Worker(store.queue, store.queue, store.housekeeping, broken, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(max_shard_attempts=2), Limits())
    worker._storage_pause = StoragePause(lambda: clock[0])

    async def scenario() -> list[float]:
        worker._lease_thread = ThreadPoolExecutor(1)
        worker.lanes = worker.runner.lanes = Lanes()  # on this loop: the lines are sent before the write fails
        pauses = []
        try:
            for round_ in range(5):  # more than max_shard_attempts, and than the same-failure-twice rule
                claim = store.queue.claim_shard(NOW, 30, f"t{round_}")
                assert claim is not None and claim.attempt == round_ + 1 and claim.failed_attempts == 0
                await asyncio.wait_for(worker._run_shard(claim, ShardState()), 10)
                assert await worker._claim_shards(set()) is False  # paused: claims nothing
                pauses.append(worker._storage_pause.seconds)
                clock[0] = worker._storage_pause.until  # the pause passes
        finally:
            await worker.lanes.close()
        return pauses

    assert asyncio.run(scenario()) == [2, 4, 8, 16, 32]
    row = store.queue.claim_shard(NOW, 30, "last")
    assert row is not None and row.last_error is None  # never failed, never given up
    worker._storage_pause.clear()
    assert not worker._storage_pause.active()


def test_a_nudge_for_batch_work_outlives_full_batch_task_slots(setup: Any) -> None:
    """With every batch-task slot busy, a claim attempt must keep the nudge (a batch was created, a
    validation ended): the task that frees the slot wakes the loop, which claims then. Consumed,
    the batch waited for the next poll (`poll_seconds`), after a finalize freed the slot."""
    store, files = setup
    worker = Worker(store.queue, store.queue, store.housekeeping, files, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(max_batch_tasks=1), Limits())
    worker._batch_tasks = 1  # a finalize is running
    worker._batch_due = False

    async def scenario() -> bool:
        return await worker._claim_batch_task(set())

    assert asyncio.run(scenario()) is False
    assert worker._batch_due  # still due: claimed as soon as the slot frees


@pytest.mark.parametrize(("change", "batch_work"), [
    (C.CHANGE_CREATED, True), (C.CHANGE_CANCELLED, True), (C.CHANGE_STARTED, False),
])
def test_a_batch_created_in_progress_wakes_shard_claims_only(setup: Any, change: str, batch_work: bool) -> None:
    """A batch created `in_progress` (validated on upload) has shards to claim and no batch-level
    task: its wake-up must not cost a batch-task claim (a write transaction that finds nothing).
    One created `validating`, or a cancel, needs the batch-level claim."""
    store, files = setup
    worker = Worker(store.queue, store.queue, store.housekeeping, files, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(), Limits())
    worker._batch_due = False

    async def scenario() -> None:
        worker._loop = asyncio.get_running_loop()
        worker.wake(change)
        await asyncio.sleep(0)  # the nudge runs on the loop (call_soon_threadsafe)

    asyncio.run(scenario())
    assert worker._wake.is_set()
    assert worker._batch_due is batch_work


def test_a_finished_attempt_leaves_a_newer_attempt_of_its_shard_held(setup: Any) -> None:
    """An attempt whose lease was lost ends after the same worker claimed its shard again: it must
    not drop the new attempt from the shards the heartbeat keeps alive."""
    store, files = setup
    worker = Worker(store.queue, store.queue, store.housekeeping, files, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(), Limits())
    old = store.queue.claim_shard(NOW, 30, "old")
    assert old is not None
    old_state = ShardState(lease_lost=True)
    new = store.queue.claim_shard(NOW + 31, 30, "new")  # the old lease ran out: claimed again
    assert new is not None and new.shard_id == old.shard_id
    new_state = ShardState()
    worker._shards[new.shard_id] = (new, new_state)

    async def scenario() -> None:
        worker._lease_thread = ThreadPoolExecutor(1)
        await worker._run_shard(old, old_state)  # the old attempt ends (its lines were never queued)

    asyncio.run(scenario())
    assert worker._shards.get(new.shard_id) == (new, new_state)


class _HourlyHeartbeat(Worker):
    @property
    def heartbeat_seconds(self) -> float:
        return 3600.0


def test_a_cancel_wake_brings_the_heartbeat_forward(setup: Any) -> None:
    """A cancel (from this machine's API, or another's through NOTIFY) makes the worker heartbeat at
    once: the heartbeat is what tells running shards to stop, and its next tick may be a second away
    (more under load, when lines kept going out after a cancel)."""
    store, files = setup
    worker = _HourlyHeartbeat(store.queue, store.queue, store.housekeeping, files,
                              Router([Route("*", ScriptedEngine())]), WorkerSettings(), Limits())
    claim = store.queue.claim_shard(NOW, 30, "lease")
    assert claim is not None
    state = ShardState()
    worker._shards[claim.shard_id] = (claim, state)
    assert store.batches.request_cancel("o", "batch_x", int(NOW)) is not None

    async def until_stopped(seconds: float) -> bool:
        for _ in range(int(seconds / 0.02)):
            if state.batch_stopped:
                return True
            await asyncio.sleep(0.02)
        return state.batch_stopped

    async def scenario() -> tuple[bool, bool]:
        worker._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        heartbeats = asyncio.create_task(worker._heartbeat_loop(stop))
        try:
            worker.wake(C.CHANGE_CREATED)  # a new batch is no reason to heartbeat early
            after_create = await until_stopped(0.3)
            worker.wake(C.CHANGE_CANCELLED)
            return after_create, await until_stopped(5)
        finally:
            stop.set()
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats

    after_create, after_cancel = asyncio.run(scenario())
    assert not after_create and after_cancel


class InstantEngine(ScriptedEngine):
    async def execute(self, request: EngineRequest) -> EngineResponse:
        await asyncio.sleep(0)
        return EngineResponse(200, {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}})


def test_a_one_shard_batch_costs_the_worker_three_write_transactions(store: SqlStore) -> None:
    """What a small batch costs the store's single writer, from its shard's claim to its webhook
    delivered: claim the shard; commit it, publishing the output, completing the batch and leasing
    its webhook to this worker; settle the delivery. (Five before: a finish transaction after the
    commit, and a claim of the delivery after the finish.)"""
    files, now = MemoryFileStore(), int(time.time())  # the worker runs on the database's clock
    data = b"".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": C.CHAT_COMPLETIONS, "body": {
        "model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}}) + b"\n" for i in range(LINES))
    with files.writer("files/in") as out:
        out.write(data)
    store.files.insert_file(FileRecord("file-in", "o", "batch", "in", len(data), now, None, "files/in"))
    store.batches.insert_batch(BatchRecord("batch_x", "o", C.CHAT_COMPLETIONS, "file-in", "24h", C.IN_PROGRESS, now,
                                           now + 86400, request_total=LINES),
                               [ShardPlan(0, 0, LINES, 0, len(data))])
    did: list[str] = []

    def counted(owner: Any, name: str, found: Any) -> None:
        method = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if found(result):
                did.append(name)
            return result

        setattr(owner, name, call)

    for name in ("commit_shard", "finish_batch", "mark_delivered", "fail_shard"):
        counted(store.queue if hasattr(store.queue, name) else store.webhooks, name, lambda _: True)
    for name in ("claim_shard", "claim_batch_task"):
        counted(store.queue, name, lambda result: result is not None)
    counted(store.webhooks, "claim_deliveries", bool)
    delivered: list[bytes] = []
    sender = WebhookSender(store.webhooks, WebhookRoutes([WebhookEndpoint("o", "http://127.0.0.1:1/h", b"k")]),
                           RetryPolicy((60.0,)), 5.0, transport=lambda url, body, headers, timeout: (
                               delivered.append(body), 204)[1])
    worker = Worker(store.queue, store.queue, store.housekeeping, files, Router([Route("*", InstantEngine())]),
                    WorkerSettings(), Limits(), webhooks=sender, webhook_poll_seconds=3600)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        for _ in range(500):  # bounded: 5 s
            await asyncio.sleep(0.01)
            if "mark_delivered" in did:
                break
        await asyncio.sleep(0.2)  # anything else the batch would cause
        stop.set()
        await task

    asyncio.run(scenario())
    batch = store.batches.get_batch(None, "batch_x")
    assert batch is not None and batch.status == C.COMPLETED and len(delivered) == 1
    assert did == ["claim_shard", "commit_shard", "mark_delivered"]


class FlakyLeases:
    """The queue, but extending a batch lease fails once (a dropped connection)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    def extend_batch_lease(self, batch_id: str, token: str, lease_seconds: float, now: float | None = None) -> bool:
        self.calls.append("fail" if not self.calls else "ok")
        if len(self.calls) == 1:
            raise ConnectionResetError("server closed the connection unexpectedly")
        return True


def test_a_failed_lease_extension_does_not_stop_the_next(setup: Any) -> None:
    """One database error while extending a batch lease killed the task that extends it: a long
    finalize then lost its lease and ran twice, and the error surfaced as the finalize failing."""
    store, files = setup
    flaky = FlakyLeases(store.queue)
    worker = Worker(flaky, store.queue, store.housekeeping, files, Router([Route("*", ScriptedEngine())]),
                    WorkerSettings(lease_seconds=0.15), Limits())

    async def scenario() -> None:
        worker._lease_thread = ThreadPoolExecutor(1)
        async with worker._batch_lease("batch_x", "token"):
            await asyncio.sleep(0.4)  # a long finalize: three extensions due

    asyncio.run(scenario())  # the first extension's error does not end the block
    assert flaky.calls[:3] == ["fail", "ok", "ok"]


class SurrogateEngine(ScriptedEngine):
    """An upstream whose answers carry lone surrogates (valid JSON escapes, not UTF-8) in an error
    code and a model name, and a code far too long to keep."""

    async def execute(self, request: EngineRequest) -> EngineResponse:
        n = int(request.body["messages"][0]["content"][1:])
        raw = (b'{"model": "m\\udfff", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}' if n % 2 else
               b'{"error": {"code": "bad\\ud800"}}' if n % 4 else b'{"error": {"code": "' + b"x" * 100_000 + b'"}}')
        body = json.loads(raw)  # as the upstream engine reads what orjson refuses
        return EngineResponse(200 if n % 2 else 400, body, raw=raw)


def test_an_upstreams_unstorable_text_does_not_fail_the_shard(setup: Any) -> None:
    store, files = setup

    async def scenario() -> Any:
        lanes = Lanes()
        runner = ShardRunner(store.queue, files, Router([Route("*", SurrogateEngine())]), lanes, clock=lambda: NOW)
        claim = store.queue.claim_shard(NOW, 30, "lease")
        assert claim is not None
        try:
            return await asyncio.wait_for(runner.run(claim, ShardState()), 10)
        finally:
            await lanes.close()

    assert asyncio.run(scenario()) in ("batch_ready", "finished")
    with store.db.read() as conn:
        row = conn.execute(select(shards.c.status, shards.c.error_codes, shards.c.model)).one()
    assert row.status == C.SHARD_DONE
    assert json.loads(row.error_codes) == {"bad\\ud800": LINES // 4, "x" * 256: LINES // 4}
    assert row.model == "m\\udfff"
