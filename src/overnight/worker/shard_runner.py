"""Runs one claimed shard: read its byte range, send its lines through the engines, write one
results object, commit it fenced by the lease. Lines run at least once; a shard whose lease was
lost is not committed (whoever holds it now commits instead), so each line is reported once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from overnight import constants as C
from overnight.batches.jsonl import split_requests
from overnight.batches.results import ERROR_TAG, OUTPUT_TAG, error_line, response_line
from overnight.engines.port import EngineRequest, EngineResponse
from overnight.engines.router import Router
from overnight.files.port import FileStore
from overnight.ids import line_id, line_request_id
from overnight.store.metadata import MetadataStore
from overnight.store.records import ClaimedShard, ShardResult


@dataclass(slots=True)
class ShardState:
    """Shared between a running shard and the heartbeat: flags it raises, progress it reports."""

    lease_lost: bool = False
    batch_stopped: bool = False  # cancelled (or otherwise no longer in progress): send no more lines
    result: ShardResult | None = None


class ShardRunner:
    def __init__(
        self,
        store: MetadataStore,
        files: FileStore,
        router: Router,
        senders: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.files = files
        self.router = router
        self.senders = senders
        self.clock = clock

    async def run(self, claim: ClaimedShard, state: ShardState) -> str:
        """Run and commit the shard: `committed`, `batch_ready` (its batch can finalize) or `lost`."""
        data = await asyncio.to_thread(
            self.files.read_range, claim.input_storage_key, claim.byte_offset, claim.byte_length
        )
        requests = split_requests(data)
        del data
        lines: list[bytes] = [b""] * len(requests)
        result = ShardResult(result_key=f"results/{claim.batch_id}/{claim.shard_index:07d}.{claim.attempt}.jsonl")
        state.result = result
        deadline = float(claim.expires_at) if claim.expires_at is not None else float("inf")
        pending = iter(enumerate(requests))

        async def sender() -> None:
            for i, raw in pending:
                lines[i] = await self._run_line(claim, claim.first_request + i, raw, deadline, state, result)

        await asyncio.gather(*(sender() for _ in range(min(self.senders, len(requests)))))
        if state.lease_lost:
            return "lost"
        await asyncio.to_thread(self._write_results, result.result_key, lines)
        outcome = await asyncio.to_thread(
            self.store.commit_shard, claim.shard_id, claim.lease_token, claim.batch_id, result, int(self.clock())
        )
        if outcome == "lost":
            await asyncio.to_thread(self.files.delete, result.result_key)
        return outcome

    async def _run_line(
        self,
        claim: ClaimedShard,
        index: int,
        raw: bytes,
        deadline: float,
        state: ShardState,
        result: ShardResult,
    ) -> bytes:
        request = orjson.loads(raw)
        custom_id: str = request["custom_id"]
        body = request["body"]
        ident = line_id(claim.batch_id, index)
        if state.batch_stopped or state.lease_lost:
            result.failed += 1
            return ERROR_TAG + error_line(ident, custom_id, C.BATCH_CANCELLED)
        if self.clock() >= deadline:
            result.failed += 1
            return ERROR_TAG + error_line(ident, custom_id, C.BATCH_EXPIRED)
        resolved = self.router.resolve(body.get("model", ""), claim.endpoint)
        if resolved is None:  # the routes changed since validation (a restart with other settings)
            response = EngineResponse.http_error(
                404, f"The model '{body.get('model')}' is not served by this server.", code="model_not_found",
                param="model",
            )
        else:
            if resolved.model != body.get("model"):
                body = {**body, "model": resolved.model}
            response = await resolved.engine.execute(EngineRequest(claim.endpoint, body, deadline))
        if response.status_code is None:
            result.failed += 1
            return ERROR_TAG + error_line(ident, custom_id, response.error_code or "engine_error", response.error_message)
        request_id = response.request_id or line_request_id(claim.batch_id, index)
        line = response_line(ident, custom_id, response.status_code, request_id, response.body)
        if response.ok:
            result.completed += 1
            body_out = response.body or {}
            usage = body_out.get("usage")
            if isinstance(usage, dict):
                result.add_usage(usage)
            if result.model is None and isinstance(body_out.get("model"), str):
                result.model = body_out["model"]
            return OUTPUT_TAG + line
        result.failed += 1
        return ERROR_TAG + line

    def _write_results(self, key: str, lines: list[bytes]) -> None:
        with self.files.writer(key) as out:
            out.write(b"\n".join(lines) + b"\n")
