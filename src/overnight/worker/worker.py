"""The worker: claims batch-level tasks (validate, finalize) and shards, keeps their leases alive,
and cleans up. Stateless: any number of workers, in the server process or apart, share one store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from overnight import constants as C
from overnight.batches.finalize import finalize_batch
from overnight.batches.validation import validate_input
from overnight.engines.router import Router
from overnight.files.port import FileStore
from overnight.ids import new_lease_token
from overnight.settings import Limits, WorkerSettings
from overnight.store.metadata import MetadataStore
from overnight.store.records import BatchTask, ClaimedShard, ShardProgress
from overnight.worker.lanes import Lanes
from overnight.worker.shard_runner import ShardRunner, ShardState

log = logging.getLogger("overnight.worker")

# Orphans (a crashed writer's objects that no row names) are removed once this old.
ORPHAN_AGE_SECONDS = 3600.0
# Empty directories are removed once unchanged this long: a writer's fresh one is left alone.
EMPTY_DIR_AGE_SECONDS = 60.0


class Worker:
    def __init__(
        self,
        store: MetadataStore,
        files: FileStore,
        router: Router,
        settings: WorkerSettings,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        janitor_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.files = files
        self.router = router
        self.settings = settings
        self.limits = limits
        self.clock = clock
        self.janitor_seconds = janitor_seconds
        self.lanes = Lanes(on_low=self._nudge_shards)
        self.runner = ShardRunner(store, files, router, self.lanes, clock)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shards: dict[int, tuple[ClaimedShard, ShardState]] = {}
        self._batch_tasks = 0
        self._batch_leases: dict[str, str] = {}  # batch-level tasks running: batch id -> lease token
        self._batch_due = True  # claim batch-level work at the next turn of the claim loop

    # -- wiring ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Thread-safe nudge: new work may be claimable (a batch was created or cancelled)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._nudge)

    def _nudge(self) -> None:
        self._batch_due = True
        self._wake.set()

    def _nudge_shards(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        loops = [
            asyncio.create_task(self._claim_loop(stop), name="claim"),
            asyncio.create_task(self._heartbeat_loop(stop), name="heartbeat"),
            asyncio.create_task(self._janitor_loop(stop), name="janitor"),
        ]
        try:
            await stop.wait()
        finally:
            held = [(shard_id, claim.lease_token) for shard_id, (claim, _) in self._shards.items()]
            batch_leases = list(self._batch_leases.items())
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.lanes.close()
            await asyncio.to_thread(self._hand_back, held, batch_leases)

    def _hand_back(self, shards: list[tuple[int, str]], batches: list[tuple[str, str]]) -> None:
        """On a graceful stop, release what we hold so a restart (or another worker) resumes at once."""
        try:
            self.store.release_shards(shards)
            for batch_id, token in batches:
                self.store.release_batch_lease(batch_id, token)
        except Exception:
            log.exception("could not hand back leases; they will expire instead")

    # -- claiming -------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        """Claim shards whenever a slot is free; claim batch-level tasks when woken (a batch was
        created or cancelled, a shard finished its batch) or every poll interval."""
        running: set[asyncio.Task[None]] = set()
        next_batch_poll = 0.0
        try:
            while not stop.is_set():
                claimed = False
                if self._batch_due or time.monotonic() >= next_batch_poll:
                    self._batch_due = False
                    next_batch_poll = time.monotonic() + self.settings.poll_seconds
                    claimed = await self._claim_batch_task(running)
                claimed = await self._claim_shards(running) or claimed
                if not claimed:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _claim_batch_task(self, running: set[asyncio.Task[None]]) -> bool:
        if self._batch_tasks >= self.settings.max_batch_tasks:
            return False
        lease = self.settings.lease_seconds
        task = await asyncio.to_thread(self.store.claim_batch_task, self.clock(), lease, new_lease_token())
        if task is None:
            return False
        self._batch_due = True  # there may be more
        self._spawn(running, self._run_batch_task(task))
        return True

    async def _claim_shards(self, running: set[asyncio.Task[None]]) -> bool:
        claimed = False
        lease = self.settings.lease_seconds
        while len(self._shards) < self.settings.max_shards_in_flight and self.lanes.wants_more(self._unqueued()):
            shard = await asyncio.to_thread(self.store.claim_shard, self.clock(), lease, new_lease_token())
            if shard is None:
                break
            claimed = True
            self.lanes.note_shard(shard.request_count)
            state = ShardState()
            self._shards[shard.shard_id] = (shard, state)
            self._spawn(running, self._run_shard(shard, state))
        return claimed

    def _unqueued(self) -> int:
        return sum(claim.request_count for claim, state in self._shards.values() if not state.queued)

    def _spawn(self, running: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        running.add(task)
        task.add_done_callback(running.discard)

    async def _run_shard(self, shard: ClaimedShard, state: ShardState) -> None:
        try:
            if shard.attempt > self.settings.max_shard_attempts:
                error = (f"gave up after {shard.attempt - 1} attempts: the worker running this shard "
                         f"stopped each time (last error: {shard.last_error or 'none recorded'})")
                await self._fail_shard(shard, error, give_up=True)
            elif await self.runner.run(shard, state) == "batch_ready":
                self._batch_due = True
        except Exception as exc:
            # Nothing was committed. Run again at once, or settle the shard if it failed this way before.
            log.exception("shard %s of %s failed", shard.shard_index, shard.batch_id)
            with contextlib.suppress(Exception):
                await self._fail_shard(shard, f"{type(exc).__name__}: {str(exc)[:500]}", give_up=False)
        finally:
            self._shards.pop(shard.shard_id, None)
            self._wake.set()

    async def _fail_shard(self, shard: ClaimedShard, error: str, give_up: bool) -> None:
        outcome = await asyncio.to_thread(
            self.store.fail_shard, shard.shard_id, shard.lease_token, shard.batch_id, error, give_up,
            int(self.clock()),
        )
        if outcome != "retry":
            log.error("shard %s of %s given up (%s): %s", shard.shard_index, shard.batch_id, outcome, error)
        if outcome == "batch_ready":
            self._batch_due = True

    async def _run_batch_task(self, task: BatchTask) -> None:
        self._batch_tasks += 1
        self._batch_leases[task.batch.id] = task.lease_token
        try:
            async with self._batch_lease(task.batch.id, task.lease_token):
                if task.kind == "validate":
                    await self._validate(task)
                    self._batch_due = True  # a failed or cancelled validation is finalized next
                else:
                    await asyncio.to_thread(finalize_batch, task, self.files, self.store, int(self.clock()))
        except Exception:
            log.exception("%s of batch %s failed; it will be retried", task.kind, task.batch.id)
        finally:
            self._batch_tasks -= 1
            self._batch_leases.pop(task.batch.id, None)
            self._wake.set()

    async def _validate(self, task: BatchTask) -> None:
        batch = task.batch
        now = int(self.clock())
        key = task.input_storage_key
        if key is None or not await asyncio.to_thread(self.files.exists, key):
            error = {
                "code": "invalid_request",
                "message": f"Cannot find file {batch.input_file_id}: it was deleted or expired before validation.",
                "param": "input_file_id",
                "line": None,
            }
            await asyncio.to_thread(self.store.fail_batch, batch.id, task.lease_token, [error], now)
            return

        def shard_lines_for(model: str) -> int | None:
            resolved = self.router.resolve(model, batch.endpoint)
            return resolved.engine.shard_lines if resolved is not None else None

        report = await asyncio.to_thread(
            validate_input, lambda: self.files.iter_chunks(key), batch.endpoint, shard_lines_for, self.limits
        )
        now = int(self.clock())
        if report.ok:
            moved = await asyncio.to_thread(
                self.store.start_batch, batch.id, task.lease_token, report.plans, report.total, now
            )
        else:
            moved = await asyncio.to_thread(self.store.fail_batch, batch.id, task.lease_token, report.errors, now)
        if not moved:  # cancelled while validating: hand the batch to finalize at once
            await asyncio.to_thread(self.store.release_batch_lease, batch.id, task.lease_token)

    @contextlib.asynccontextmanager
    async def _batch_lease(self, batch_id: str, token: str) -> AsyncIterator[None]:
        """Keep a batch-level lease alive while its task runs."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_seconds / 3)
                until = self.clock() + self.settings.lease_seconds
                await asyncio.to_thread(self.store.extend_batch_lease, batch_id, token, until)

        keeper = asyncio.create_task(keep())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    # -- leases and housekeeping ----------------------------------------------------------

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.lease_seconds / 3
        while not stop.is_set():
            await asyncio.sleep(min(interval, 1.0))
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Extend our shard leases and learn which shards must stop (lease lost, batch cancelled)."""
        held = [
            ShardProgress(shard_id, claim.lease_token, state.result.completed, state.result.failed)
            if state.result is not None
            else ShardProgress(shard_id, claim.lease_token)
            for shard_id, (claim, state) in list(self._shards.items())
        ]
        if not held:
            return
        until = self.clock() + self.settings.lease_seconds
        try:
            lost, stopped = await asyncio.to_thread(self.store.heartbeat_shards, held, until)
        except Exception:
            log.exception("heartbeat failed")
            return
        for shard_id in lost | stopped:
            entry = self._shards.get(shard_id)
            if entry is not None:
                entry[1].lease_lost |= shard_id in lost
                entry[1].batch_stopped |= shard_id in stopped

    async def _janitor_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.collect_garbage)
            except Exception:
                log.exception("cleanup failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.janitor_seconds)

    def collect_garbage(self, orphan_age: float = ORPHAN_AGE_SECONDS) -> int:
        """Remove bytes of deleted/expired files, objects no row names and unfinished uploads
        (crashed writers); returns how many objects. Also removes empty directories (earlier
        versions left one per batch), younger ones too when `orphan_age` says no writer runs."""
        removed = 0
        for key in self.store.collect_garbage(int(self.clock())):
            self.files.delete(key)
            removed += 1
        for prefix in ("files/", "results/"):
            old = list(self.files.list_keys(prefix, self.clock() - orphan_age))
            for start in range(0, len(old), 500):
                chunk = old[start : start + 500]
                live = self.store.live_storage_keys(chunk)
                for key in chunk:
                    if key not in live and not self._belongs_to_active_batch(key):
                        self.files.delete(key)
                        removed += 1
        stale = self.files.abort_stale_uploads(self.clock() - orphan_age)
        if stale:
            log.info("discarded %d unfinished uploads", stale)
        dirs = self.files.remove_empty_dirs(self.clock() - min(orphan_age, EMPTY_DIR_AGE_SECONDS))
        if dirs:
            log.info("removed %d empty directories", dirs)
        return removed

    def _belongs_to_active_batch(self, key: str) -> bool:
        """A results object of a running shard is named by no row until its commit."""
        if not key.startswith("results/"):
            return False
        batch_id = key.split("/")[1]
        return self.store.batch_status(batch_id) in C.ACTIVE_STATES
