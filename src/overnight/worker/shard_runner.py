"""Runs one claimed shard: read its byte range, send its lines through the engines, write one
results object, commit it fenced by the lease. Lines run at least once; a shard whose lease was
lost is not committed (whoever holds it now commits instead), so each line is reported once.

A results object is the shard's output lines (2xx responses) in input order, then its error lines
(everything else); the commit records where the output section ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import orjson

from overnight import constants as C
from overnight.batches.endpoints import routing_model
from overnight.batches.finalize import publish_with_commit
from overnight.batches.jsonl import split_requests
from overnight.batches.request_line import loads_line, parse_request_line, with_model
from overnight.batches.results import error_line, response_error_code, response_line
from overnight.batches.webhooks import WebhookRoutes
from overnight.engines.port import Engine, EngineRequest, EngineResponse, RawBodyEngine
from overnight.engines.router import Resolved, Router
from overnight.files.layout import file_key, results_key
from overnight.files.port import FileStore
from overnight.ids import line_id_prefix, line_request_id_prefix, new_file_id, new_lease_token
from overnight.observability.metrics import WorkerMetrics
from overnight.store.records import BatchTask, ClaimedShard, DeliveryLease, ShardResult
from overnight.worker.lanes import EngineLane, Lanes
from overnight.worker.ports import WorkQueue

log = logging.getLogger("overnight.worker")


@dataclass(slots=True)
class ShardState:
    """Shared between a running shard and the heartbeat: flags it raises, progress it reports."""

    lease_lost: bool = False
    batch_stopped: bool = False  # cancelled (or otherwise no longer in progress): send no more lines
    result: ShardResult | None = None
    queued: bool = False  # its lines are in the lanes' queues
    finalize: BatchTask | None = None  # the commit made the batch ready and leased it to us
    # Sender slots offered to the commit for its batch's webhooks (the worker settles the offer
    # whatever the outcome); when it completed the batch, `claimed` holds the deliveries leased to us.
    deliveries: DeliveryLease | None = None
    # The token of the finalize lease its commit may take, and whether the worker is stopping: a
    # lease taken while it stops is handed back (the commit's thread, or the worker's stop, does).
    finalize_token: str | None = None
    worker_stopping: bool = False

    def stopped(self) -> bool:
        """Whether to send no more of its lines (asked again by an engine after a long wait)."""
        return self.batch_stopped or self.lease_lost


class ShardRunner:
    def __init__(
        self,
        queue: WorkQueue,
        files: FileStore,
        router: Router,
        lanes: Lanes,
        clock: Callable[[], float] = time.time,
        metrics: WorkerMetrics | None = None,
        finalize_lease_seconds: float = 30.0,
        webhooks: WebhookRoutes | None = None,
        delivery_lease: Callable[[str, str | None], DeliveryLease | None] = lambda owner, status: None,
    ) -> None:
        self.queue = queue
        self.webhooks = webhooks
        self.delivery_lease = delivery_lease  # asked on the event loop, before a commit that may publish
        self.finalize_lease_seconds = finalize_lease_seconds
        self.metrics = metrics or WorkerMetrics()
        self.files = files
        self.router = router
        self.lanes = lanes
        self.clock = clock
        self._raw_body_engines: dict[int, bool] = {}  # id(engine) -> sends_raw_body (a few engines)

    async def run(self, claim: ClaimedShard, state: ShardState) -> str:
        """Run and commit the shard: `committed`, `batch_ready` (its batch can finalize), `finished`
        (the commit completed the batch: see `publish_with_commit`) or `lost`."""
        data = await asyncio.to_thread(
            self.files.read_range, claim.input_storage_key, claim.byte_offset, claim.byte_length
        )
        run = _ShardRun(self, claim, state, [_request_of(raw, claim.endpoint) for raw in split_requests(data)])
        del data
        by_lane: dict[int, tuple[EngineLane | None, list[tuple[_ShardRun, int]]]] = {}
        for i, (_, model, _) in enumerate(run.requests):
            resolved = self.router.resolve(model, claim.endpoint)
            run.resolved.append(resolved)
            lane = self.lanes.for_engine(resolved.engine) if resolved is not None else None
            by_lane.setdefault(id(lane), (lane, []))[1].append((run, i))
        for lane, jobs in by_lane.values():
            if lane is not None:
                lane.submit(jobs)
        state.queued = True
        for lane, jobs in by_lane.values():
            if lane is None:  # no engine serves the model any more: these lines are answered at once
                for _, i in jobs:
                    await run.run_line(i)
        await run.finished()
        if state.lease_lost:
            log.warning("shard %s of %s: lease lost while running; not committed", claim.shard_index, claim.batch_id)
            return "lost"
        whole = claim.whole_batch and not run.failed_at  # the commit may complete the batch
        deliveries = self.delivery_lease(claim.owner, C.COMPLETED) if whole else None
        state.deliveries = deliveries
        state.finalize_token = new_lease_token()
        outcome = await asyncio.to_thread(self._write_and_commit, run, deliveries, state)
        if isinstance(outcome, BatchTask):
            state.finalize = outcome
            outcome = "batch_ready"
        if outcome == "lost":  # fenced: someone else holds (or finished) the shard
            log.warning("shard %s of %s: commit refused, the lease was taken over", claim.shard_index,
                        claim.batch_id)
            self.metrics.leases_lost.inc()
        else:  # lines are counted once, when they are committed (one call per shard, not per line)
            self.metrics.shard_committed(claim.endpoint, run.result.completed, run.failures)
        if outcome == "finished":
            self.metrics.batch_ended(C.COMPLETED, claim.batch_created_at, self.clock())
            log.info("batch %s finalized: completed (published by its only shard's commit)", claim.batch_id)
        return outcome

    def _write_and_commit(
        self, run: _ShardRun, deliveries: DeliveryLease | None, state: ShardState
    ) -> Literal["lost", "committed", "batch_ready", "finished"] | BatchTask:
        """On a thread: write the results object and commit it. A shard holding its whole batch
        without error lines also publishes the output file in the commit (see `publish_with_commit`)."""
        self._write_results(run)
        claim, result = run.claim, run.result
        now = int(self.clock())
        publish = publish_with_commit(claim, result, run.output_file_id, now, self.webhooks, deliveries) \
            if run.output_file_id else None
        token = state.finalize_token
        assert token is not None
        outcome = self.queue.commit_shard(claim.shard_id, claim.lease_token, claim.batch_id, result, now,
                                          (token, self.finalize_lease_seconds), publish)
        if outcome == "lost":
            self.files.delete(result.result_key)
        if isinstance(outcome, BatchTask) and state.worker_stopping:  # nobody here will finalize it
            self.queue.release_batch_lease(claim.batch_id, token)
            return "batch_ready"
        return outcome

    def sends_raw_body(self, engine: Engine) -> bool:
        known = self._raw_body_engines.get(id(engine))
        if known is None:
            known = self._raw_body_engines[id(engine)] = isinstance(engine, RawBodyEngine) and engine.sends_raw_body
        return known

    def _write_results(self, run: _ShardRun) -> None:
        lines, failed = run.lines, run.failed_at
        if failed:
            failed_set = set(failed)
            output = [line for i, line in enumerate(lines) if i not in failed_set]
            errors = [lines[i] for i in sorted(failed)]
        else:
            output, errors = lines, []
        output_section = b"\n".join(output) + b"\n" if output else b""
        with self.files.writer(run.result.result_key) as out:
            out.write(output_section)
            if errors:
                out.write(b"\n".join(errors) + b"\n")
        run.result.output_bytes = len(output_section)


class _ShardRun:
    """One attempt at a shard: its parsed lines, their results so far, and when they are all in."""

    def __init__(self, runner: ShardRunner, claim: ClaimedShard, state: ShardState,
                 requests: list[_Request]) -> None:
        self.runner = runner
        self.claim = claim
        self.state = state
        self.stopped = state.stopped  # bound once: the engine gets it with every line
        self.requests = requests
        self.resolved: list[Resolved | None] = []
        self.lines: list[bytes] = [b""] * len(requests)
        # Failed lines by a bounded label, for the metrics: overnight's own codes, or http_<status>
        # for an upstream's answer (its error.code, which the batch's outcome counts, is the
        # upstream's free text: no metric label).
        self.failures: dict[str, int] = {}
        self.custom_ids: list[str] = [""] * len(requests)  # filled as lines start: for error lines
        self.failed_at: list[int] = []  # indexes of lines that go to the error file
        self.id_prefix = line_id_prefix(claim.batch_id)
        self.request_id_prefix = line_request_id_prefix(claim.batch_id)
        # A shard holding its whole batch writes its results where the batch's output file will
        # live: without error lines, its commit publishes them as that file (no copy).
        self.output_file_id = new_file_id() if claim.whole_batch else ""
        self.result = state.result = ShardResult(
            result_key=file_key(self.output_file_id) if self.output_file_id
            else results_key(claim.batch_id, claim.shard_index, claim.attempt)
        )
        self.deadline = float(claim.expires_at) if claim.expires_at is not None else float("inf")
        self.remaining = len(requests)
        self.failure: BaseException | None = None
        self._done = asyncio.Event()

    async def finished(self) -> None:
        if self.remaining:
            await self._done.wait()
        if self.failure is not None:
            raise self.failure

    async def run_line(self, i: int) -> None:
        """Called by a lane's sender; never raises (a sender must not die)."""
        try:
            if self.failure is None:
                line, ok = await self._execute(i)
                self.lines[i] = line
                if not ok:
                    self.failed_at.append(i)
        except Exception as exc:
            # Whatever one line raises is that line's error. Retrying the shard instead would
            # re-send every other line, and a line that always raises would loop the batch.
            try:
                self.lines[i] = self._line_failed(i, exc)
                self.failed_at.append(i)
            except Exception as inner:  # cannot even report it (no custom_id?): the shard fails
                self.failure = inner
        self.remaining -= 1
        if self.remaining == 0 or self.failure is not None:
            self._done.set()

    def _fail(self, code: str, metric_label: str | None = None) -> None:
        self.result.add_error(code)
        label = metric_label or code
        self.failures[label] = self.failures.get(label, 0) + 1

    def _line_failed(self, i: int, exc: Exception) -> bytes:
        self._fail(C.ENGINE_ERROR)
        log.warning("line %s of batch %s raised %s", self.claim.first_request + i, self.claim.batch_id,
                    type(exc).__name__, exc_info=exc)
        return error_line(
            f"{self.id_prefix}{self.claim.first_request + i:08x}",
            self.custom_ids[i],
            C.ENGINE_ERROR,
            f"overnight could not run this request ({type(exc).__name__}: {str(exc)[:500]}).",
        )

    async def _execute(self, i: int) -> tuple[bytes, bool]:
        """The line's result line, and whether it belongs in the output file (else the error file)."""
        claim, state, result = self.claim, self.state, self.result
        custom_id, model, body_bytes = self.requests[i]
        self.requests[i] = _DONE  # drop the body as soon as it is sent
        index = claim.first_request + i
        self.custom_ids[i] = custom_id
        ident = f"{self.id_prefix}{index:08x}"
        if state.stopped():
            self._fail(C.BATCH_CANCELLED)
            return error_line(ident, custom_id, C.BATCH_CANCELLED), False
        if self.runner.clock() >= self.deadline:
            self._fail(C.BATCH_EXPIRED)
            result.expired += 1
            return error_line(ident, custom_id, C.BATCH_EXPIRED), False
        resolved = self.resolved[i]
        if resolved is None:  # the routes changed since validation (a restart with other settings)
            response = EngineResponse.http_error(
                404, f"The model '{model}' is not served by this server.",
                code="model_not_found",
                param="model",
            )
        else:
            engine = resolved.engine
            # Only an alias changes the body; a line without a model (moderations) goes as written.
            if resolved.model != model:
                body = loads_line(body_bytes)  # as validation read it: 1e400 too
                body_bytes = with_model(body_bytes, body, resolved.model)
                body = {**body, "model": resolved.model}
            elif self.runner.sends_raw_body(engine):
                body = {}  # not read: the engine sends body_bytes
            else:
                body = loads_line(body_bytes)
            response = await engine.execute(
                EngineRequest(claim.endpoint, body, self.deadline, body_bytes, stopped=self.stopped)
            )
        if response.status_code is None:
            code = response.error_code or C.ENGINE_ERROR
            self._fail(code)
            if code == C.BATCH_EXPIRED:
                result.expired += 1
            return error_line(ident, custom_id, code, response.error_message), False
        request_id = response.request_id or f"{self.request_id_prefix}{index:08x}"
        line = response_line(ident, custom_id, response.status_code, request_id, response.body, response.raw)
        if response.ok:
            result.completed += 1
            body_out = response.body or {}
            usage = body_out.get("usage")
            if isinstance(usage, dict):
                result.add_usage(usage)
            if result.model is None and isinstance(body_out.get("model"), str):
                result.note_model(body_out["model"])
            return line, True
        self._fail(response_error_code(response.status_code, response.body), f"http_{response.status_code}")
        return line, False


# A line as the worker keeps it until it is sent: custom_id, the model it routes by, the body's
# exact bytes. Strings and bytes only: the parsed line is dropped at once, so thousands of nested
# dicts are not held (and scanned by the garbage collector) for the life of a shard.
_Request = tuple[str, str, bytes]
_DONE: _Request = ("", "", b"")


def _request_of(raw: bytes, endpoint: str) -> _Request:
    request, body_bytes = parse_request_line(raw)
    body = request["body"]
    # Validation guarantees a `body` object, so its bytes are found; re-serializing is a fallback.
    return request["custom_id"], routing_model(endpoint, body), body_bytes or orjson.dumps(body)
