"""Splitting each upstream's `max_concurrency` between all workers, wherever they run, so the
upstream sees the configured maximum in total, not once per worker process.

Each worker knows, from its heartbeat, its rank among the live workers and how many there are;
the shares are the maximum divided evenly, the first `maximum % count` workers taking one more.
A worker that joins others (any but the oldest) sends nothing until the others have had two
heartbeats to see it and shrink their shares; a worker that leaves (or dies) is dropped once its row is stale, and the
others' shares grow. With more workers than the maximum, each still sends one request at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

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
