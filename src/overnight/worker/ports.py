"""What the worker needs of the metadata store: the work queue of claims, leases and heartbeats.
`overnight.store.queue.SqlWorkQueue` implements it (and the batch domain's `BatchPhases`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from overnight import constants as C
from overnight.store.records import BatchTask, ClaimedShard, ShardProgress, ShardResult, WholeOutput


class WorkQueue(Protocol):
    # `now`: None in production (the database's clock decides); a time to move the clock in tests.

    def claim_batch_task(self, now: float | None, lease_seconds: float, token: str) -> BatchTask | None:
        """One batch to validate or finalize whose lease is free, leased to `token`."""
        ...

    def extend_batch_lease(self, batch_id: str, token: str, lease_seconds: float, now: float | None = None) -> bool:
        ...

    def release_batch_lease(self, batch_id: str, token: str) -> None: ...

    def claim_shard(
        self, now: float | None, lease_seconds: float, token: str, horizon_seconds: float = C.DEADLINE_HORIZON_SECONDS
    ) -> ClaimedShard | None:
        """The next runnable shard (pending, or under an expired lease), leased to `token`;
        batches due within `horizon_seconds` first."""
        ...

    def heartbeat_shards(
        self, leases: Sequence[ShardProgress], lease_seconds: float, now: float | None = None
    ) -> tuple[set[int], set[int]]:
        """Extend leases and record progress; (shards whose lease was lost, shards whose batch stopped)."""
        ...

    def release_shards(self, leases: Sequence[tuple[int, str]]) -> None:
        """Hand back shards this worker will not finish (graceful stop): pending again at once."""
        ...

    def commit_shard(
        self, shard_id: int, token: str, batch_id: str, result: ShardResult, now: int,
        finalize_lease: tuple[str, float] | None = None, publish: WholeOutput | None = None,
    ) -> Literal["lost", "committed", "batch_ready", "finished"] | BatchTask:
        """Commit a shard under its lease; with `finalize_lease` (token, seconds), a batch this made
        ready comes back as its finalize task, leased to that token in the same transaction, or,
        with `publish` for a shard holding all its batch's lines, completes there (`finished`)."""
        ...

    def fail_shard(
        self, shard_id: int, token: str, batch_id: str, error: str, give_up: bool, now: int
    ) -> Literal["lost", "retry", "failed", "batch_ready"]: ...


class Membership(Protocol):
    """Live workers, on the database's clock: how many there are decides each one's share."""

    def join(self, worker_id: str) -> None: ...

    def standing(self, worker_id: str, alive_seconds: float, now: float | None = None) -> tuple[int, int, float]:
        """Mark the worker seen; (its rank among live workers, how many, seconds since it joined)."""
        ...

    def leave(self, worker_id: str) -> None: ...


class WakeSource(Protocol):
    """Something that calls `Worker.wake()` from its own thread when there may be new work (a
    LISTEN on PostgreSQL); started and stopped with the worker."""

    def start(self) -> None: ...

    def stop(self) -> None: ...
