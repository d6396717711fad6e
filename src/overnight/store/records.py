"""Plain values that cross the store boundary, so no layer above sees SQLAlchemy rows."""

from __future__ import annotations

from collections.abc import Sequence
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
    # What validation on upload found (batches/upload_check.py, as JSON); only read by batches.create.
    upload_check: str | None = None


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
    # A finished batch's {"completed", "failed", "errors_by_code"} (None before finalize).
    outcome: dict[str, Any] | None = None
    retry_of: str | None = None  # the batch whose failed lines this one re-runs
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
    error_codes: dict[str, int] = field(default_factory=dict)  # the error lines' codes, counted

    def add_error(self, code: str) -> None:
        """Count one line for the error file, by its error code (an upstream's free text)."""
        self.failed += 1
        code = storable(code)
        self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def note_model(self, model: str) -> None:
        """The model that answered, from the first answer that names one (an upstream's text)."""
        if self.model is None:
            self.model = storable(model)

    def add_usage(self, usage: dict[str, Any]) -> None:
        """Add one response's `usage` to the totals: chat/completions/embeddings shape (`prompt_tokens`,
        `completion_tokens`) or Responses shape (`input_tokens`, `output_tokens`)."""
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


def storable(text: str, limit: int = 256) -> str:
    """An upstream's text as the database keeps it: at most `limit` characters, and lone
    surrogates (JSON may escape them, UTF-8 cannot hold them) written as backslash escapes. One
    `"\ud800"` in an error code failed the commit of its whole shard, twice, and so every line."""
    text = text[:limit]
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _count(value: Any) -> int:
    """A token count as an upstream wrote it. What is not a whole number counts 0: the answer is
    the line's result as sent, and a malformed `usage` must not turn it into an error line."""
    if type(value) is int:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdecimal():  # what int() reads without raising
        return int(value)
    return 0


@dataclass(frozen=True, slots=True)
class ClaimedShard:
    shard_id: int
    lease_token: str
    attempt: int  # claims so far, this one included (each writes its own results object)
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
    handed_back: int = 0  # earlier claims handed back unfinished: not failures

    @property
    def failed_attempts(self) -> int:
        """Earlier claims that ended without a commit or a hand-back (their worker died)."""
        return self.attempt - 1 - self.handed_back
    request_id: str | None = None  # of the API call that created its batch (for logs)
    # Of its batch, for publishing the output file with the commit when this is its only shard:
    owner: str = ""
    batch_requests: int = 0
    output_expires_after: int | None = None
    batch_created_at: int = 0

    @property
    def whole_batch(self) -> bool:
        return self.first_request == 0 and self.request_count == self.batch_requests


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
    error_codes: str | None = None  # JSON {code: count} of its error lines (None: committed before 0008)
    completed: int = 0  # of a committed shard: its output lines
    failed: int = 0  # and its error lines


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
class UploadRecord:
    """An Upload as stored; `status` is the stored one (a pending upload past `expires_at` is expired)."""

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    created_at: int
    expires_at: int
    status: str
    file_expires_after: int | None = None
    file_id: str | None = None


@dataclass(frozen=True, slots=True)
class UploadPartRecord:
    id: str
    upload_id: str
    bytes: int
    created_at: int
    storage_key: str


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event for one endpoint, to be stored with the terminal state that caused it."""

    event_id: str
    event_type: str
    owner: str
    batch_id: str
    endpoint_id: str
    url: str
    payload: str  # the exact JSON body every attempt sends
    created_at: int


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery leased to one sender: settling it names `lease_token`."""

    id: int
    event_id: str
    endpoint_id: str
    url: str
    payload: str
    attempts: int  # including this one
    lease_token: str


@dataclass(slots=True)
class DeliveryLease:
    """Asks the transaction that queues a batch's webhook events to lease up to `limit` of them to
    `token` as it inserts them, for a sender with that many free slots in this process: the
    claim transaction that would otherwise find them is saved. The leased ones are appended to
    `claimed` once the transaction commits; the rest are due for any sender as usual."""

    token: str
    seconds: float
    limit: int
    claimed: list[ClaimedDelivery] = field(default_factory=list)
    left_due: int = 0  # events queued but not leased here


@dataclass(frozen=True, slots=True)
class WholeOutput:
    """A batch's only shard publishing its results object (written where `output_file`'s bytes
    live) as the output file in the transaction that commits the shard: the batch completes there,
    without a finalize step. Only for a shard whose lines are all output lines; `lines` of them."""

    output_file: FileRecord
    lines: int
    events: Sequence[WebhookEvent]
    deliveries: DeliveryLease | None = None


@dataclass(frozen=True, slots=True)
class ModelQueue:
    """Unfinished batches of one model (None: a batch not validated yet) and their unanswered requests."""

    model: str | None
    batches: int
    waiting_requests: int


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """A worker process's row: when it started and was last seen (the database's clock, epoch
    seconds), and how many seconds ago that was."""

    id: str
    started_at: float
    last_seen: float
    seen_seconds_ago: float


@dataclass(frozen=True, slots=True)
class ShardSpan:
    """A shard attempt, for a batch's progress estimate: claimed at `started_at`, committed at
    `finished_at` (None: still running, `done` lines as of its last heartbeat)."""

    started_at: float
    finished_at: float | None
    done: int
