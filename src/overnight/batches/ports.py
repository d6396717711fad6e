"""What the batch domain needs of the metadata store, named after its uses. The SQL adapters in
`overnight.store` implement them; `wiring` passes them in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from overnight.store.records import (
    BatchRecord,
    ClaimedDelivery,
    DeliveryLease,
    FileRecord,
    ModelQueue,
    SettledShard,
    ShardPlan,
    ShardSpan,
    UploadPartRecord,
    UploadRecord,
    WebhookEvent,
    WorkerSeen,
)


class FileCatalog(Protocol):
    """File records; their bytes live in the file store under `storage_key`."""

    def insert_file(self, record: FileRecord) -> None: ...

    def get_file(self, owner: str | None, file_id: str, now: int) -> FileRecord | None:
        """A visible (not deleted, not expired) file of `owner` (None: any owner)."""
        ...

    def list_files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, order: str, now: int
    ) -> tuple[list[FileRecord], bool] | None:
        """A page and whether more follow; None when the `after` cursor is unknown."""
        ...

    def delete_file(self, owner: str | None, file_id: str, now: int) -> bool: ...


class BatchCatalog(Protocol):
    """Batches as the API creates, reads and cancels them."""

    def insert_batch(self, record: BatchRecord, plans: Sequence[ShardPlan] = ()) -> None:
        """`plans`: the shards of a batch created in_progress, in the same transaction."""

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None: ...

    def list_batches(
        self, owner: str | None, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool] | None: ...

    def request_cancel(self, owner: str | None, batch_id: str, now: int) -> BatchRecord | None:
        """Move the batch towards cancelled; the batch as it is afterwards (None: no such batch)."""
        ...


class ResultsCatalog(Protocol):
    """Committed shards (results while running) and the retries of a batch."""

    def shards_after(self, batch_id: str, after: int) -> list[SettledShard]:
        """The batch's shards holding lines at input index `after` or later, in input order."""
        ...

    def retries_of(self, owner: str, batch_id: str) -> list[tuple[int, BatchRecord]]:
        """The batches created by retrying `batch_id` (at most MAX_RETRIES_LISTED), newest first,
        each with its place in the order all batches were created."""
        ...


class BatchPhases(Protocol):
    """Writes that end a batch's phase, each fenced by the batch lease `token` (False: the lease
    was lost or the batch moved on, and nothing was written)."""

    def start_batch(self, batch_id: str, token: str, plans: Sequence[ShardPlan], total: int, now: int) -> bool:
        """validating -> in_progress, with its shards."""
        ...

    def fail_batch(
        self, batch_id: str, token: str, errors: list[dict[str, Any]], now: int, events: Sequence[WebhookEvent] = (),
    ) -> bool:
        """validating -> failed, with the validation errors and the webhook `events` it causes."""
        ...

    def finish_batch(
        self, batch_id: str, token: str, final_status: str, output_file: FileRecord | None,
        error_file: FileRecord | None, completed: int, failed: int, now: int,
        outcome: dict[str, Any] | None = None, events: Sequence[WebhookEvent] = (),
        deliveries: DeliveryLease | None = None,
    ) -> bool:
        """Publish the output and error files, enter the terminal state and queue the webhook
        `events` it causes, in one transaction (leasing them to this process's sender as they are
        queued, with `deliveries`)."""
        ...

    def release_batch_lease(self, batch_id: str, token: str) -> None: ...


class StorageCatalog(Protocol):
    """What housekeeping asks: which files are gone, which stored objects rows still name."""

    def collect_garbage(self, now: int) -> list[str]:
        """Drop rows of deleted or expired files no active batch reads, and the part rows of
        expired uploads; their storage keys."""
        ...

    def live_storage_keys(self, keys: Sequence[str]) -> set[str]: ...

    def batch_status(self, batch_id: str) -> str | None: ...


class ServerOverview(Protocol):
    """What an operator's view of the server reads from the store (the dashboard's server page)."""

    def queue_by_model(self) -> list[ModelQueue]: ...

    def workers(self) -> list[WorkerSeen]: ...


class UploadCatalog(Protocol):
    """Uploads and their parts. Each change is checked against the upload's state in the same
    transaction; the part bytes named by the keys these return are the caller's to delete."""

    def insert_upload(self, record: UploadRecord) -> None: ...

    def get_upload(self, owner: str, upload_id: str) -> UploadRecord | None: ...

    def received_bytes(self, upload_id: str) -> int:
        """The bytes of the parts recorded so far."""
        ...

    def add_part(self, owner: str, part: UploadPartRecord, now: int, max_bytes: int) -> tuple[UploadRecord | None, bool]:
        """Record `part` if its upload is pending and unexpired and its parts stay within
        `max_bytes`: the upload as it was, and whether the part was recorded."""
        ...

    def parts(self, upload_id: str, part_ids: Sequence[str]) -> list[UploadPartRecord]: ...

    def complete_upload(self, owner: str, upload_id: str, file: FileRecord, now: int) -> list[str] | None:
        """Publish `file` and end the upload; its parts' keys (None: it was no longer pending)."""
        ...

    def cancel_upload(self, owner: str, upload_id: str, now: int) -> tuple[UploadRecord | None, list[str]]: ...


class WebhookOutbox(Protocol):
    """Webhook deliveries as senders claim and settle them; each settle is fenced by the claim's
    token (False: the lease ran out and another sender has it)."""

    def claim_deliveries(
        self, limit: int, lease_seconds: float, token: str, now: float | None = None
    ) -> list[ClaimedDelivery]: ...

    def mark_delivered(self, delivery_id: int, token: str, note: str | None = None) -> bool: ...

    def retry_later(self, delivery_id: int, token: str, delay_seconds: float, error: str) -> bool: ...

    def give_up(self, delivery_id: int, token: str, error: str) -> bool: ...

    def prune_settled(self, before: int) -> int:
        """Drop delivered and given-up deliveries of events created before `before`."""
        ...


class QueueGauges(Protocol):
    """What a metrics scrape reads from the store (so it holds for workers on any machine)."""

    def queued_lines_by_model(self) -> dict[str, int]: ...

    def open_batches_by_status(self) -> dict[str, int]: ...


class ProgressReader(Protocol):
    """What a batch's throughput and ETA are computed from (batches/progress.py)."""

    def recent_spans(self, batch_ids: list[str], window_seconds: float) -> tuple[float, dict[str, list[ShardSpan]]]:
        """(the store's clock now, each batch's shard attempts running or committed in the window)."""
        ...
