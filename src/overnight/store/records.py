"""Plain values that cross the store boundary, so no layer above sees SQLAlchemy rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None
    storage_key: str


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int | None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    output_expires_after: int | None = None
    request_total: int = 0
    request_completed: int = 0
    request_failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    lease_token: str | None = None
    request_id: str | None = None  # of the API call that created it (for logs)
    # Computed when an in-progress batch is read (batches/progress.py), never stored.
    throughput: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """A contiguous run of requests recorded by validation."""

    shard_index: int
    first_request: int
    request_count: int
    byte_offset: int
    byte_length: int


@dataclass(slots=True)
class ShardResult:
    """What a worker commits for a shard: where its result lines are and what they add up to."""

    result_key: str
    output_bytes: int = 0  # length of the output section; the error section follows it
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    expired: int = 0  # of `failed`: lines not run because the completion window closed

    def add_usage(self, usage: dict[str, Any]) -> None:
        """Add one response's `usage` (chat/completions or embeddings shape) to the totals."""
        get = usage.get
        prompt = get("prompt_tokens")
        self.input_tokens += _count(get("input_tokens") if prompt is None else prompt)
        completion = get("completion_tokens")
        self.output_tokens += _count(get("output_tokens") if completion is None else completion)
        details = get("prompt_tokens_details") or get("input_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens += _count(details.get("cached_tokens"))
        details = get("completion_tokens_details") or get("output_tokens_details")
        if isinstance(details, dict):
            self.reasoning_tokens += _count(details.get("reasoning_tokens"))


def _count(value: Any) -> int:
    return value if type(value) is int else int(value or 0)


@dataclass(frozen=True, slots=True)
class ClaimedShard:
    shard_id: int
    lease_token: str
    attempt: int
    batch_id: str
    shard_index: int
    first_request: int
    request_count: int
    byte_offset: int
    byte_length: int
    endpoint: str
    expires_at: int | None
    input_storage_key: str
    last_error: str | None = None  # why the previous attempt failed, if it did
    request_id: str | None = None  # of the API call that created its batch (for logs)


@dataclass(frozen=True, slots=True)
class ShardProgress:
    """What a heartbeat reports for a shard it holds."""

    shard_id: int
    lease_token: str
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class SettledShard:
    """A shard as finalize sees it: committed results, or a byte range of lines that never ran."""

    shard_index: int
    status: str
    result_key: str | None
    result_output_bytes: int | None  # None: written before results had sections (tagged lines)
    first_request: int
    request_count: int
    byte_offset: int
    byte_length: int
    expired: int = 0  # lines the shard reported as not run before the deadline
    last_error: str | None = None  # for a `failed` shard: what its lines are reported with


@dataclass(frozen=True, slots=True)
class BatchTask:
    """Batch-level work a worker claimed: `validate`, or `finalize` towards `final_status`."""

    kind: str
    batch: BatchRecord
    lease_token: str
    final_status: str | None = None
    input_storage_key: str | None = None
    shards: list[SettledShard] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ShardSpan:
    """A shard attempt, for a batch's progress estimate: claimed at `started_at`, committed at
    `finished_at` (None: still running, `done` lines as of its last heartbeat)."""

    started_at: float
    finished_at: float | None
    done: int
