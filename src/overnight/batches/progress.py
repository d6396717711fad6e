"""How fast an in-progress batch runs and when it should be done, from what the store already
records: when each shard attempt was claimed and committed, and the lines it has done (committed,
or reported live by its heartbeat). No per-line work: a shard's lines are assumed spread evenly
over its run, which at a few hundred lines per shard is a fine grain.

Both are extra fields of the batch object (`throughput`, lines/s over the last minute, and
`eta_seconds`); the OpenAI SDK keeps unknown fields, so `batch.model_dump()` shows them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from overnight.store.records import ShardSpan

WINDOW_SECONDS = 60.0
# A batch that started a moment ago is measured over at least this long: no spike from one
# shard committed in the first milliseconds.
MIN_WINDOW_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Progress:
    throughput: float  # lines per second over the last minute (or since the batch started)
    eta_seconds: float | None  # None: nothing ran in the window, no estimate


def estimate(spans: Iterable[ShardSpan], now: float, started_at: float, remaining: int) -> Progress:
    """Lines done in (now - 60 s, now], per second, and the time the `remaining` lines take at that rate."""
    window_start = max(now - WINDOW_SECONDS, started_at)
    window = max(now - window_start, MIN_WINDOW_SECONDS)
    lines = 0.0
    for span in spans:
        end = now if span.finished_at is None else span.finished_at
        if end <= window_start:
            continue
        duration = end - span.started_at
        if duration <= 0:
            lines += span.done
        else:
            lines += span.done * min(1.0, (end - max(span.started_at, window_start)) / duration)
    throughput = lines / window
    eta = round(remaining / throughput, 1) if throughput > 0 else None
    return Progress(round(throughput, 3), eta)
