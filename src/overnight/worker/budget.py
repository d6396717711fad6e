"""Splitting each upstream's `max_concurrency` between all workers, wherever they run, so the
upstream sees the configured maximum in total, not once per worker process.

Each worker knows, from its heartbeat, its rank among the live workers and how many there are;
the shares are the maximum divided evenly, the first `maximum % count` workers taking one more.
A worker that joins others (any but the oldest) sends nothing until the others have had two
heartbeats to see it and shrink their shares; a worker that leaves (or dies) is dropped once its row is stale, and the
others' shares grow. With more workers than the maximum, each still sends one request at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from overnight.engines.port import SharedBudgetEngine


def share_of(maximum: int, rank: int, count: int) -> int:
    count = max(count, 1)
    share = maximum // count + (1 if rank < maximum % count else 0)
    return max(share, 1)


def apply_shares(engines: Iterable[object], rank: int, count: int, joined_seconds_ago: float,
                 settle_seconds: float) -> None:
    # Only a worker that others were already running before waits; the oldest never does, so
    # workers that start together are not all held back.
    settling = rank > 0 and count > 1 and joined_seconds_ago < settle_seconds
    for engine in engines:
        if isinstance(engine, SharedBudgetEngine):
            engine.set_share(0 if settling else share_of(engine.max_in_flight, rank, count))


class Standing:
    """What a worker does with its membership heartbeat's answers. Learned: the shares follow it.
    Not learned (the database is away, the call hangs): the share it had holds only until the
    others may count this worker gone (they drop a row unseen for the alive window) and take its
    share; from then on, and before the first answer, it sends nothing. (It kept its share, or
    the whole maximum at start, and the upstream saw more than max_concurrency in total.)"""

    def __init__(self, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after = stale_after
        self.clock = clock
        self.learned_at: float | None = None

    def learned(self, engines: Iterable[object], rank: int, count: int, joined_seconds_ago: float,
                settle_seconds: float) -> None:
        self.learned_at = self.clock()
        apply_shares(engines, rank, count, joined_seconds_ago, settle_seconds)

    def unknown(self, engines: Iterable[object]) -> None:
        if self.learned_at is not None and self.clock() - self.learned_at <= self.stale_after:
            return
        for engine in engines:
            if isinstance(engine, SharedBudgetEngine):
                engine.set_share(0)
