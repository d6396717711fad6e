"""The batch-level phases a worker runs under a batch lease: validate (validating -> in_progress
with its shards, or -> failed) and finalize (see finalize.py). Synchronous: the worker runs them
in a thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from overnight import constants as C
from overnight.batches.finalize import finalize_batch
from overnight.batches.ports import BatchPhases
from overnight.batches.validation import ShardLinesFor, validate_input
from overnight.batches.webhooks import WebhookRoutes
from overnight.files.port import FileStore
from overnight.settings import Limits
from overnight.store.records import BatchTask

__all__ = ["finalize_batch", "validate_batch"]


def validate_batch(
    task: BatchTask, files: FileStore, phases: BatchPhases, shard_lines_for: ShardLinesFor, limits: Limits,
    clock: Callable[[], float], webhooks: WebhookRoutes | None = None,
) -> str | None:
    """Validate the input file in one streaming pass and move the batch on, fenced by the lease
    (to `failed` with its `batch.failed` webhook events in the same write). Returns the state the
    batch entered (in_progress or failed), None when it had moved on."""
    batch = task.batch

    def fail(errors: list[dict[str, Any]]) -> bool:
        now = int(clock())
        events = webhooks.events_for(batch.owner, batch.id, C.FAILED, now) if webhooks else []
        return phases.fail_batch(batch.id, task.lease_token, errors, now, events)

    key = task.input_storage_key
    if key is None or not files.exists(key):
        error = {
            "code": "invalid_request",
            "message": f"Cannot find file {batch.input_file_id}: it was deleted or expired before validation.",
            "param": "input_file_id",
            "line": None,
        }
        return C.FAILED if fail([error]) else None
    report = validate_input(
        lambda: files.iter_chunks(key), batch.endpoint, lambda model: shard_lines_for(model, batch.endpoint), limits
    )
    if report.ok:
        moved = phases.start_batch(batch.id, task.lease_token, report.plans, report.total, int(clock()))
    else:
        moved = fail(report.errors)
    if not moved:  # cancelled while validating: hand the batch to finalize at once
        phases.release_batch_lease(batch.id, task.lease_token)
        return None
    return C.IN_PROGRESS if report.ok else C.FAILED
