"""The worker: claims batch-level tasks and shards, keeps their leases alive, runs them, and runs
housekeeping now and then. What a validation, a finalization or housekeeping does is the batch
domain's (batches/lifecycle.py, batches/housekeeping.py); the worker owns claims, leases, lanes
and heartbeats. Stateless: any number of workers, in the server process or apart, share one store."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from overnight import constants as C
from overnight.batches.housekeeping import ORPHAN_AGE_SECONDS, OrphanSightings, collect_garbage
from overnight.batches.lifecycle import finalize_batch, validate_batch
from overnight.batches.ports import BatchPhases, StorageCatalog
from overnight.batches.webhooks import WebhookRoutes, WebhookSender
from overnight.engines.router import Router
from overnight.files.port import FileStore, StorageFullError, StorageUnavailableError
from overnight.ids import new_lease_token
from overnight.observability.logs import bind
from overnight.observability.metrics import WorkerMetrics
from overnight.settings import Limits, WorkerSettings
from overnight.store.records import BatchTask, ClaimedDelivery, ClaimedShard, DeliveryLease, ShardProgress
from overnight.worker.budget import Standing
from overnight.worker.lanes import Lanes
from overnight.worker.ports import Membership, WakeSource, WorkQueue
from overnight.worker.shard_runner import ShardRunner, ShardState

log = logging.getLogger("overnight.worker")
_T = TypeVar("_T")



class StoragePause:
    """After the file store fails a shard (an outage past the adapter's retries, a full disk), the
    worker claims no shards for a while: 2 s, doubling with each failure in a row up to 5 minutes,
    cleared by the next shard that runs to its end."""

    FIRST_SECONDS, LONGEST_SECONDS = 2.0, 300.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.until = 0.0

    def extend(self) -> float:
        self.seconds = min(self.LONGEST_SECONDS, self.seconds * 2 or self.FIRST_SECONDS)
        self.until = self.clock() + self.seconds
        return self.seconds

    def active(self) -> bool:
        return self.clock() < self.until

    def clear(self) -> None:
        self.seconds, self.until = 0.0, 0.0


class Worker:
    """Leases are claimed and extended on the database's clock (the queue's `now=None`); `clock` is
    the worker's own, for the deadlines of lines and the timestamps it records."""

    def __init__(
        self,
        queue: WorkQueue,
        phases: BatchPhases,
        catalog: StorageCatalog,
        files: FileStore,
        router: Router,
        settings: WorkerSettings,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        janitor_seconds: float = 60.0,
        membership: Membership | None = None,
        webhooks: WebhookSender | None = None,
        webhook_slots: int = 8,
        webhook_poll_seconds: float = 1.0,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.queue = queue
        self.phases = phases
        self.catalog = catalog
        self.files = files
        self.router = router
        self.settings = settings
        self.limits = limits
        self.clock = clock
        self.janitor_seconds = janitor_seconds
        self._orphan_sightings = OrphanSightings()
        self.membership = membership
        self.webhooks = webhooks
        self.webhook_slots = webhook_slots
        self.webhook_poll_seconds = webhook_poll_seconds
        self._webhooks_due = asyncio.Event()
        self.metrics = metrics or WorkerMetrics()
        self.worker_id = new_lease_token()
        self.lanes = Lanes(on_low=self._nudge_shards)
        self.runner = ShardRunner(queue, files, router, self.lanes, clock, self.metrics, settings.lease_seconds,
                                  webhooks.routes if webhooks is not None else None, self._delivery_lease)
        # Webhook deliveries leased to this worker by the transaction that ended their batch, the
        # attempts in flight (the webhook loop's) and the slots offered to transactions that may end a
        # batch (`_delivery_lease`): together at most `webhook_slots`.
        self._handed: deque[ClaimedDelivery] = deque()
        self._delivering = 0
        self._offered = 0
        self._claim_webhooks = True  # the webhook loop's next turn looks for due deliveries
        self._running: set[asyncio.Task[None]] = set()  # shard and batch tasks, cancelled at stop
        self._wake = asyncio.Event()
        self._heartbeat_due = asyncio.Event()  # set by a cancel: heartbeat now, not at the next tick
        # Half the lease: the others count a worker gone once its row is a lease old.
        self._standing = Standing(stale_after=settings.lease_seconds / 2)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shards: dict[int, tuple[ClaimedShard, ShardState]] = {}
        self._batch_tasks = 0
        self._batch_leases: dict[str, str] = {}  # batch-level tasks running: batch id -> lease token
        self._batch_due = True  # claim batch-level work at the next turn of the claim loop
        self._storage_pause = StoragePause()  # no shard claims while the file store is down or full
        self.wake_sources: list[WakeSource] = []
        self._lease_thread = ThreadPoolExecutor(1, thread_name_prefix="overnight-leases")

    # -- wiring ---------------------------------------------------------------------------

    async def _in_lease_thread(self, call: Callable[..., _T], *args: Any) -> _T:
        """Lease upkeep runs on a thread of its own: in the shared pool it queued behind file
        reads and writes stalled on a slow store, and leases ran out under live shards."""
        return await asyncio.get_running_loop().run_in_executor(self._lease_thread, functools.partial(call, *args))

    def wake(self, change: str = C.CHANGE_CREATED) -> None:
        """Thread-safe nudge: new work may be claimable (a batch was created or cancelled). A
        cancel also brings the next heartbeat forward: it is what tells running shards to stop.
        A batch created `in_progress` (C.CHANGE_STARTED) has only shards to claim: a batch-level
        claim for it would find nothing (one write transaction per batch for nothing)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._nudge, change)

    def _nudge(self, change: str) -> None:
        if change != C.CHANGE_STARTED:
            self._batch_due = True
        self._wake.set()
        if change == C.CHANGE_CANCELLED:
            self._heartbeat_due.set()

    def _nudge_shards(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._lease_thread = ThreadPoolExecutor(1, thread_name_prefix="overnight-leases")
        if self.membership is not None:
            await asyncio.to_thread(self.membership.join, self.worker_id)
            await self._update_shares()
        for source in self.wake_sources:
            source.start()
        loops = [
            asyncio.create_task(self._claim_loop(stop), name="claim"),
            asyncio.create_task(self._heartbeat_loop(stop), name="heartbeat"),
            asyncio.create_task(self._janitor_loop(stop), name="janitor"),
        ]
        if self.webhooks is not None:
            loops.append(asyncio.create_task(self._webhook_loop(self.webhooks, stop), name="webhooks"))
        try:
            await stop.wait()
        finally:
            for _, state in self._shards.values():
                state.worker_stopping = True  # a commit still running hands its finalize lease back
            held = [(shard_id, claim.lease_token) for shard_id, (claim, _) in self._shards.items()]
            # and so does the stop, for a commit done whose task did not take its outcome in
            batch_leases = list(self._batch_leases.items()) + [
                (claim.batch_id, state.finalize_token) for claim, state in self._shards.values()
                if state.finalize_token is not None]
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.lanes.close()
            self._publish_metrics()  # what ran since the last heartbeat
            await asyncio.to_thread(self._hand_back, held, batch_leases)
            for source in self.wake_sources:
                await asyncio.to_thread(source.stop)
            if self.membership is not None:
                with contextlib.suppress(Exception):  # else its row goes stale and is dropped
                    await asyncio.to_thread(self.membership.leave, self.worker_id)
            self._lease_thread.shutdown(wait=False)

    def _hand_back(self, shards: list[tuple[int, str]], batches: list[tuple[str, str]]) -> None:
        """On a graceful stop, release what we hold so a restart (or another worker) resumes at once."""
        try:
            self.queue.release_shards(shards)
            for batch_id, token in batches:
                self.queue.release_batch_lease(batch_id, token)
        except Exception:
            log.exception("could not hand back leases; they will expire instead")

    # -- claiming -------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        """Claim shards whenever a slot is free; claim batch-level tasks when woken (a batch was
        created or cancelled, a shard finished its batch) or every poll interval."""
        running = self._running
        next_batch_poll = 0.0
        try:
            while not stop.is_set():
                claimed = False
                try:
                    if self._batch_due or time.monotonic() >= next_batch_poll:
                        self._batch_due = False
                        next_batch_poll = time.monotonic() + self.settings.poll_seconds
                        claimed = await self._claim_batch_task(running)
                    claimed = await self._claim_shards(running) or claimed
                except Exception:
                    # The database restarted or a connection dropped: what was not claimed is
                    # claimed on a later turn. A claim loop that died would leave the worker idle.
                    log.exception("claiming work failed; trying again")
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
            # Keep the nudge: the task that frees a slot wakes the loop, which claims then. (Consumed
            # here, a batch created while finalizes filled the slots waited for the next poll.)
            self._batch_due = True
            return False
        lease = self.settings.lease_seconds
        task = await asyncio.to_thread(self.queue.claim_batch_task, None, lease, new_lease_token())
        if task is None:
            return False
        self._batch_due = True  # there may be more
        self._spawn(running, self._run_batch_task(task))
        return True

    async def _claim_shards(self, running: set[asyncio.Task[None]]) -> bool:
        claimed = False
        lease = self.settings.lease_seconds
        if self._storage_pause.active():
            return False
        while len(self._shards) < self.settings.max_shards_in_flight and self.lanes.wants_more(self._unqueued()):
            shard = await asyncio.to_thread(
                self.queue.claim_shard, None, lease, new_lease_token(), self.settings.deadline_horizon_seconds
            )
            if shard is None:
                break
            claimed = True
            self.metrics.shard_claims.inc()
            if shard.attempt > 1:
                self.metrics.shard_reclaims.inc()
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
        # This task's log lines name the shard, its batch and the call that created the batch.
        bind(request_id=shard.request_id, batch_id=shard.batch_id, shard=shard.shard_index)
        try:
            if shard.failed_attempts >= self.settings.max_shard_attempts:
                error = (f"gave up after {shard.failed_attempts} attempts: the worker running this shard "
                         f"stopped each time (last error: {shard.last_error or 'none recorded'})")
                await self._fail_shard(shard, error, give_up=True)
            else:
                outcome = await self.runner.run(shard, state)
                self._storage_pause.clear()
                if outcome == "finished":
                    self._send_now(state.deliveries)
                    state.deliveries = None
                elif outcome == "batch_ready":
                    if state.finalize is not None:  # leased to us with the commit: finalize now
                        # held from here, not from the task's start: a stop may cancel it first
                        self._batch_leases[state.finalize.batch.id] = state.finalize.lease_token
                        self._spawn(self._running, self._run_batch_task(state.finalize))
                    else:
                        self._batch_due = True
        except (StorageUnavailableError, StorageFullError, DBAPIError) as exc:
            # An outage of the file store or the database, or a full disk: nothing wrong with the
            # shard. Hand it back (not counted as an attempt) and let the outage pass; after a store
            # failure, claim no shard for a while (each claim would run its lines again for nothing).
            if not isinstance(exc, DBAPIError):
                pause = self._storage_pause.extend()
                log.warning("the file store failed (%s); no shards are claimed for %.0f s", exc, pause)
            log.warning("shard %s of %s handed back: %s", shard.shard_index, shard.batch_id, exc)
            with contextlib.suppress(Exception):
                await self._in_lease_thread(self.queue.release_shards, [(shard.shard_id, shard.lease_token)])
        except Exception as exc:
            # Nothing was committed. Run again at once, or settle the shard if it failed this way before.
            log.exception("shard %s of %s failed", shard.shard_index, shard.batch_id)
            with contextlib.suppress(Exception):
                await self._fail_shard(shard, f"{type(exc).__name__}: {str(exc)[:500]}", give_up=False)
        finally:
            self._withdraw(state.deliveries)  # offered, but the commit did not end the batch
            # Only our own entry: a shard whose lease we lost may already be claimed again (by this
            # worker too) and entered under the same id; dropping that entry would stop its heartbeat.
            if (entry := self._shards.get(shard.shard_id)) is not None and entry[1] is state:
                del self._shards[shard.shard_id]
            self._wake.set()

    async def _fail_shard(self, shard: ClaimedShard, error: str, give_up: bool) -> None:
        outcome = await asyncio.to_thread(
            self.queue.fail_shard, shard.shard_id, shard.lease_token, shard.batch_id, error, give_up,
            int(self.clock()),
        )
        if outcome != "retry":
            log.error("shard %s of %s given up (%s): %s", shard.shard_index, shard.batch_id, outcome, error)
        if outcome == "batch_ready":
            self._batch_due = True

    async def _run_batch_task(self, task: BatchTask) -> None:
        self._batch_tasks += 1
        self._batch_leases[task.batch.id] = task.lease_token
        bind(request_id=task.batch.request_id, batch_id=task.batch.id)
        handed = False  # a finalize hands its webhook events to the loop itself
        deliveries: DeliveryLease | None = None
        try:
            async with self._batch_lease(task.batch.id, task.lease_token):
                started = time.monotonic()
                if task.kind == "validate":
                    entered = await asyncio.to_thread(validate_batch, task, self.files, self.phases,
                                                      self.router.shard_lines, self.limits, self.clock,
                                                      self._webhook_routes)
                    self._batch_due = True  # a failed or cancelled validation is finalized next
                    self.metrics.validation.observe(time.monotonic() - started)
                    log.info("batch %s validated: %s", task.batch.id, entered or "moved on meanwhile")
                else:
                    deliveries = self._delivery_lease(task.batch.owner, task.final_status)
                    entered = task.final_status if await asyncio.to_thread(
                        finalize_batch, task, self.files, self.phases, int(self.clock()),
                        self._webhook_routes, deliveries) else None
                    if entered is not None:
                        self._send_now(deliveries)
                        deliveries, handed = None, True
                    self.metrics.finalize.observe(time.monotonic() - started)
                    log.info("batch %s finalized: %s", task.batch.id, entered or "lease lost")
                if entered is not None and entered in C.TERMINAL_STATES:
                    self.metrics.batch_ended(entered, task.batch.created_at, self.clock())
        except Exception:
            log.exception("%s of batch %s failed; it will be retried", task.kind, task.batch.id)
        finally:
            self._withdraw(deliveries)
            self._batch_tasks -= 1
            if self._batch_leases.get(task.batch.id) == task.lease_token:  # not a later claim's entry
                del self._batch_leases[task.batch.id]
            self._wake.set()
            if not handed:
                self._look_for_webhooks()  # a batch may have ended: its events are due now

    def _delivery_lease(self, owner: str, status: str | None) -> DeliveryLease | None:
        """A lease for the webhook events of `owner`'s batch about to end in `status`, on as many as
        this worker's sender has free slots for (see DeliveryLease), or None. The slots stay offered
        until the transaction returns (`_send_now`, `_withdraw`): batches ending at once are not
        offered the same ones, so a handed delivery starts at once and its lease is a claim's, one
        attempt. Only as many as the batch has events: the others stay free for the next batch."""
        if self.webhooks is None:
            return None
        room = min(self._free_webhook_slots(), self.webhooks.routes.receivers(owner, status))
        if room <= 0:
            return None
        self._offered += room
        return DeliveryLease(new_lease_token(), self.webhooks.lease_seconds, room)

    def _free_webhook_slots(self) -> int:
        return self.webhook_slots - self._delivering - len(self._handed) - self._offered

    def _send_now(self, deliveries: DeliveryLease | None) -> None:
        """Hand the deliveries a finished batch's transaction leased to us to the webhook loop (they
        take the slots offered for them); events it left due are looked for as usual."""
        if deliveries is None:
            self._look_for_webhooks()
            return
        self._offered -= deliveries.limit
        self._handed.extend(deliveries.claimed)
        if deliveries.left_due:
            self._claim_webhooks = True
        self._webhooks_due.set()

    def _withdraw(self, deliveries: DeliveryLease | None) -> None:
        """Give back the slots offered to a transaction that did not end its batch (or failed)."""
        if deliveries is not None:
            self._offered -= deliveries.limit

    def _look_for_webhooks(self) -> None:
        self._claim_webhooks = True
        self._webhooks_due.set()

    @property
    def _webhook_routes(self) -> WebhookRoutes | None:
        return self.webhooks.routes if self.webhooks is not None else None

    @contextlib.asynccontextmanager
    async def _batch_lease(self, batch_id: str, token: str) -> AsyncIterator[None]:
        """Keep a batch-level lease alive while its task runs."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(self.settings.lease_seconds / 3)
                try:
                    held = await self._in_lease_thread(
                        self.queue.extend_batch_lease, batch_id, token, self.settings.lease_seconds)
                except Exception:
                    # A dropped connection, a locked database: the lease has two more tries before
                    # it runs out. A keeper that died here let every long finalize lose its lease.
                    log.warning("extending the lease of batch %s failed; trying again", batch_id, exc_info=True)
                    continue
                if not held:
                    log.warning("the lease of batch %s was lost; its task's work will not be kept", batch_id)
                    return

        keeper = asyncio.create_task(keep())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    # -- leases and housekeeping ----------------------------------------------------------

    @property
    def heartbeat_seconds(self) -> float:
        return min(self.settings.lease_seconds / 3, 1.0)

    async def _update_shares(self) -> None:
        """Take this worker's share of every shared upstream budget (worker/budget.py)."""
        if self.membership is None:
            return
        try:
            rank, count, age = await asyncio.wait_for(self._in_lease_thread(
                self.membership.standing, self.worker_id, self.settings.lease_seconds
            ), self.settings.lease_seconds / 2)
        except Exception:
            log.exception("membership heartbeat failed")
            self._standing.unknown(self.router.engines())
            return
        self._standing.learned(self.router.engines(), rank, count, age, settle_seconds=2.5 * self.heartbeat_seconds)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heartbeat_due.wait(), self.heartbeat_seconds)
            self._heartbeat_due.clear()
            await self._update_shares()
            await self.heartbeat()
            self._publish_metrics()

    def _publish_metrics(self) -> None:
        """The engines' counts since the last heartbeat, to Prometheus (cheap: a few adds per engine)."""
        try:
            self.metrics.publish_engines(self.router.engines())
        except Exception:  # metrics must never stop the heartbeat that keeps leases alive
            log.exception("publishing engine metrics failed")

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
        try:
            lost, stopped = await self._in_lease_thread(
                self.queue.heartbeat_shards, held, self.settings.lease_seconds
            )
        except Exception:
            log.exception("heartbeat failed")
            return
        if lost:
            self.metrics.leases_lost.inc(len(lost))
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
            if self.webhooks is not None:
                try:
                    await asyncio.to_thread(self.webhooks.prune)
                except Exception:
                    log.exception("pruning webhook deliveries failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.janitor_seconds)

    async def _webhook_loop(self, sender: WebhookSender, stop: asyncio.Event) -> None:
        """Deliver due webhook events, at most `webhook_slots` at a time, each on a thread of the
        loop's own pool (a receiver that hangs until the timeout must not hold the shared pool
        that file reads and writes use). A batch that ends in this worker leases its events to it
        in the transaction that ends it (`_send_now`): they are sent without a claim. Looks for
        due ones when a batch ended without handing them all over, when an attempt fails (a retry
        may be due soon) or frees a slot of a full set, or every `webhook_poll_seconds`. (Looking
        after every delivered attempt too cost a claim transaction per batch that found nothing.)"""
        pool = ThreadPoolExecutor(self.webhook_slots, thread_name_prefix="overnight-webhooks")
        loop = asyncio.get_running_loop()
        sending: set[asyncio.Future[bool]] = set()

        def attempt_done(future: asyncio.Future[bool]) -> None:
            slots_were_full = len(sending) >= self.webhook_slots
            sending.discard(future)
            self._delivering = len(sending)
            if future.cancelled():
                return
            if future.exception() is not None:
                log.error("webhook delivery failed", exc_info=future.exception())
            if slots_were_full or future.exception() is not None or not future.result():
                self._look_for_webhooks()

        def send(deliveries: Iterable[ClaimedDelivery]) -> None:
            for delivery in deliveries:
                future = loop.run_in_executor(pool, sender.deliver, delivery)
                sending.add(future)
                future.add_done_callback(attempt_done)
            self._delivering = len(sending)

        try:
            while not stop.is_set():
                self._webhooks_due.clear()
                handed, self._handed = self._handed, deque()
                send(handed)  # leased to us by the transaction that ended their batch
                free = self._free_webhook_slots()
                claimed = []
                if free > 0 and self._claim_webhooks:
                    self._claim_webhooks = False
                    try:
                        claimed = await asyncio.to_thread(sender.claim, free)
                    except Exception:
                        self._claim_webhooks = True
                        log.exception("claiming webhook deliveries failed; trying again")
                send(claimed)
                if claimed and len(claimed) == free:
                    self._claim_webhooks = True
                    continue  # there may be more due
                try:
                    await asyncio.wait_for(self._webhooks_due.wait(), self.webhook_poll_seconds)
                except TimeoutError:
                    self._claim_webhooks = True  # retries come due with time
        finally:
            # Attempts in flight finish in their threads; one cut short is due again after its lease.
            pool.shutdown(wait=False, cancel_futures=True)

    def collect_garbage(self, orphan_age: float = ORPHAN_AGE_SECONDS) -> int:
        """Remove bytes nothing needs any more (batches/housekeeping.py says what); an orphan goes
        once two passes a janitor interval apart found it unnamed."""
        return collect_garbage(self.catalog, self.files, self.clock(), orphan_age, self._orphan_sightings)
