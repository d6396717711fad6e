"""What the batch domain needs of the metadata store, named after its uses. The SQL adapters in
`overnight.store` implement them; `wiring` passes them in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from overnight.store.records import BatchRecord, FileRecord, ShardPlan, ShardSpan


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

    def insert_batch(self, record: BatchRecord) -> None: ...

    def get_batch(self, owner: str | None, batch_id: str) -> BatchRecord | None: ...

    def list_batches(
        self, owner: str | None, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool] | None: ...

    def request_cancel(self, owner: str | None, batch_id: str, now: int) -> BatchRecord | None:
        """Move the batch towards cancelled; the batch as it is afterwards (None: no such batch)."""
        ...


class BatchPhases(Protocol):
    """Writes that end a batch's phase, each fenced by the batch lease `token` (False: the lease
    was lost or the batch moved on, and nothing was written)."""

    def start_batch(self, batch_id: str, token: str, plans: Sequence[ShardPlan], total: int, now: int) -> bool:
        """validating -> in_progress, with its shards."""
        ...

    def fail_batch(self, batch_id: str, token: str, errors: list[dict[str, Any]], now: int) -> bool:
        """validating -> failed, with the validation errors."""
        ...

    def finish_batch(
        self, batch_id: str, token: str, final_status: str, output_file: FileRecord | None,
        error_file: FileRecord | None, completed: int, failed: int, now: int,
    ) -> bool:
        """Publish the output and error files and enter the terminal state, in one transaction."""
        ...

    def release_batch_lease(self, batch_id: str, token: str) -> None: ...


class StorageCatalog(Protocol):
    """What housekeeping asks: which files are gone, which stored objects rows still name."""

    def collect_garbage(self, now: int) -> list[str]:
        """Drop rows of deleted or expired files no active batch reads; their storage keys."""
        ...

    def live_storage_keys(self, keys: Sequence[str]) -> set[str]: ...

    def batch_status(self, batch_id: str) -> str | None: ...


class QueueGauges(Protocol):
    """What a metrics scrape reads from the store (so it holds for workers on any machine)."""

    def queued_lines_by_model(self) -> dict[str, int]: ...

    def open_batches_by_status(self) -> dict[str, int]: ...


class ProgressReader(Protocol):
    """What a batch's throughput and ETA are computed from (batches/progress.py)."""

    def recent_spans(self, batch_ids: list[str], window_seconds: float) -> tuple[float, dict[str, list[ShardSpan]]]:
        """(the store's clock now, each batch's shard attempts running or committed in the window)."""
        ...
